"""TurboQuantConfig: every knob of the compressed cache, validated, plus named presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .norms import MARGIN, check_norm_bits, check_norm_margin
from .shaping import SHAPE_PRIORS

KEY_METHODS = ("mse", "prod")
SPEC_OPTIONS = "prod, r<N>, s<N>, ss, o<N>, rc<N>, ck, cv, ckv, uk, uv, ukv, sv, tk, tv, tkv, qs, qsd, dp, n8[m<octaves>], e<high>.<low>, er<N>, ev<high>.<low>, fit<N>, fitkv<N>, p<first>.<last>[b<bits>], L<i>.<j>[b<bits>], B<i>.<j>k<K>v<V>, Bt, q, seed<N>"
MIN_BITS, MAX_BITS = 1, 8


def split_bits(bits: float, head_dim: int, step: int = 1) -> tuple[int, int, int]:
    """Fractional bits as the paper's outlier split: (outlier_channels, outlier_bits, regular_bits).

    b = floor(b) + f is stored as round(f·d/step) outlier channels at
    floor(b)+step bits and the rest at floor(b) bits; integer b gives (0, b, b).
    E.g. 2.5 bits at d = 128, step 1: 64 channels at 3 bits + 64 at 2 bits;
    step 2: 32 channels at 4 bits + 96 at 2. (The paper's example, 32 channels
    at 3 bits + 96 at 2, averages 2.25 bits, not 2.5.)
    """
    low = int(math.floor(bits))
    outliers = int(round((bits - low) * head_dim / step))
    if outliers == 0:
        return 0, low, low
    if outliers >= head_dim:
        return 0, low + step, low + step
    return outliers, low + step, low


def _check_split(bits: float, split: tuple, side: str = "key") -> None:
    if len(split) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in split) or not 0 <= split[1] < bits < split[0] <= MAX_BITS:
        raise ValueError(f"{side}_split must be integer bits (high, low) with 0 <= low < {side}_bits={bits:g} < high <= {MAX_BITS}, got {split!r}")


def eigen_split_groups(bits: float, head_dim: int, high: int, low: int) -> tuple[int, int, int]:
    """An eigen split of `bits` per coordinate on average: (leading_directions, high, low) with
    m = round(d (bits - low) / (high - low)) leading directions at `high` bits and the rest at `low`
    (low = 0: dropped). E.g. 4 bits as (5, 3) at d = 64: 32 directions at 5 bits + 32 at 3."""
    _check_split(bits, (high, low))
    leading = int(round(head_dim * (bits - low) / (high - low)))
    if not 0 < leading < head_dim:
        raise ValueError(f"an eigen split ({high}, {low}) of {bits:g} bits at head_dim {head_dim} leaves a group empty")
    return leading, high, low


def _check_bits(name: str, bits: float) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not (MIN_BITS <= bits <= MAX_BITS):
        raise ValueError(f"{name} must be a number of bits in [{MIN_BITS}, {MAX_BITS}] (e.g. 2, 3, 4, 2.5, 3.5), got {bits!r}")


@dataclass(frozen=True)
class TurboQuantConfig:
    """How each attention layer's K/V cache is compressed.

    key_bits, value_bits: bits per coordinate, 1..8; a fractional value (2.5, 3.5)
        uses the paper's outlier-channel split (see `split_bits`): per layer and
        KV head, the channels with the largest mean |x| over the first chunk the
        layer stores (the prefill) get one more bit.
    key_method: "mse" (TurboQuant_mse, Algorithm 1) or "prod" (Algorithm 2:
        (b-1)-bit mse + 1-bit QJL residual, unbiased inner products). Values
        always use "mse".
    residual_length: the most recent tokens kept in full precision (0 = none).
    sink_tokens: the first tokens of the sequence kept in full precision.
    sliding_sinks: sliding-window layers keep the sink tokens exact too, while the
        window still shows them (dropped first when it moves on); without it they
        store them compressed like any other token (spec "ss", with s<N>).
    protect_first, protect_last, protected_layers: layers (by index) given
        `protected_bits` instead; protected_bits=None keeps them uncompressed.
    layer_bits_overrides: ((layer, key_bits, value_bits), ...): layers stored at other
        bits than key_bits / value_bits, every other lever kept (an eigen split only
        where a layer keeps key_bits), to move bits to the layers where the loss is at
        the same average (README, Bits per layer). Spec B<i>.<j>k<K>v<V>, repeatable:
        "k4v4-B0.5k5v4-B9k3v4". A layer may not also be protected.
    tuned_layer_bits: take layer_bits_overrides from the model's shipped profile
        (`layer_profiles`: bits per layer from a KL scan of that model) when patch()
        sees the model; uniform bits, with a warning, where none matches (spec "Bt").
    prefill_exact: True: the tokens of the current forward call attend to each
        other exactly and only tokens cached by earlier calls are read
        compressed (the seed document's behaviour). False: every token is
        read back compressed, the current ones included.
    outlier_step: for fractional bits, how many extra bits the outlier channels
        get (1: the paper's split; 2: half as many outliers, two bits more).
    rotation_candidates: per layer, try this many seeded rotations on the first
        chunk and keep the one with the smallest reconstruction error (K and V
        each; whole-vector codecs only; see codec.RotationSearchCodec).
    center_keys: quantize k_p - R_p μ, with μ the per-layer, per-head mean of the
        *pre-RoPE* keys of the first chunk the layer stores and R_p the model's
        rotary rotation at the key's position (read from the cos/sin the model
        passes its attention; codec.RopeKeyCodec). Nothing is stored per
        token; μ is counted as stored.
    center_values: quantize v - μ, μ the values' per-head mean over the first
        chunk (codec.CenteredCodec).
    shape_keys: store A k (A⁻¹ applied on decode), A [d, d] per layer and KV
        head fitted on the first chunk's keys and the queries seen up to it so
        the key error lands where queries look least (tqpatch.shaping); A is
        stored in int8 (d(d+1)/2 bytes per head, counted). Full-attention
        layers only: on a sliding-window layer A would cost as much as its
        short cache.
    shape_sliding_keys: with shape_keys, also shape the keys of sliding-window
        layers, by a diagonal A (d float16 numbers per head, counted; equal on
        the two channels of each RoPE pair; `shaping.diagonal_transform`).
    shape_prior: what the shaping fit shrinks the first chunk's second moments
        towards (`shaping.SHAPE_PRIORS`): "isotropic" (half a multiple of I) or
        "diagonal" (half their own diagonal, then a tenth of I: spec dp);
        nothing stored changes.
    key_split: (high, low) bits: keys stored in the eigenbasis of their query-shaped
        second moment (needs shape_keys), the leading directions at `high` bits and
        the rest at `low` (0: dropped), key_bits on average (`eigen_split_groups`):
        transform coding, bits where the score error is. Each group has its own
        norm; B is stored whole in 4-bit entries (d²/2 bytes per head, counted). Full-attention layers
        only (others store plain key_bits); the fused CUDA kernel reads groups of 1..8 bits.
        B is fitted on the first chunk a layer stores: it needs a few dozen key
        vectors (it warns below d/4; README: it hurt Gemma-3 at d 256 with 32-token
        first chunks and helped with 256-token ones).
    key_split_rotations: with key_split, try this many rotation seeds for the split's
        two groups (seed, seed + 1, ...) on the chunk the split is fitted on and keep
        the one with the smallest query-weighted score error (spec er<N>); nothing
        extra is stored.
    value_split: (high, low) bits: the same transform coding for values, in the
        eigenbasis of their second moment on the first chunk (PCA per head: no
        queries, the output error is the value error); value_bits on average.
        B is stored in 4-bit entries (counted). Full-attention layers only;
        the fused kernels do not read it (reference path).
    refit_tokens: full-attention layers keep exact copies of their first N
        compressed keys and, once they hold N, fit the key codec again on all of
        them (μ, A, an eigen split's basis, 8-bit norm ranges; and the queries seen
        until then) and encode them again; reads stay compressed (0 = off: fitted on
        the first chunk only). The copies count as full-precision bytes while held.
    refit_values: with refit_tokens, the values too: exact copies of the first N,
        then a fresh value codec (outlier channels, norm ranges, eigen basis) fitted
        on all of them and the values encoded again (spec fitkv<N>).
    unbias_keys, unbias_values: decode each code group's centroids divided by 1 − D (D its
        codebook's unit-vector MSE): Lloyd-Max reconstructions are conditional means, so on
        average they shrink by 1 − D, and so do attention outputs (sums of many values) and
        the scale of the scores; the division removes that bias for (1 − D)⁻² more noise per
        vector (`TurboQuantMSE.decode_gain`). Nothing stored changes (spec uk, uv, ukv).
    score_variance: add σ²/2 (times scaling²) to the logit of each key read compressed,
        σ² = Var(⟨q, k⟩ | its codes) ≈ Σ_groups ‖k_g‖² (D_g / d_g) ‖q_g‖² (stored norms,
        query in the stored basis): a decoded score is the conditional mean ŝ, and
        E[exp s | codes] = exp(ŝ + σ²/2), so keys with uncertain (large-norm) scores are not
        under-weighted (`tqpatch.attention`). Nothing stored changes; mse keys decoded as
        conditional means only (not prod, not unbias_keys). On CUDA the decode kernel adds it
        per token from the group norms it reads anyway (`norm_bias`; spec sv).
    trellis_keys, trellis_values: store trellis codes instead of Lloyd-Max codes in every
        code group of 1–6 bits (`tqpatch.trellis`): the same bits per coordinate, packed the
        same way, but each coordinate decodes from a window of the codes before it and the
        encoder picks a vector's codes together (Viterbi), for 1.2–1.6× less error at equal
        bits. Nothing else is stored. Encoding costs ~2^10 operations per coordinate on the
        CPU (a Triton kernel on CUDA); on CUDA the split decode kernel reads them (not the
        faster warp kernels of k4v4 / k4v4+). Spec tk, tv, tkv.
    norm_bits: 16 stores each vector's norm in float16 (TurboQuant's choice);
        8 stores it as an 8-bit log code with a per-head range fixed from the
        first chunk (tqpatch.norms): half the norm bits (0.125 bits per
        coordinate less at head_dim 64) for ~1% relative norm error; the fused
        CUDA kernels read and write both.
    norm_margin: octaves by which 8-bit norms widen their calibration range on
        both sides (4: RMS error 0.8%; 1: 0.33%, but 1.1% of Gemma-3's norms fall
        outside and are clamped; tqpatch.norms). Spec n8m<octaves>, e.g. n8m1.
    seed: seeds the rotation Π and the QJL matrix S (shared by all layers).
    """

    key_bits: float = 4
    value_bits: float = 4
    key_method: str = "mse"
    residual_length: int = 0
    sink_tokens: int = 0
    sliding_sinks: bool = False
    protect_first: int = 0
    protect_last: int = 0
    protected_layers: tuple[int, ...] = field(default_factory=tuple)
    protected_bits: int | None = None
    layer_bits_overrides: tuple[tuple[int, float, float], ...] = field(default_factory=tuple)
    tuned_layer_bits: bool = False
    prefill_exact: bool = True
    center_keys: bool = False
    center_values: bool = False
    shape_keys: bool = False
    shape_sliding_keys: bool = False
    shape_prior: str = "isotropic"
    outlier_step: int = 1
    rotation_candidates: int = 1
    norm_bits: int = 16
    norm_margin: float = MARGIN
    key_split: tuple[int, int] | None = None
    key_split_rotations: int = 1
    value_split: tuple[int, int] | None = None
    refit_tokens: int = 0
    refit_values: bool = False
    unbias_keys: bool = False
    unbias_values: bool = False
    score_variance: bool = False
    trellis_keys: bool = False
    trellis_values: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _check_bits("key_bits", self.key_bits)
        _check_bits("value_bits", self.value_bits)
        if self.key_method not in KEY_METHODS:
            raise ValueError(f"key_method must be one of {KEY_METHODS}, got {self.key_method!r}")
        if self.key_method == "prod" and self.key_bits != int(self.key_bits):
            raise ValueError(f"key_method='prod' needs integer key_bits (1..8), got {self.key_bits}")
        for name in ("residual_length", "sink_tokens", "protect_first", "protect_last", "refit_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.sliding_sinks and not self.sink_tokens:
            raise ValueError("sliding_sinks keeps the sink tokens exact in sliding-window layers too: set sink_tokens > 0 (spec s<N>-ss)")
        if self.refit_values and not self.refit_tokens:
            raise ValueError("refit_values needs refit_tokens > 0 (how many tokens to refit on; spec fitkv<N>)")
        object.__setattr__(self, "protected_layers", tuple(self.protected_layers))
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.protected_layers):
            raise ValueError(f"protected_layers must be non-negative layer indices, got {self.protected_layers!r}")
        self._check_layer_bits_overrides()
        for name in ("rotation_candidates", "key_split_rotations"):
            count = getattr(self, name)
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 64:
                raise ValueError(f"{name} must be an integer in 1..64, got {count!r}")
        if isinstance(self.outlier_step, bool) or self.outlier_step not in (1, 2, 3, 4):
            raise ValueError(f"outlier_step must be 1, 2, 3 or 4, got {self.outlier_step!r}")
        for name in ("key_bits", "value_bits"):
            bits = getattr(self, name)
            if bits != int(bits) and math.floor(bits) + self.outlier_step > MAX_BITS:
                raise ValueError(f"{name}={bits} with outlier_step={self.outlier_step} needs more than {MAX_BITS} bits for the outlier channels")
        if self.protected_bits is not None:
            if isinstance(self.protected_bits, bool) or self.protected_bits not in range(MIN_BITS, MAX_BITS + 1):
                raise ValueError(f"protected_bits must be None (uncompressed) or an integer in 1..8, got {self.protected_bits!r}")
        for name in ("prefill_exact", "center_keys", "center_values", "shape_keys", "shape_sliding_keys", "unbias_keys", "unbias_values",
                     "refit_values", "sliding_sinks", "score_variance", "trellis_keys", "trellis_values", "tuned_layer_bits"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_norm_bits(self.norm_bits)
        check_norm_margin(self.norm_margin)
        if self.norm_margin != MARGIN and self.norm_bits != 8:
            raise ValueError(f"norm_margin sets the range of 8-bit norms: set norm_bits=8 too (spec n8m{self.norm_margin:g})")
        if self.shape_prior not in SHAPE_PRIORS:
            raise ValueError(f"shape_prior must be one of {', '.join(map(repr, SHAPE_PRIORS))}, got {self.shape_prior!r}")
        if self.shape_prior != "isotropic" and not self.shape_keys:
            raise ValueError("shape_prior tunes query shaping: set shape_keys=True too")
        if self.shape_sliding_keys and not self.shape_keys:
            raise ValueError("shape_sliding_keys extends shape_keys to sliding-window layers: set shape_keys=True too")
        if self.unbias_keys and self.key_method != "mse":
            raise ValueError("unbias_keys is for key_method='mse' (TurboQuant_prod's inner products are unbiased already)")
        if self.trellis_keys and self.key_method != "mse":
            raise ValueError("trellis_keys is for key_method='mse' (TurboQuant_prod's codes are not trellis codes)")
        if self.score_variance and (self.key_method != "mse" or self.unbias_keys):
            raise ValueError("score_variance is for mse keys decoded as conditional means: not with key_method='prod' or unbias_keys")
        if self.key_split is not None:
            object.__setattr__(self, "key_split", tuple(self.key_split))
            _check_split(self.key_bits, self.key_split)
            if not self.shape_keys or self.key_method != "mse":
                raise ValueError("key_split needs shape_keys=True and key_method='mse' (it splits the query-shaped eigenbasis)")
        if self.key_split_rotations != 1 and self.key_split is None:
            raise ValueError("key_split_rotations chooses the rotation of a key eigen split: set key_split too")
        if self.value_split is not None:
            object.__setattr__(self, "value_split", tuple(self.value_split))
            _check_split(self.value_bits, self.value_split, "value")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def _check_layer_bits_overrides(self) -> None:
        overrides = tuple(tuple(entry) for entry in self.layer_bits_overrides)
        layers = [entry[0] for entry in overrides if len(entry) == 3]
        if len(layers) != len(overrides) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise ValueError(f"layer_bits_overrides must be (layer, key_bits, value_bits) triples with non-negative layer indices, got {self.layer_bits_overrides!r}")
        for layer, key_bits, value_bits in overrides:
            _check_bits(f"key_bits of layer {layer}", key_bits)
            _check_bits(f"value_bits of layer {layer}", value_bits)
        object.__setattr__(self, "layer_bits_overrides", tuple(sorted(overrides)))  # one order, so equal settings compare equal
        repeated = sorted({i for i in layers if layers.count(i) > 1})
        if repeated:
            raise ValueError(f"layer_bits_overrides lists layer(s) {repeated} more than once")
        protected = sorted(set(layers) & set(self.protected_layers))
        if protected:
            raise ValueError(f"layer(s) {protected} are both protected and given other bits: choose one")
        if overrides and self.tuned_layer_bits:
            raise ValueError("tuned_layer_bits takes the bits per layer from the model's profile: give it or layer_bits_overrides (-B<i>k<K>v<V>), not both")

    # -- presets -------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "TurboQuantConfig":
        """A named setting, optionally with fields overridden: TurboQuantConfig.preset("k3v2", residual_length=128)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def with_(self, **changes) -> "TurboQuantConfig":
        return replace(self, **changes)

    # -- per-layer resolution --------------------------------------------------
    def is_protected(self, layer_idx: int, num_layers: int) -> bool:
        return layer_idx < self.protect_first or layer_idx >= num_layers - self.protect_last or layer_idx in self.protected_layers

    def layer_bits(self, layer_idx: int, num_layers: int) -> tuple[float, float] | None:
        """(key_bits, value_bits) for a layer, or None if it stays uncompressed."""
        if self.is_protected(layer_idx, num_layers):
            return None if self.protected_bits is None else (self.protected_bits, self.protected_bits)
        for layer, key_bits, value_bits in self.layer_bits_overrides:
            if layer == layer_idx:
                return key_bits, value_bits
        return self.key_bits, self.value_bits

    @property
    def name(self) -> str:
        """A short label that `from_spec` reads back, e.g. 'k4v4', 'k2.5v2.5-o2-s4-r128', 'k3v2-prod-p2.2'."""
        fmt = lambda b: f"{b:g}"  # noqa: E731
        label = f"k{fmt(self.key_bits)}v{fmt(self.value_bits)}"
        if self.key_method != "mse":
            label += f"-{self.key_method}"
        if self.residual_length:
            label += f"-r{self.residual_length}"
        if self.sink_tokens:
            label += f"-s{self.sink_tokens}" + ("-ss" if self.sliding_sinks else "")
        if self.outlier_step != 1:
            label += f"-o{self.outlier_step}"
        if self.rotation_candidates != 1:
            label += f"-rc{self.rotation_candidates}"
        if self.center_keys or self.center_values:
            label += "-c" + ("k" if self.center_keys else "") + ("v" if self.center_values else "")
        if self.unbias_keys or self.unbias_values:
            label += "-u" + ("k" if self.unbias_keys else "") + ("v" if self.unbias_values else "")
        if self.score_variance:
            label += "-sv"
        if self.trellis_keys or self.trellis_values:
            label += "-t" + ("k" if self.trellis_keys else "") + ("v" if self.trellis_values else "")
        if self.shape_keys:
            label += "-qsd" if self.shape_sliding_keys else "-qs"
        if self.shape_prior == "diagonal":
            label += "-dp"
        if self.norm_bits != 16:
            label += f"-n{self.norm_bits}" + ("" if self.norm_margin == MARGIN else f"m{self.norm_margin:g}")
        if self.key_split is not None:
            label += "-e{}.{}".format(*self.key_split)
        if self.key_split_rotations != 1:
            label += f"-er{self.key_split_rotations}"
        if self.value_split is not None:
            label += "-ev{}.{}".format(*self.value_split)
        if self.refit_tokens:
            label += f"-fit{'kv' if self.refit_values else ''}{self.refit_tokens}"
        if self.protect_first or self.protect_last:
            label += f"-p{self.protect_first}.{self.protect_last}" + ("" if self.protected_bits is None else f"b{self.protected_bits}")
        if self.protected_layers:  # protected_bits rides on -p when that is printed, else on -L
            bits_on_l = self.protected_bits is not None and not (self.protect_first or self.protect_last)
            label += "-L" + ".".join(map(str, self.protected_layers)) + (f"b{self.protected_bits}" if bits_on_l else "")
        groups: dict[tuple[float, float], list[int]] = {}
        for layer, key_bits, value_bits in self.layer_bits_overrides:
            groups.setdefault((key_bits, value_bits), []).append(layer)
        for (key_bits, value_bits), layers in groups.items():
            label += "-B" + ".".join(map(str, layers)) + f"k{fmt(key_bits)}v{fmt(value_bits)}"
        if self.tuned_layer_bits:
            label += "-Bt"
        if not self.prefill_exact:
            label += "-q"
        if self.seed:
            label += f"-seed{self.seed}"
        return label

    @classmethod
    def from_spec(cls, spec: str) -> "TurboQuantConfig":
        """A preset name, or a label as `name` writes it: 'k{K}v{V}' then '-'-separated options:
        prod | r{residual} | s{sinks} | ss (sinks in sliding-window layers too) | o{outlier_step} | rc{rotation_candidates} | ck/cv/ckv (centering) | uk/uv/ukv (unbiased decoding) | sv (score variance in the logits) | tk/tv/tkv (trellis codes) | qs (query-shaped keys) | qsd (and diagonal shaping on sliding-window layers) | dp (shaping shrunk towards the diagonal) | n8[m{octaves}] (8-bit norms[, their range margin]) | e{high}.{low} (eigen split of keys) | er{N} (its rotation: best of N seeds by score error) | ev{high}.{low} (of values) | fit{N} (refit keys on N tokens) | fitkv{N} (keys and values) |
        p{first}.{last}[b{bits}] (protected layers) | L{i}.{j}... | B{i}.{j}...k{K}v{V} (these layers at other bits; repeatable) | Bt (the model's tuned bits per layer) | q (prefill read compressed) | seed{n}.
        """
        import re

        spec = spec.strip()
        if spec in PRESETS:
            return PRESETS[spec]
        head, *options = spec.split("-")
        match = re.fullmatch(r"k(\d+(?:\.\d+)?)v(\d+(?:\.\d+)?)", head)
        if not match:
            raise ValueError(f"unknown setting {spec!r}: use a preset ({', '.join(PRESETS)}) or a spec 'k<K>v<V>[-option...]' like 'k2.5v2-o2-r128' (options: {SPEC_OPTIONS})")
        as_number = lambda text: int(text) if float(text) == int(float(text)) else float(text)  # noqa: E731
        fields: dict = {"key_bits": as_number(match[1]), "value_bits": as_number(match[2])}
        patterns = {
            r"prod|mse": lambda m: {"key_method": m[0]},
            r"r(\d+)": lambda m: {"residual_length": int(m[1])},
            r"s(\d+)": lambda m: {"sink_tokens": int(m[1])},
            r"o(\d+)": lambda m: {"outlier_step": int(m[1])},
            r"rc(\d+)": lambda m: {"rotation_candidates": int(m[1])},
            r"c(k?)(v?)": lambda m: {"center_keys": bool(m[1]), "center_values": bool(m[2])},
            r"u(k?)(v?)": lambda m: {"unbias_keys": bool(m[1]), "unbias_values": bool(m[2])},
            r"p(\d+)\.(\d+)(?:b(\d+))?": lambda m: {"protect_first": int(m[1]), "protect_last": int(m[2]), "protected_bits": int(m[3]) if m[3] else None},
            r"L(\d+(?:\.\d+)*)(?:b(\d+))?": lambda m: {"protected_layers": tuple(int(i) for i in m[1].split("."))} | ({"protected_bits": int(m[2])} if m[2] else {}),
            r"sv": lambda m: {"score_variance": True},
            r"Bt": lambda m: {"tuned_layer_bits": True},
            r"ss": lambda m: {"sliding_sinks": True},
            r"t(kv|k|v)": lambda m: {"trellis_keys": "k" in m[1], "trellis_values": "v" in m[1]},
            r"qs": lambda m: {"shape_keys": True},
            r"qsd": lambda m: {"shape_keys": True, "shape_sliding_keys": True},
            r"dp": lambda m: {"shape_prior": "diagonal"},
            r"n(\d+)(?:m(\d+(?:\.\d+)?))?": lambda m: {"norm_bits": int(m[1])} | ({"norm_margin": float(m[2])} if m[2] else {}),
            r"e(\d+)\.(\d+)": lambda m: {"key_split": (int(m[1]), int(m[2]))},
            r"er(\d+)": lambda m: {"key_split_rotations": int(m[1])},
            r"ev(\d+)\.(\d+)": lambda m: {"value_split": (int(m[1]), int(m[2]))},
            r"fit(\d+)": lambda m: {"refit_tokens": int(m[1])},
            r"fitkv(\d+)": lambda m: {"refit_tokens": int(m[1]), "refit_values": True},
            r"q": lambda m: {"prefill_exact": False},
            r"seed(\d+)": lambda m: {"seed": int(m[1])},
        }
        overrides: list[tuple[int, float, float]] = []
        for option in options:
            found = re.fullmatch(r"B(\d+(?:\.\d+)*)k(\d+(?:\.\d+)?)v(\d+(?:\.\d+)?)", option)
            if found:
                overrides += [(int(i), as_number(found[2]), as_number(found[3])) for i in found[1].split(".")]
                fields["layer_bits_overrides"] = tuple(overrides)
                continue
            for pattern, read in patterns.items():
                found = re.fullmatch(pattern, option)
                if found and found[0]:
                    fields.update(read(found))
                    break
            else:
                raise ValueError(f"unknown option {option!r} in setting {spec!r}; options: {SPEC_OPTIONS}")
        return cls(**fields)


_QUALITY = {"sink_tokens": 4, "sliding_sinks": True, "center_keys": True, "shape_keys": True, "shape_sliding_keys": True, "norm_bits": 8}  # spec "-s4-ss-ck-qsd-n8"
_DIAGONAL_PRIOR = {"shape_prior": "diagonal"}  # spec "-dp": k3v2+, k2v2+, 3.5bit+
_TRELLIS = {"trellis_keys": True, "trellis_values": True}  # spec "-tkv": the presets below 4 bits

PRESETS: dict[str, TurboQuantConfig] = {
    "k8v8": TurboQuantConfig(key_bits=8, value_bits=8),
    "k4v4": TurboQuantConfig(key_bits=4, value_bits=4),
    "k3v2": TurboQuantConfig(key_bits=3, value_bits=2),
    "k2v2": TurboQuantConfig(key_bits=2, value_bits=2),
    "3.5bit": TurboQuantConfig(key_bits=3.5, value_bits=3.5),
    "2.5bit": TurboQuantConfig(key_bits=2.5, value_bits=2.5),
    # The quality presets: TurboQuant plus the levers measured to help on SmolLM2 and Gemma-3 (README, Quality presets
    # and the sections after it): the first 4 tokens exact (attention sinks; in sliding-window layers too while they see
    # them, "-ss", sixteenth session: 15-22% less KL to FP on Gemma-3), keys centered before RoPE, query-shaped
    # keys (a diagonal map on sliding-window layers, "-qsd"), 8-bit norms that pay for them, and the score variance in
    # the compressed logits ("-sv"). k3v2+, k2v2+ and 3.5bit+ decode their values unbiased ("-uv") and fit the shaping
    # with the diagonal prior ("-dp"); 3.5bit+ spends its bits as 4-bit keys and 3-bit values (better needle recall at
    # 8k than the 3.5 / 3.5 split). Below 4 bits they store trellis codes ("-tkv", fourteenth session): the same bytes,
    # 27-61% less perplexity loss on both models, at 1.8-2.1x the decode-attention time of Lloyd-Max codes on the split
    # kernel (bench/RESULTS.md, run 107). k4v4+ keeps Lloyd-Max codes, which the warp kernel reads (0.48x bf16 SDPA,
    # run 103; 4-bit trellis codes take 2.3x on the split kernel): it is the fast preset. Its trellis variant,
    # "k4v4-s4-ss-ck-sv-tkv-qsd-n8", read less on Gemma-3 before "-ss"; with it the two are alike (+0.41% vs +0.57% at
    # seeds 0-2; the preset +0.53% over five).
    # 4bit+ and 3.5bit+ (eighteenth session) also take the model's bits per layer where tqpatch ships them ("-Bt",
    # `layer_profiles`: SmolLM2-135M and Gemma-3-270M; other models store uniform bits, with a warning): from a KL scan
    # of each model, the same average bits, 25-27% (4bit+) and 12-25% (3.5bit+) less KL to FP and less perplexity loss
    # on the five-seed means of both models (README, "Bits per layer shipped per model"). 4bit+ is the quality 4-bit
    # preset (trellis codes, read by the split kernel); k4v4+ stays the fast one. SmolLM2's 3.5bit+ bits (twentieth
    # session) come from a scan with long-range copies, with layer 19's keys held at 4 bits: an 8k needle lookup runs
    # through them (README, "Needle margins and a needle-driven layer scan"). Gemma-3's 3.5bit+ bits (twenty-second
    # session) come from a KL scan with the preset's own codes, with layers 11 and 14's keys held at 5 bits: 1,024-token
    # needles at depths 100 and 0 need them (README, "A KL scan with the preset's own codes").
    "k4v4+": TurboQuantConfig(key_bits=4, value_bits=4, score_variance=True, **_QUALITY),
    "4bit+": TurboQuantConfig(key_bits=4, value_bits=4, score_variance=True, tuned_layer_bits=True, **_QUALITY, **_TRELLIS),
    "k3v2+": TurboQuantConfig(key_bits=3, value_bits=2, unbias_values=True, score_variance=True, **_QUALITY, **_DIAGONAL_PRIOR, **_TRELLIS),
    "k2v2+": TurboQuantConfig(key_bits=2, value_bits=2, unbias_values=True, score_variance=True, **_QUALITY, **_DIAGONAL_PRIOR, **_TRELLIS),
    "3.5bit+": TurboQuantConfig(key_bits=4, value_bits=3, unbias_values=True, score_variance=True, tuned_layer_bits=True, **_QUALITY, **_DIAGONAL_PRIOR, **_TRELLIS),
    "2.5bit+": TurboQuantConfig(key_bits=2.5, value_bits=2.5, score_variance=True, **_QUALITY, **_TRELLIS),
}

"""Codecs: turn one layer's keys or values [B, H, T, d] into stored parts and back.

A codec's `encode` returns a dict of tensors that all share the leading
[B, H, T] axes (that is what the store appends, crops and reorders), and
`decode` inverts it. Two kinds:

- `TurboQuantCodec`: one TurboQuant_mse / TurboQuant_prod quantizer on whole vectors.
- `SplitCodec`: the paper's fractional bits. Per KV head, a fixed set of
  "outlier" channels (chosen once by `calibrate`, from the mean |x| per
  channel of the first chunk the layer sees) is quantized at `outlier_bits`
  and the other channels at `regular_bits`, each group normalised and rotated
  on its own.
"""

from __future__ import annotations

import copy
import warnings

import torch

from .config import eigen_split_groups, split_bits
from .norms import MARGIN, LogNormQuantizer, check_norm_bits
from .quantizer import QuantizedVectors, TurboQuantMSE, TurboQuantProd
from .rope import RopeBias, RopeTable, rotate_half
from .shaping import SHAPE_PRIORS, QueryMoments, diagonal_transform, eigen_ordered, rope_average, shaping_transform, stored_nbytes, stored_transform
from .trellis import TRELLIS_BITS

Parts = dict[str, torch.Tensor]
_FIELDS = ("codes", "norms", "qjl_signs", "residual_norms")


def make_quantizer(head_dim: int, bits: int, method: str, seed: int, unbiased: bool = False,
                   trellis: bool = False) -> TurboQuantMSE | TurboQuantProd:
    if method == "prod":
        if unbiased or trellis:
            raise ValueError("unbiased decoding and trellis codes are for mse codes, not TurboQuant_prod")
        return TurboQuantProd(head_dim, bits, seed)
    return mse_quantizer(head_dim, bits, seed, unbiased, trellis)


def mse_quantizer(head_dim: int, bits: int, seed: int, unbiased: bool = False, trellis: bool = False) -> TurboQuantMSE:
    """TurboQuant_mse; `trellis` gives trellis codes to groups of 1–6 bits (`tqpatch.trellis`; 7–8-bit groups keep
    Lloyd-Max codes: their error is negligible already, and a trellis is not worth its cost there)."""
    return TurboQuantMSE(head_dim, bits, seed, unbiased=unbiased, trellis=trellis and bits in TRELLIS_BITS)


class TurboQuantCodec:
    """Whole-vector TurboQuant: parts codes [B,H,T,nb] (+ norms, + QJL signs/residual norms for prod).

    norm_bits=8 stores the norms as 8-bit log codes (`tqpatch.norms`, their range widened by `norm_margin` octaves)
    instead of float16 (prod keys' residual norms stay float16); unbiased=True decodes c / (1 − D) (`TurboQuantMSE.decode_gain`)."""

    def __init__(self, head_dim: int, bits: int, method: str = "mse", seed: int = 0, norm_bits: int = 16, unbiased: bool = False,
                 trellis: bool = False, norm_margin: float = MARGIN):
        check_norm_bits(norm_bits)
        self.head_dim = head_dim
        self.bits = bits
        self.method = method
        self.norm_bits = norm_bits
        self.quantizer = make_quantizer(head_dim, bits, method, seed, unbiased, trellis)
        self.norm_codes = LogNormQuantizer(norm_margin) if norm_bits == 8 else None

    def encode(self, x: torch.Tensor) -> Parts:  # x: [B, H, T, d]
        q = self.quantizer.quantize(x)
        parts = {name: getattr(q, name) for name in _FIELDS if getattr(q, name) is not None}
        if self.norm_codes is not None:
            parts["norms"] = self.norm_codes.encode(parts["norms"])
        return parts

    def decode(self, parts: Parts, dtype: torch.dtype) -> torch.Tensor:  # -> [B, H, T, d]
        if self.norm_codes is not None:
            parts = {**parts, "norms": self.norm_codes.decode(parts["norms"])}
        return self.quantizer.dequantize(QuantizedVectors(**parts, dtype=dtype))

    def variance_weights(self, queries: torch.Tensor) -> torch.Tensor:
        """[B, H, M, 1]: ‖q‖² D / d for queries [B, H, M, d]; `score_variance` multiplies it by each key's ‖x‖²."""
        if self.method != "mse":
            raise ValueError("the score variance is for mse keys (TurboQuant_prod's scores are unbiased estimates, not conditional means)")
        return queries.float().square().sum(-1, keepdim=True) * self.quantizer.coordinate_variance

    def group_norms(self, parts: Parts) -> torch.Tensor:
        """The stored norms [B, H, L, 1] float32 (decoded from 8-bit codes where stored so)."""
        norms = parts["norms"] if self.norm_codes is None else self.norm_codes.decode(parts["norms"])
        return norms.float().unsqueeze(-1)

    def prepare(self, x: torch.Tensor) -> None:
        """Called with the first chunk before it is encoded (by any path, kernels included): fixes the 8-bit
        norms' ranges from its norms (rounded to float16, as `encode` sees them)."""
        if self.norm_codes is not None and not self.norm_codes.calibrated:
            self.norm_codes.calibrate(torch.linalg.vector_norm(x.float(), dim=-1).half())

    @property
    def bits_per_coordinate(self) -> float:
        return float(self.bits)

    @property
    def extra_nbytes(self) -> int:
        """Bytes held outside the per-token parts: the 8-bit norms' per-head ranges (else none)."""
        return 0 if self.norm_codes is None else self.norm_codes.extra_nbytes


class RotationSearchCodec(TurboQuantCodec):
    """TurboQuant with the best of `candidates` seeded rotations, chosen once per layer from the first chunk.

    The error of one rotation on a set of keys is not the same for all
    rotations: real keys share large common components, so how the rotation
    places them against the codebook matters (on SmolLM2, k4v4's ΔPPL ranges
    from +2.5% to +4.7% over four seeds). `prepare(x)` quantizes the first
    chunk x [B, H, T, d] with seeds seed, seed+1, ..., seed+candidates-1 and
    keeps the one with the smallest ‖x - x̃‖²; nothing extra is stored per token.
    """

    def __init__(self, head_dim: int, bits: int, method: str = "mse", seed: int = 0, candidates: int = 8, norm_bits: int = 16,
                 unbiased: bool = False, trellis: bool = False, norm_margin: float = MARGIN):
        super().__init__(head_dim, bits, method, seed, norm_bits, unbiased, trellis, norm_margin)
        self.candidates = [self.quantizer] + [make_quantizer(head_dim, bits, method, seed + i, unbiased, trellis) for i in range(1, candidates)]
        self.chosen: int | None = None

    def prepare(self, x: torch.Tensor) -> None:
        super().prepare(x)
        if self.chosen is not None:
            return
        x32 = x.float()
        errors = [((q.dequantize(q.quantize(x32)) - x32) ** 2).sum().item() for q in self.candidates]
        self.chosen = min(range(len(errors)), key=errors.__getitem__)
        self.quantizer = self.candidates[self.chosen]
        self.candidates = []  # keep only the chosen quantizer's constants

    def encode(self, x: torch.Tensor) -> Parts:
        self.prepare(x)
        return super().encode(x)


class SplitCodec:
    """Two precisions per vector: outlier channels at `outlier_bits`, the rest at `regular_bits`, per KV head.

    Fractional bits use the paper's outlier split (`split_bits`); `groups` =
    (num_outliers, outlier_bits, regular_bits) sets the split directly (an
    eigen split, `TurboQuantConfig.key_split`). regular_bits = 0 drops the
    regular channels: they decode to 0 and store no codes and no norm.

    outlier_index [H, n_out] and regular_index [H, d - n_out] (uint8, d <= 256) are set by
    `calibrate(x)` from the first chunk: the n_out channels with the largest
    mean |x| over batch and tokens, per head; or by `calibrate_leading(heads)`:
    the first n_out channels (a basis ordered by importance).
    """

    def __init__(self, head_dim: int, bits: float, seed: int = 0, step: int = 1, norm_bits: int = 16,
                 groups: tuple[int, int, int] | None = None, unbiased: bool = False, trellis: bool = False, norm_margin: float = MARGIN):
        check_norm_bits(norm_bits)
        self.head_dim = head_dim
        self.norm_bits = norm_bits
        if head_dim > 256:
            raise ValueError(f"fractional bits support head_dim up to 256 (uint8 channel indices), got {head_dim}")
        self.num_outliers, self.outlier_bits, self.regular_bits = groups or split_bits(bits, head_dim, step)
        if not 0 < self.num_outliers < head_dim:
            raise ValueError(f"{bits} bits at head_dim {head_dim} needs no channel split; use TurboQuantCodec")
        self.bits = self.bits_per_coordinate
        self.outlier = mse_quantizer(self.num_outliers, self.outlier_bits, seed, unbiased, trellis)
        self.regular = mse_quantizer(head_dim - self.num_outliers, self.regular_bits, seed, unbiased, trellis) if self.regular_bits else None
        self.outlier_index: torch.Tensor | None = None
        self.regular_index: torch.Tensor | None = None
        # one norm per stored channel group and vector: 8-bit log codes (norm_bits=8) or float16
        groups_stored = ("hi", "lo") if self.regular is not None else ("hi",)
        self.norm_codes = {group: LogNormQuantizer(norm_margin) for group in groups_stored} if norm_bits == 8 else None

    @property
    def calibrated(self) -> bool:
        return self.outlier_index is not None

    def with_seed(self, seed: int) -> "SplitCodec":
        """A copy with both groups' rotations drawn from `seed` (same split, channel order and norm codes)."""
        other = copy.deepcopy(self)
        for name in ("outlier", "regular"):
            group = getattr(self, name)
            if group is not None:
                setattr(other, name, mse_quantizer(group.head_dim, group.bits, seed, group.unbiased, group.trellis is not None))
        return other

    def calibrate(self, x: torch.Tensor) -> None:  # x: [B, H, T, d]
        score = x.float().abs().mean(dim=(0, 2))  # [H, d]
        self._set_order(torch.argsort(score, dim=-1, descending=True))

    def calibrate_leading(self, heads: int) -> None:
        """Outliers = channels 0..n_out-1 of every head (for inputs in a basis ordered by importance)."""
        self._set_order(torch.arange(self.head_dim).expand(heads, -1))

    def _set_order(self, order: torch.Tensor) -> None:  # [H, d], most important first
        self.outlier_index = order[:, : self.num_outliers].sort(dim=-1).values.to(torch.uint8)
        self.regular_index = order[:, self.num_outliers :].sort(dim=-1).values.to(torch.uint8)

    def _gather(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        b, h, t, _ = x.shape
        return torch.gather(x, -1, index.to(x.device, torch.int64)[None, :, None, :].expand(b, h, t, -1))

    def encode(self, x: torch.Tensor) -> Parts:
        if not self.calibrated:
            self.calibrate(x)
        parts = {}
        for name, quantizer, index in self._groups():
            q = quantizer.quantize(self._gather(x, index))
            norms = q.norms if self.norm_codes is None else self.norm_codes[name].encode(q.norms)
            parts.update({f"{name}_codes": q.codes, f"{name}_norms": norms})
        return parts

    def _norms(self, parts: Parts, group: str) -> torch.Tensor:
        norms = parts[f"{group}_norms"]
        return norms if self.norm_codes is None else self.norm_codes[group].decode(norms)

    def decode(self, parts: Parts, dtype: torch.dtype) -> torch.Tensor:
        out = None
        for name, quantizer, index in self._groups():
            part = quantizer.dequantize(QuantizedVectors(parts[f"{name}_codes"], self._norms(parts, name), dtype=torch.float32))
            b, h, t, _ = part.shape
            if out is None:
                out = torch.zeros(b, h, t, self.head_dim, device=part.device, dtype=torch.float32)
            out.scatter_(-1, index.to(part.device, torch.int64)[None, :, None, :].expand(b, h, t, -1), part)
        return out.to(dtype)

    def _groups(self) -> list[tuple[str, TurboQuantMSE, torch.Tensor]]:
        """(part-name prefix, quantizer, channel index [H, d_g]) of each stored group, high-bit group first."""
        return [(name, q, index) for name, q, index in (("hi", self.outlier, self.outlier_index), ("lo", self.regular, self.regular_index))
                if q is not None]

    def variance_weights(self, queries: torch.Tensor) -> torch.Tensor:
        """[B, H, M, G]: ‖q_g‖² D_g / d_g of each group's channels (the groups' errors are independent, so the
        score variance is Σ_g weight_g ‖x_g‖²), in the kernels' group order (high-bit group first)."""
        return torch.cat([q.coordinate_variance * self._gather(queries.float(), index).square().sum(-1, keepdim=True)
                          for _, q, index in self._groups()], dim=-1)

    def group_norms(self, parts: Parts) -> torch.Tensor:
        """The groups' stored norms [B, H, L, G] float32."""
        return torch.stack([self._norms(parts, name).float() for name, _, _ in self._groups()], dim=-1)

    @property
    def bits_per_coordinate(self) -> float:
        return (self.num_outliers * self.outlier_bits + (self.head_dim - self.num_outliers) * self.regular_bits) / self.head_dim

    @property
    def extra_nbytes(self) -> int:
        """The channel indices (one byte per channel per head) and the 8-bit norms' per-head ranges."""
        if not self.calibrated:
            return 0
        ranges = 0 if self.norm_codes is None else sum(q.extra_nbytes for q in self.norm_codes.values())
        return ranges + sum(t.numel() * t.element_size() for t in (self.outlier_index, self.regular_index))


class CenteredCodec:
    """Quantize x - μ instead of x, with μ [H, d] a per-head channel mean fixed from the first chunk.

    For values. (For keys see `RopeKeyCodec`: a fixed post-RoPE mean does
    not fit keys, whose offsets turn with position.) μ is taken over batch and
    tokens of the first chunk, leaving out its first `skip` tokens (attention
    sinks are atypical), and is added back on decode.
    """

    def __init__(self, inner, skip: int = 1):
        self.inner = inner
        self.skip = skip
        self.mean: torch.Tensor | None = None  # [H, d] float16

    def __getattr__(self, name):  # head_dim, bits, quantizer, ... of the wrapped codec
        return getattr(self.__dict__["inner"], name)

    def encode(self, x: torch.Tensor) -> Parts:  # x: [B, H, T, d]
        if self.mean is None:
            sample = x[:, :, self.skip :] if x.shape[2] > self.skip else x
            self.mean = sample.float().mean(dim=(0, 2)).half()
        return self.inner.encode(x.float() - self.mean.to(x.device).float()[None, :, None, :])

    def decode(self, parts: Parts, dtype: torch.dtype) -> torch.Tensor:
        centered = self.inner.decode(parts, torch.float32)
        return (centered + self.mean.to(centered.device).float()[None, :, None, :]).to(dtype)

    @property
    def extra_nbytes(self) -> int:
        return self.inner.extra_nbytes + (0 if self.mean is None else self.mean.numel() * self.mean.element_size())


EIGEN_ENTRY_BITS = 4  # B of an eigen split is stored in 4-bit entries: d²/2 bytes, as much as a symmetric int8 A


def _fit_eigen_split(inner: "SplitCodec", a: torch.Tensor, sigma: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """An eigen split's stored transform (M = Bᵀ, M⁻¹) [H, d, d] on `device`, B = Qᵀ A into the eigenbasis of
    A Σ Aᵀ (`shaping.eigen_ordered`, leading first) in 4-bit entries; `inner`'s high-bit group = the leading
    directions."""
    b = eigen_ordered(a, sigma)
    m, m_inv = stored_transform(b.transpose(-1, -2), symmetric=False, entry_bits=EIGEN_ENTRY_BITS)
    inner.calibrate_leading(sigma.shape[0])
    return m.to(device), m_inv.to(device)


class EigenValueCodec:
    """Values in the eigenbasis of their second moment (PCA per KV head), the leading directions in the
    SplitCodec's high-bit group and the rest in its low-bit group (`TurboQuantConfig.value_split`).

    Transform coding for values, as `RopeKeyCodec`'s eigen split for keys but without queries: the attention
    output error is the value error itself, so no shaping. The stored vector is B v with B [H, d, d] the
    eigenvectors of Σ_v = E[v vᵀ] over the first chunk (its first `skip` tokens left out: sinks), leading
    first; B is stored whole in 4-bit entries (d²/2 bytes per head, counted) and decode applies the inverse
    of the stored B, so encode and decode agree exactly.
    """

    def __init__(self, inner: "SplitCodec", skip: int = 1):
        self.inner = inner
        self.skip = skip
        self.transform: tuple[torch.Tensor, torch.Tensor] | None = None  # (M, M⁻¹) [H, d, d]: stored = v @ M

    def __getattr__(self, name):  # head_dim, bits, ... of the wrapped codec
        return getattr(self.__dict__["inner"], name)

    def _calibrate(self, x: torch.Tensor) -> None:  # x: [B, H, T, d]
        sample = (x[:, :, self.skip :] if x.shape[2] > self.skip else x).double()
        sigma = torch.einsum("bhti,bhtj->hij", sample, sample).cpu() / (sample.shape[0] * sample.shape[2])
        identity = torch.eye(self.head_dim, dtype=torch.float64).expand_as(sigma)
        self.transform = _fit_eigen_split(self.inner, identity, sigma, x.device)  # y = B v, leading directions first

    def encode(self, x: torch.Tensor) -> Parts:
        if self.transform is None:
            self._calibrate(x)
        return self.inner.encode(torch.einsum("bhtd,hde->bhte", x.float(), self.transform[0].to(x.device)))

    def decode(self, parts: Parts, dtype: torch.dtype) -> torch.Tensor:
        stored = self.inner.decode(parts, torch.float32)
        return torch.einsum("bhtd,hde->bhte", stored, self.transform[1].to(stored.device)).to(dtype)

    @property
    def extra_nbytes(self) -> int:
        """The inner codec's (channel indices, norm ranges) and B as stored."""
        stored = 0 if self.transform is None else stored_nbytes(self.transform[0].shape[0], self.head_dim, symmetric=False,
                                                                  entry_bits=EIGEN_ENTRY_BITS)
        return self.inner.extra_nbytes + stored


class RopeKeyCodec:
    """Keys: quantize A (k_p - R_p μ): centered before RoPE (μ) and error-shaped by the queries (A).

    Centering (`center`): keys of RoPE models carry large per-channel offsets
    before RoPE; after it they turn with position p, so a fixed post-RoPE mean
    misses them. The first encoded chunk is un-rotated with the layer's
    `RopeTable` (fitted from the model's cos/sin by `observe_rope`), μ [H, d] is
    its mean over batch and tokens (tokens before sequence index `skip` left
    out: attention sinks), and each key at sequence index p stores k_p - R_p μ;
    decode adds R_p μ back, so nothing extra is stored per token. ⟨q, R_p μ⟩ is
    exact and TurboQuant's error scales with ‖k_p - R_p μ‖ instead of ‖k_p‖.

    Shaping (`shape`): the stored vector is A (k_p - R_p μ), A [H, d, d] the
    symmetric map of `tqpatch.shaping` fitted on the same first chunk and the
    pre-RoPE queries seen before it (`observe_queries`), so the isotropic
    quantization error lands where queries look least; decode applies A⁻¹
    (or the fused kernel scores with A⁻¹q, `shape_queries`).

    Eigen split (`eigen`, inner codec a SplitCodec): the stored vector is
    B (k_p - R_p μ), B = Qᵀ A rotated into the eigenbasis of the shaped keys
    (`shaping.eigen_ordered`, leading directions first), and the inner codec's
    outlier group is the leading directions: bits go where the score error is.
    B is not symmetric: stored whole, in 4-bit entries (d²/2 bytes per head).

    Diagonal shaping (`diagonal`, with `shape`): A = diag(a), a [H, d] in float16
    (`shaping.diagonal_transform`): d numbers per head instead of d²/2, for
    sliding-window layers, whose short caches a full A would add about a quarter to (d 256).

    Shaping prior (`prior`, a `shaping.SHAPE_PRIORS` name): what the first chunk's second moments are
    shrunk towards before A is fitted ("isotropic": half of a multiple of I; "diagonal": their own
    diagonal, then a little I).

    The store passes each chunk's sequence index (`first_index`); encode and
    decode use the same indices, so the reconstruction is consistent even
    where they differ from the model's positions (left padding), which costs
    only quality. Without a fitted table (no RoPE, or the first chunk came
    before any call with three tokens) μ stays 0 and A is fitted without RoPE
    averaging; without observed queries A stays I.
    """

    uses_positions = True

    def __init__(self, inner, skip: int = 1, center: bool = True, shape: bool = False, eigen: bool = False, diagonal: bool = False,
                 prior: str = "isotropic", rotation_candidates: int = 1):
        if eigen and not (shape and isinstance(inner, SplitCodec)):
            raise ValueError("an eigen split needs query shaping and a SplitCodec")
        if diagonal and (eigen or not shape):
            raise ValueError("diagonal shaping needs shape=True and no eigen split")
        if prior not in SHAPE_PRIORS:
            raise ValueError(f"unknown shaping prior {prior!r}; valid: {', '.join(SHAPE_PRIORS)}")
        self.inner = inner
        self.eigen = eigen
        self.rotation_candidates = rotation_candidates if eigen else 1
        self.diagonal = diagonal
        self.prior = prior
        self.skip = skip
        self.center_keys = center
        self.rope = None  # RopeTable
        self.mean: torch.Tensor | None = None  # [H, d] float32, fixed on the first encode
        self._pair: torch.Tensor | None = None  # [μ | rotate_half(μ)] [H, 2d] on the device last used
        self.queries = QueryMoments() if shape else None
        # (M, M⁻¹) [H, d, d] float32, row-vector convention (stored = x @ M): M = A, or Bᵀ for an eigen split
        self.shaping: tuple[torch.Tensor, torch.Tensor] | None = None

    def __getattr__(self, name):  # head_dim, bits, quantizer, ... of the wrapped codec
        return getattr(self.__dict__["inner"], name)

    @property
    def has_offset(self) -> bool:
        """True once μ is fixed and nonzero by construction (centering on, RoPE table fitted): scores need ⟨q, R_p μ⟩."""
        return self.mean is not None and self.center_keys and self.rope is not None

    @property
    def wants_queries(self) -> bool:
        return self.queries is not None and self.mean is None

    def observe_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Fit the RoPE table from a call's cos/sin [B, T, d] (until the codec is calibrated)."""
        if self.rope is None and self.mean is None:
            table = RopeTable.fit(cos, sin)
            if table is not None and table.head_dim == self.head_dim:
                self.rope = table

    def observe_queries(self, queries: torch.Tensor, kv_heads: int) -> None:
        """Pre-RoPE queries [B, T, Hq, d] of a call, until the first encode fixes A."""
        if self.wants_queries:
            self.queries.observe(queries, kv_heads)

    def _calibrate(self, x: torch.Tensor, first_index: int) -> None:  # x: [B, H, T, d]
        pre = self.rope.invert(x, first_index) if self.rope is not None else x.float()
        keep = max(self.skip - first_index, 0)
        sample = pre[:, :, keep:] if pre.shape[2] > keep else pre
        mean = sample.mean(dim=(0, 2)) if self.center_keys and self.rope is not None else sample.new_zeros(x.shape[1], x.shape[-1])
        self.mean = mean  # fixed now: the rotation search below already stores centered keys
        if self.queries is not None and self.queries.count:
            centered = (sample - mean[None, :, None, :]).double()
            sigma_k = torch.einsum("bhti,bhtj->hij", centered, centered).cpu() / (centered.shape[0] * centered.shape[2])
            sigma_q = self.queries.mean
            if self.rope is not None:
                sigma_q, sigma_k = rope_average(sigma_q, self.rope), rope_average(sigma_k, self.rope)
            diagonal_share, shrink = SHAPE_PRIORS[self.prior]
            if self.diagonal:  # a in float16, as stored; its inverse from the stored values (a diagonal share leaves diagonals as they are)
                a = diagonal_transform(sigma_q, sigma_k, shrink).half().float()
                self.shaping = (torch.diag_embed(a).to(x.device), torch.diag_embed(1 / a).to(x.device))
            elif self.eigen:
                a = shaping_transform(sigma_q, sigma_k, shrink, diagonal_share)
                vectors = centered.shape[0] * centered.shape[2]
                if vectors < self.head_dim // 4:  # measured: 28 of 64 helped, 28 of 256 hurt
                    warnings.warn(
                        f"eigen split fitted on {vectors} key vectors at head_dim {self.head_dim}: "
                        f"with fewer than head_dim/4 its basis is mostly noise and it can lose to plain shaping (README: "
                        f"Gemma-3 at d 256 with 32-token first chunks); store a longer first chunk (the prompt) or drop key_split",
                        stacklevel=2,
                    )
                self.shaping = _fit_eigen_split(self.inner, a, sigma_k, x.device)  # y = B k, leading directions first
                if self.rotation_candidates > 1:
                    self._choose_rotation(x[:, :, keep:] if x.shape[2] > keep else x, first_index + keep, sigma_q)
            else:
                m, m_inv = stored_transform(shaping_transform(sigma_q, sigma_k, shrink, diagonal_share))
                self.shaping = (m.to(x.device), m_inv.to(x.device))

    def _choose_rotation(self, x: torch.Tensor, first_index: int, sigma_q: torch.Tensor) -> None:
        """Eigen split with `rotation_candidates` > 1: keep the groups' rotation seed (seed, seed + 1, ...) whose codes
        leave the smallest score error on the calibration keys x [B, H, T, d] (post-RoPE, from sequence index
        `first_index`): Σ e W eᵀ over the stored vectors' errors e, W = M⁻¹ Σ_q M⁻ᵀ the queries' (RoPE-averaged)
        second moment carried into the stored basis (stored = x @ M). Nothing extra is stored."""
        y = self._apply(x.float() - self._offset(x, first_index), 0)
        m_inv = self.shaping[1].double().cpu()
        metric = (m_inv @ sigma_q.double() @ m_inv.transpose(-1, -2)).float().to(y.device)  # [H, d, d]
        seed = self.inner.outlier.seed
        best = None
        for candidate in [self.inner] + [self.inner.with_seed(seed + i) for i in range(1, self.rotation_candidates)]:
            error = candidate.decode(candidate.encode(y), torch.float32) - y
            score_error = torch.einsum("bhti,hij,bhtj->", error, metric, error).item()
            if best is None or score_error < best[0]:
                best = (score_error, candidate)
        self.inner = best[1]

    def _offset(self, like: torch.Tensor, first_index: int) -> torch.Tensor:
        """R_p μ for the tokens of `like` [B, H, T, ...]: [1, H, T, d] float32."""
        if self.rope is None:
            return self.mean.to(like.device)[None, :, None, :].expand(1, -1, like.shape[2], -1)
        # R_p μ = μ ⊙ cos_p + rotate_half(μ) ⊙ sin_p, both halves in one product with [cos_p | sin_p]
        joined = self.rope.joined_range(first_index, like.shape[2], like.device)  # [T, 2d]
        pair = self._mean_pair(like.device)  # [H, 2d]
        return (pair[:, None, :] * joined[None]).view(pair.shape[0], -1, 2, self.head_dim).sum(2)[None]

    def _mean_pair(self, device: torch.device) -> torch.Tensor:
        """[μ | rotate_half(μ)] [H, 2d] float32 on `device`, made once per device."""
        if self._pair is None or self._pair.device != torch.device(device):
            self._pair = torch.cat([self.mean, rotate_half(self.mean)], dim=-1).to(device)
        return self._pair

    def _apply(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """x [B, H, T, d] times M (which=0: encode) or M⁻¹ (which=1: decode) per head."""
        if self.shaping is None:
            return x
        return torch.einsum("bhtd,hde->bhte", x, self.shaping[which].to(x.device))

    def center(self, x: torch.Tensor, first_index: int) -> torch.Tensor:
        """A (x - R_p μ) [B, H, T, d] float32 (calibrating on the first call): what the inner codec stores."""
        if self.mean is None:
            self._calibrate(x, first_index)
        return self._apply(x.float() - self._offset(x, first_index), 0)

    def encode(self, x: torch.Tensor, first_index: int = 0) -> Parts:
        stored = self.center(x, first_index)  # first: calibrating may choose another inner codec (a rotation search)
        return self.inner.encode(stored)

    def shape_queries(self, q: torch.Tensor) -> torch.Tensor:
        """A⁻¹q (eigen split: B⁻ᵀq) for queries q [B, Hq, d] (grouped over the KV heads): the inner codes
        score with these, q·k = q·(B⁻¹ y) = (B⁻ᵀ q)·y, i.e. row vectors q @ M⁻ᵀ."""
        if self.shaping is None:
            return q
        b, hq, d = q.shape
        hkv = self.shaping[1].shape[0]
        return self._in_stored_basis(q.view(b, hkv, hq // hkv, d)).reshape(b, hq, d).to(q.dtype)

    def _in_stored_basis(self, queries: torch.Tensor) -> torch.Tensor:
        """q @ M⁻ᵀ per KV head for queries [B, Hkv, M, d] (float32; as they are without shaping)."""
        if self.shaping is None:
            return queries
        return torch.einsum("bhmd,hed->bhme", queries.float(), self.shaping[1].to(queries.device))

    def variance_weights(self, queries: torch.Tensor) -> torch.Tensor:
        """The inner codec's weights for post-RoPE queries [B, H, M, d] carried into the stored basis: R_p μ is
        exact and ⟨q, k⟩ = ⟨q @ M⁻ᵀ, y⟩ + ⟨q, R_p μ⟩, y = (k - R_p μ) @ M what the inner codec stores."""
        return self.inner.variance_weights(self._in_stored_basis(queries))

    def rope_bias(self, q: torch.Tensor, first_index: int, rows: int) -> RopeBias:
        """⟨q, R_p μ⟩ for one query token per row, q [B, Hq, d], and compressed tokens from sequence index
        first_index on, in factored form (`RopeBias`, with the shared position table's first `rows` rows):
        the decode kernel adds it to ⟨A⁻¹q, A(k̃ - R_p μ)⟩ tile by tile. Needs the RoPE table (`has_offset`)."""
        b, hq, d = q.shape
        hkv = self.mean.shape[0]
        pair = self._mean_pair(q.device).view(1, hkv, 1, 2, d)  # [μ | rotate_half(μ)]
        products = (q.float().view(b, hkv, hq // hkv, 1, d) * pair).view(b, hq, 2, 2, d // 2)  # (μ, rh(μ)) x halves
        coefficients = products.sum(dim=3).reshape(b, hq, d)  # [A | B]: both halves of a product share a frequency
        return RopeBias(coefficients, self.rope.joined_range(0, rows, q.device), first_index, self.rope.scale)

    def decode(self, parts: Parts, dtype: torch.dtype, first_index: int = 0) -> torch.Tensor:
        centered = self._apply(self.inner.decode(parts, torch.float32), 1)
        return (centered + self._offset(centered, first_index)).to(dtype)

    @property
    def extra_nbytes(self) -> int:
        """μ in float16, A as stored (int8 upper triangle, or B whole in 4-bit entries; + row scales; diagonal: d float16) and the RoPE
        frequencies: per layer."""
        mean = 0 if self.mean is None else self.mean.numel() * 2
        shaping = 0
        if self.shaping is not None and self.diagonal:
            shaping = self.shaping[0].shape[0] * self.head_dim * 2  # a in float16
        elif self.shaping is not None:
            storage = dict(symmetric=False, entry_bits=EIGEN_ENTRY_BITS) if self.eigen else {}
            shaping = stored_nbytes(self.shaping[0].shape[0], self.head_dim, **storage)
        rope = 0 if self.rope is None else self.rope.frequencies.numel() * 4
        return self.inner.extra_nbytes + mean + shaping + rope


def score_variance(codec, queries: torch.Tensor, parts: Parts) -> torch.Tensor:
    """Var(⟨q_i, k_j⟩ | stored parts of k_j) [B, H, M, L] for queries [B, H, M, d] (grouped per KV head) and a key
    codec's parts [B, H, L, ...]: Σ_g weight_g(q_i) ‖k_j,g‖² (`variance_weights`, `group_norms`; mse codes decoded
    as conditional means: `TurboQuantMSE.coordinate_variance`)."""
    return torch.einsum("bhmg,bhlg->bhml", codec.variance_weights(queries), codec.group_norms(parts).square())


def make_codec(
    head_dim: int,
    bits: float,
    method: str,
    seed: int,
    center: bool = False,
    outlier_step: int = 1,
    rotation_candidates: int = 1,
    rope: bool = False,
    shape: bool = False,
    norm_bits: int = 16,
    split: tuple[int, int] | None = None,
    unbiased: bool = False,
    diagonal: bool = False,
    prior: str = "isotropic",
    split_rotations: int = 1,
    trellis: bool = False,
    norm_margin: float = MARGIN,
):
    """The codec for `bits` (fractional bits -> SplitCodec, which is mse-only), optionally choosing its
    rotation among `rotation_candidates` seeds, optionally mean-centered (RoPE-aware when `rope`: keys),
    optionally query-shaped (`shape`, keys only: RopeKeyCodec), with float16 or 8-bit norms (`norm_bits`; their range
    widened by `norm_margin` octaves).
    `split` = (high, low) bits: an eigen split at `bits` on average (`eigen_split_groups`): of query-shaped keys
    (`rope`), or of values in their PCA basis (`EigenValueCodec`). `unbiased`: every group decodes c / (1 − D)
    (`TurboQuantMSE.decode_gain`). `diagonal`: the shaping map is diagonal (with `shape`; sliding-window layers).
    `prior`: what the shaping fit shrinks towards (`shaping.SHAPE_PRIORS`). `split_rotations`: a key eigen split's
    rotation, best of this many seeds by score error (`RopeKeyCodec._choose_rotation`). `trellis`: trellis codes for
    every group of 1–6 bits (`mse_quantizer`)."""
    outliers, high, _ = split_bits(bits, head_dim, outlier_step)
    if split is not None:
        codec = SplitCodec(head_dim, bits, seed, norm_bits=norm_bits, groups=eigen_split_groups(bits, head_dim, *split), unbiased=unbiased,
                           trellis=trellis, norm_margin=norm_margin)
        if not rope:  # values: the PCA basis (EigenValueCodec), centered first where asked
            return CenteredCodec(EigenValueCodec(codec)) if center else EigenValueCodec(codec)
        if not shape:
            raise ValueError("an eigen split of keys (key_split) needs query-shaped keys")
        return RopeKeyCodec(codec, center=center, shape=True, eigen=True, prior=prior, rotation_candidates=split_rotations)
    if outliers == 0 and rotation_candidates > 1:
        codec = RotationSearchCodec(head_dim, high, method, seed, rotation_candidates, norm_bits, unbiased, trellis, norm_margin)
    elif outliers == 0:
        codec = TurboQuantCodec(head_dim, high, method, seed, norm_bits, unbiased, trellis, norm_margin)
    else:
        codec = SplitCodec(head_dim, bits, seed, outlier_step, norm_bits, unbiased=unbiased, trellis=trellis, norm_margin=norm_margin)
    if rope and (center or shape):
        return RopeKeyCodec(codec, center=center, shape=shape, diagonal=diagonal, prior=prior)
    return CenteredCodec(codec) if center else codec

"""Decode-faithful perplexity (DESIGN.md §6): the cache under test is read at every step.

A single forward pass over a text never reads the cache, so it measures
nothing. Here the tokens are split into windows of W tokens; each window is
fed in chunks of C tokens with one cache carried across its chunks (a fresh
cache per window), and

    PPL = exp( Σ_windows Σ_{i=1}^{len-1} −log p(x_i | x_<i) / Σ_windows (len − 1) )

over every predicted position. With TurboQuant's default prefill_exact=True,
the queries of chunk c attend to the tokens of chunks < c as stored in the
cache (compressed unless inside the full-precision window) and to their own
chunk exactly.

Reported per setting:
- compressed_tokens_read: Σ over chunks of the compressed tokens in the cache
  before that chunk (mean over layers) — the keys each query of the chunk
  reads in compressed form, summed over chunks. 0 means nothing was tested.
- compressed_key_fraction: over all (query, key) pairs attended, the fraction
  whose key was read compressed: Σ_l Σ_chunks c·k_l / Σ_l Σ_chunks (c·s_l + c(c+1)/2),
  k_l / s_l the compressed / stored tokens of layer l before the chunk.
- bits_per_element: true bits per cached K/V coordinate at the end of each
  window (everything stored, full-precision window included; `cache_stats`),
  pooled over windows (Σ bits / Σ coordinates); compression_ratio likewise.

With copy=True (CLI `--copy`) each window is a passage of ⌊(W − BOS)/2⌋ text tokens followed by the same passage
again, so its second half can be predicted by looking W/2 tokens back: a long-range copy, the skill a
needle-in-a-haystack lookup needs, which next-token prediction on plain text rarely exercises (README, "Long-range
copies").

Under `accelerate launch`, windows are sharded over processes
(`shard_windows`) and the per-window sums are gathered on every process.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import transformers
from transformers.cache_utils import DynamicCache, DynamicLayer

from tqpatch.config import TurboQuantConfig
from tqpatch.layer_profiles import resolve, text_config
from tqpatch.patch import TQPatchError, is_patched, patch, unpatch
from tqpatch.stats import cache_stats
from tqpatch.store import TurboQuantLayer

BASELINE = "fp"


@dataclass(frozen=True)
class HFQuantizedSetting:
    """transformers' QuantizedCache (quanto backend) as a comparison point.

    key_axis "token" (quanto axis 0: one scale/shift per group of channels of a
    token) or "channel" (axis −1, KIVI-style keys: one scale/shift per channel
    over groups of `group_size` token·head entries). Values are per token. Note
    QuantizedCache re-quantizes all stored tokens each time its full-precision
    window (residual_length) fills up.
    """

    bits: int  # 2 or 4
    key_axis: str = "token"
    residual_length: int = 128
    group_size: int = 32

    KEY_AXES = {"token": 0, "channel": -1}

    def __post_init__(self) -> None:
        if self.bits not in (2, 4):
            raise ValueError(f"QuantizedCache (quanto) supports 2 or 4 bits, got {self.bits}")
        if self.key_axis not in self.KEY_AXES:
            raise ValueError(f"key_axis must be one of {tuple(self.KEY_AXES)}, got {self.key_axis!r}")

    @property
    def name(self) -> str:
        return f"hf-quanto-int{self.bits}-k{self.key_axis}-r{self.residual_length}"

    def make_cache(self, model_config):
        try:
            import optimum.quanto  # noqa: F401
        except ImportError:
            raise RuntimeError("--compare hf-quantized needs optimum-quanto: pip install 'tqpatch[compare]' (or pip install optimum-quanto)") from None
        from transformers.cache_utils import QuantizedCache

        return QuantizedCache(
            backend="quanto",
            config=model_config,
            nbits=self.bits,
            axis_key=self.KEY_AXES[self.key_axis],
            axis_value=0,
            q_group_size=self.group_size,
            residual_length=self.residual_length,
        )


Setting = TurboQuantConfig | HFQuantizedSetting | None  # None = the baseline (model dtype, plain DynamicCache)


@dataclass
class WindowStats:
    """Sums for one (setting, window); what processes exchange."""

    setting: int  # index into the settings list
    window: int
    nll_sum: float
    predicted: int
    compressed_read: float  # Σ_chunks mean_l k_l
    compressed_pairs: float  # Σ_l Σ_chunks c·k_l
    attended_pairs: float  # Σ_l Σ_chunks (c·s_l + c(c+1)/2)
    bits_per_element: float
    compression_ratio: float
    cache_bytes: int
    seconds: float
    kl_sum: float | None = None  # Σ over predicted tokens of KL(baseline ‖ this setting), nats; None: not measured


@dataclass
class PerplexityRow:
    setting: str
    key_bits: float | None
    value_bits: float | None
    key_method: str | None
    residual_length: int
    ppl: float
    delta_ppl: float  # ppl − baseline ppl
    nll_sum: float
    predicted_tokens: int
    compressed_tokens_read: int
    compressed_key_fraction: float
    bits_per_element: float
    compression_ratio: float
    cache_bytes: int  # bytes held at the end of the largest window
    seconds: float
    kl: float | None = None  # mean KL(baseline ‖ this setting) per predicted token, nats (kl=True)


@dataclass
class PerplexityResult:
    model: str
    text_source: str
    window: int
    chunk: int
    tokens: int  # text tokens evaluated (with copy, each counted once though read twice)
    windows: int
    bos_per_window: bool
    dtype: str
    device: str
    processes: int
    copy: bool = False  # each window a passage then the same passage again (long-range copies)
    rows: list[PerplexityRow] = field(default_factory=list)
    # ΔPPL at 3-4 bits moves by ~0.1 points with the torch / transformers versions alone (README, "Bits per layer
    # shipped per model"): compare rows measured with the same versions
    versions: dict = field(default_factory=lambda: {"torch": torch.__version__, "transformers": transformers.__version__})

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        head = (
            f"{self.model} on {self.text_source}: {self.tokens} tokens, {self.windows} windows of {self.window}, "
            f"chunks of {self.chunk}, {self.dtype} on {self.device}" + (", each window a passage read twice" if self.copy else "")
        )
        with_kl = any(r.kl is not None for r in self.rows)
        lines = [
            head,
            f"{'setting':<28} {'resid':>5} {'PPL':>9} {'ΔPPL':>8}" + (f" {'KL (nats)':>10}" if with_kl else "")
            + f" {'bits/elt':>8} {'ratio':>6} {'compressed read':>15} {'cmp key %':>9} {'s':>7}",
        ]
        for r in self.rows:
            kl = "" if not with_kl else f" {'':>10}" if r.kl is None else f" {r.kl:>10.6f}"
            lines.append(
                f"{r.setting:<28} {r.residual_length:>5} {r.ppl:>9.4f} {r.delta_ppl:>+8.4f}{kl} {r.bits_per_element:>8.2f} {r.compression_ratio:>6.2f}"
                f" {r.compressed_tokens_read:>15} {100 * r.compressed_key_fraction:>8.1f}% {r.seconds:>7.1f}"
            )
        return "\n".join(lines)


# -- tokens and windows -----------------------------------------------------------------------
def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front by default (Gemma does, SmolLM2 does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids [N] of `text` (no special tokens), at most `max_tokens` (a prefix of the text is tokenized when that suffices)."""
    if max_tokens is not None:
        prefix = text[: max_tokens * 8]
        ids = tokenizer(prefix, add_special_tokens=False).input_ids
        if len(ids) > max_tokens or len(prefix) == len(text):
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def make_windows(ids: torch.Tensor, window: int, bos_id: int | None = None, copy: bool = False) -> list[torch.Tensor]:
    """Consecutive windows [≤W] of `ids`; with bos_id each window is BOS + W−1 text tokens. A last window shorter than 2 is dropped.

    copy: each window is a passage p of ⌊(W − BOS)/2⌋ consecutive tokens of `ids` followed by p again ([BOS] p p)."""
    step = window - (bos_id is not None)
    if copy:
        step //= 2
    out = []
    for start in range(0, len(ids), step):
        piece = ids[start : start + step]
        if copy:
            piece = torch.cat([piece, piece])
        if bos_id is not None:
            piece = torch.cat([torch.tensor([bos_id]), piece])
        if len(piece) >= 2:
            out.append(piece)
    return out


def shard_windows(num_windows: int, rank: int, world_size: int) -> list[int]:
    """Window indices process `rank` of `world_size` evaluates (strided, so lengths stay balanced); the shards partition range(num_windows)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return list(range(rank, num_windows, world_size))


def check_protocol(window: int, chunk: int) -> None:
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    if window < chunk:
        raise ValueError(f"window ({window}) must be at least the chunk size ({chunk})")


# -- cache accounting -------------------------------------------------------------------------
def _qtensor_nbytes(t) -> int:
    """Bytes behind a (possibly quanto-packed) tensor: packed data + scales + shifts."""
    total = 0
    for name in ("_data", "_scale", "_shift"):
        part = getattr(t, name, None)
        if part is not None:
            total += _qtensor_nbytes(part)
    if total == 0 and isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return total


def layer_counts(cache) -> list[tuple[int, int]]:
    """(compressed, stored) tokens per layer of a DynamicCache (TurboQuant or plain layers) or a QuantizedCache."""
    counts = []
    for layer in cache.layers:
        if isinstance(layer, TurboQuantLayer):
            counts.append((layer.num_compressed, layer.stored_length))
        elif hasattr(layer, "_quantized_keys"):  # transformers' QuantizedLayer
            if not layer.is_initialized:
                counts.append((0, 0))
                continue
            window = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0
            counts.append((layer.cumulative_length - window, layer.cumulative_length))
        elif isinstance(layer, DynamicLayer) and layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4:
            counts.append((0, layer.keys.shape[-2]))
        else:
            counts.append((0, 0))
    return counts


def _hf_quantized_bytes(cache) -> tuple[int, int, int]:
    """(bytes held, bytes in the model dtype, elements) of a QuantizedCache."""
    held = baseline = elements = 0
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        held += _qtensor_nbytes(layer._quantized_keys) + _qtensor_nbytes(layer._quantized_values)
        if layer.keys.dim() == 4:
            held += _qtensor_nbytes(layer.keys) + _qtensor_nbytes(layer.values)
        batch, heads, _, head_dim = layer._quantized_keys.shape
        n = 2 * batch * heads * layer.cumulative_length * head_dim
        elements += n
        baseline += n * torch.empty(0, dtype=layer._quantized_keys.dtype).element_size()
    return held, baseline, elements


def cache_size(cache) -> tuple[float, float, int]:
    """(bits per element, compression ratio, bytes held) of a cache at this point."""
    if hasattr(cache.layers[0], "_quantized_keys"):
        held, baseline, elements = _hf_quantized_bytes(cache)
        return (8 * held / elements if elements else 0.0), (baseline / held if held else 1.0), held
    stats = cache_stats(cache)
    return stats.bits_per_element, stats.compression_ratio, stats.bytes


# -- the protocol -----------------------------------------------------------------------------
def cache_kwarg(model) -> str:
    """Newer transformers name the forward argument `cache`, older 5.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, chunk: int, cache, on_chunk=None, record: list | None = None, reference: list | None = None) -> dict:
    """Feed ids [L] in chunks of `chunk` through `cache`; Σ next-token NLL over the L−1 predicted positions and cache counts.

    record: a list that receives each chunk's next-token log-probabilities [c', V] (float16), to serve as another
    setting's `reference`; with reference (those lists' chunks) the result also holds kl_sum = Σ_t KL(p_ref,t ‖ p_t),
    the reference's float16 log-probabilities renormalised."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    kwarg = cache_kwarg(model)
    num_layers = getattr(text_config(model.config), "num_hidden_layers", 1)
    nll = kl_sum = 0.0
    compressed_read = compressed_pairs = attended_pairs = 0.0
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk]
        c = len(piece)
        counts = layer_counts(cache) or [(0, 0)] * num_layers
        compressed_read += sum(k for k, _ in counts) / len(counts)
        compressed_pairs += sum(c * k for k, _ in counts)
        attended_pairs += sum(c * s + c * (c + 1) / 2 for _, s in counts)
        logits = model(input_ids=piece[None], use_cache=True, **{kwarg: cache}).logits[0].float()  # [c, V]
        targets = ids[start + 1 : start + c + 1]
        logp = torch.log_softmax(logits[: len(targets)], dim=-1)
        nll -= logp.gather(-1, targets[:, None]).sum().item()
        if record is not None:
            record.append(logp.to(torch.float16))
        if reference is not None:
            ref = torch.log_softmax(reference[start // chunk].to(logp.device).float(), dim=-1)
            kl_sum += (ref.exp() * (ref - logp)).sum().item()
        if on_chunk is not None:
            on_chunk()
    sums = {"nll_sum": nll, "predicted": len(ids) - 1, "compressed_read": compressed_read, "compressed_pairs": compressed_pairs, "attended_pairs": attended_pairs}
    return sums | ({"kl_sum": kl_sum} if reference is not None or record is not None else {})


def _run_setting(model, setting: Setting, windows: list[torch.Tensor], indices: list[int], chunk: int, setting_index: int, bar,
                 references: dict | None = None) -> list[WindowStats]:
    """references (kl=True): filled with each window's log-probabilities by the baseline (setting None), read by the rest."""
    if isinstance(setting, TurboQuantConfig):
        patch(model, setting)
    try:
        out = []
        for w in indices:
            start = time.perf_counter()
            cache = setting.make_cache(model.config) if isinstance(setting, HFQuantizedSetting) else DynamicCache(config=model.config)
            kl = {}
            if references is not None:
                kl = {"record": references.setdefault(w, [])} if setting is None else {"reference": references[w]}
            sums = window_nll(model, windows[w], chunk, cache, on_chunk=bar.update if bar is not None else None, **kl)
            bits, ratio, nbytes = cache_size(cache)
            out.append(WindowStats(setting_index, w, bits_per_element=bits, compression_ratio=ratio, cache_bytes=nbytes, seconds=time.perf_counter() - start, **sums))
        return out
    finally:
        if isinstance(setting, TurboQuantConfig):
            unpatch(model)


def _process_group():
    """(rank, world size, gather) from accelerate's PartialState; one process when not launched."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    if state.num_processes == 1:
        return 0, 1, lambda items: items
    return state.process_index, state.num_processes, gather_object


def aggregate(settings: list[Setting], stats: list[WindowStats]) -> list[PerplexityRow]:
    """One row per setting from per-window sums (from any number of processes); delta_ppl is against settings[0]."""
    rows = []
    for i, setting in enumerate(settings):
        mine = sorted((s for s in stats if s.setting == i), key=lambda s: s.window)
        predicted = sum(s.predicted for s in mine)
        nll = sum(s.nll_sum for s in mine)
        if isinstance(setting, TurboQuantConfig):
            name, kb, vb, method, resid = setting.name, setting.key_bits, setting.value_bits, setting.key_method, setting.residual_length
        elif isinstance(setting, HFQuantizedSetting):
            name, kb, vb, method, resid = setting.name, setting.bits, setting.bits, f"quanto-{setting.key_axis}", setting.residual_length
        else:
            name, kb, vb, method, resid = BASELINE, None, None, None, 0
        attended = sum(s.attended_pairs for s in mine)
        # Pooled over windows (a short last window must not weigh like a full one): Σ bytes / Σ elements.
        held = sum(s.cache_bytes for s in mine)
        elements = sum(8 * s.cache_bytes / s.bits_per_element for s in mine if s.bits_per_element)
        baseline_bytes = sum(s.compression_ratio * s.cache_bytes for s in mine)
        kl = [s.kl_sum for s in mine if s.kl_sum is not None]
        rows.append(
            PerplexityRow(
                setting=name,
                key_bits=kb,
                value_bits=vb,
                key_method=method,
                residual_length=resid,
                ppl=math.exp(nll / predicted) if predicted else float("nan"),
                delta_ppl=0.0,
                nll_sum=nll,
                predicted_tokens=predicted,
                compressed_tokens_read=int(round(sum(s.compressed_read for s in mine))),
                compressed_key_fraction=sum(s.compressed_pairs for s in mine) / attended if attended else 0.0,
                bits_per_element=8 * held / elements if elements else 0.0,
                compression_ratio=baseline_bytes / held if held else 1.0,
                cache_bytes=max((s.cache_bytes for s in mine), default=0),
                seconds=sum(s.seconds for s in mine),
                kl=sum(kl) / predicted if kl and len(kl) == len(mine) and predicted else None,
            )
        )
    for row in rows:
        row.delta_ppl = row.ppl - rows[0].ppl
    return rows


def decode_perplexity(
    model,
    tokenizer,
    text: str,
    settings: list[Setting],
    window: int = 2048,
    chunk: int = 32,
    max_tokens: int | None = None,
    model_name: str = "",
    text_source: str = "",
    progress: bool = True,
    on_row=None,
    kl: bool = False,
    copy: bool = False,
) -> PerplexityResult:
    """Decode-faithful PPL of `model` on `text` for the baseline (always measured first, same run) and each setting.

    settings: TurboQuantConfig (the model is patched for that setting and
    unpatched after) or HFQuantizedSetting; None entries are ignored (the
    baseline is added). on_row(result) is called after each setting, with the
    rows so far (for incremental output). kl: also report each setting's mean KL(baseline ‖ setting) per predicted
    token, from the baseline's next-token distributions kept in float16 (tokens × vocabulary × 2 bytes of memory:
    1 GiB per 2,048-token window of Gemma-3's 262k vocabulary). At 4 bits ΔPPL is dominated by a first-order term
    that changes sign and size with every rotation seed; the KL (≈ the second-order term) moves far less between seeds,
    so it ranks settings of one code reliably (README, KL to FP). It is not an estimate of ΔPPL. copy: each window is a
    passage of W/2 tokens read twice (`make_windows`), max_tokens then counting each text token once.
    """
    check_protocol(window, chunk)
    if is_patched(model):
        raise TQPatchError("decode_perplexity patches the model for each setting itself; pass an unpatched model")
    # "-Bt" settings are measured and reported as the bits per layer they take on this model
    settings = [None] + [resolve(s, model.config) if isinstance(s, TurboQuantConfig) else s for s in settings if s is not None]
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    ids = tokenize(tokenizer, text, max_tokens)
    windows = make_windows(ids, window, bos, copy)
    if not windows:
        raise ValueError(f"the text has {len(ids)} tokens: too few for one window")
    rank, world, gather = _process_group()
    indices = shard_windows(len(windows), rank, world)
    total_chunks = len(settings) * sum(math.ceil(len(windows[w]) / chunk) for w in indices)
    result = PerplexityResult(
        model=model_name or type(model).__name__,
        text_source=text_source,
        window=window,
        chunk=chunk,
        tokens=len(ids),
        windows=len(windows),
        bos_per_window=bos is not None,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        device=str(next(model.parameters()).device),
        processes=world,
        copy=copy,
    )
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total_chunks, desc="ppl", unit="chunk")
    stats: list[WindowStats] = []
    references = {} if kl else None
    try:
        for i, setting in enumerate(settings):
            if bar is not None:
                bar.set_description(f"ppl {BASELINE if setting is None else setting.name}")
            stats.extend(gather(_run_setting(model, setting, windows, indices, chunk, i, bar, references)))
            result.rows = aggregate(settings[: i + 1], stats)
            if on_row is not None:
                on_row(result)
    finally:
        if bar is not None:
            bar.close()
    return result

"""How a patched model on CUDA attends on the compressed store without dequantizing it.

The pieces:

1. `enable(modules)` (called by `patch()`): for attention modules whose
   weights are on CUDA, with Triton importable and `sdpa` or `eager`
   attention, the module config's attention implementation becomes
   "tqpatch_sdpa" / "tqpatch_eager": a function registered in transformers'
   AttentionInterface that wraps the original one (and the same mask function,
   registered in AttentionMaskInterface). `disable` restores the original name.
2. `prepare(module, layer)` (called by the hook before each attention call)
   marks the module's `TurboQuantLayer` as fused.
3. On a decode step (one new token, CUDA), `TurboQuantLayer.update` calls
   `fused_update`: it stores the token (the store kernel writes the codes
   straight into the layer's buffers), remembers what the token must attend to
   (compressed parts, full-precision sinks/window/new token) in a snapshot, and
   returns the new token's K/V as a marker instead of dequantizing the cache.
4. The wrapped attention function sees the marker, takes the snapshot and runs
   `tqpatch.kernels.decode_attention` on the packed codes. Any call it cannot
   serve (softcapping, attention sinks, dropout, an unexpected mask) rebuilds
   the dequantized K/V from the snapshot and runs the original function, so
   results never depend on the path. Prefill (more than one query token) and
   every CPU call run the original path unchanged.
5. Keys centered before RoPE (`center_keys`) or query-shaped (`shape_keys`)
   use the kernels too: the store stores A (k - R_p μ) with the store kernel,
   and the decode kernel scores the codes with A⁻¹q (`code_query`) and adds
   ⟨q, R_p μ⟩ (`RopeKeyCodec.rope_bias`) to each compressed score.

6. Score variance (`TurboQuantConfig.score_variance`): a score read from codes
   is the conditional mean ŝ of the true score s given them, with variance σ²
   (`codec.score_variance`: Σ_g w_g(q) ‖k_g‖², from the stored norms); exp is
   convex, so E[exp s | codes] = exp(ŝ + σ²/2) for a Gaussian posterior, and
   each compressed key's logit gets σ²/2 (times scaling²) added. The store notes what it returned (`note_compressed_read`);
   the wrapper, installed on every device for this option, adds the bias to the
   mask (reference path), or hands the decode kernel ½·scaling·w_g(q) per query
   head and group (`norm_bias`), which it multiplies by each token's ‖k_g‖².

`fused_decode(False)` turns the fused path off (a context manager), e.g. to
compare both paths in tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch

from . import kernels
from .codec import Parts, score_variance

_PREFIX = "tqpatch_"
_BASES = ("sdpa", "eager")
_ORIGINAL_ATTR = "_tqpatch_attn_original"
_enabled = True


@contextlib.contextmanager
def fused_decode(enabled: bool):
    """Turn the fused decode path on or off inside a `with` block."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


@dataclass
class _Snapshot:
    """What one decode token attends to: [sinks | compressed | rest], in the mask's column order."""

    layer: object
    key_parts: Parts  # [B, Hkv, L, ...]
    value_parts: Parts
    sink_keys: torch.Tensor | None  # [B, Hkv, S, d]
    sink_values: torch.Tensor | None
    rest_keys: torch.Tensor | None  # [B, Hkv, R, d]: window (+ the new token when prefill_exact)
    rest_values: torch.Tensor | None
    first: int = 0  # sequence index of compressed token 0 (RoPE-centered keys add R_p μ by it)

    @property
    def num_sink(self) -> int:
        return 0 if self.sink_keys is None else self.sink_keys.shape[2]

    @property
    def num_compressed(self) -> int:
        return next(iter(self.key_parts.values())).shape[2]  # every part is [B, Hkv, L, ...]

    def fp(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return _cat(self.sink_keys, self.rest_keys), _cat(self.sink_values, self.rest_values)

    def compressed_read(self) -> "CompressedRead | None":
        """The compressed keys as a CompressedRead where the layer adds their score variance, else None."""
        return CompressedRead(self.layer.key_codec, self.key_parts, self.num_sink) if self.layer.score_variance else None

    def dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layer
        keys = _cat(self.sink_keys, layer._decode(layer.key_codec, self.key_parts, dtype, self.first), self.rest_keys)
        values = _cat(self.sink_values, layer._decode(layer.value_codec, self.value_parts, dtype, self.first), self.rest_values)
        return keys, values


@dataclass
class CompressedRead:
    """The compressed keys one attention call reads: columns first .. first+L-1 of its K (after the sinks)."""

    codec: object
    parts: Parts  # [B, Hkv, L, ...]
    first: int  # column of compressed token 0

    def logit_bias(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """σ²/2 · scaling² [B, Hq, T, L] for queries [B, Hq, T, d]: what exp(logit) gains in expectation."""
        b, hq, t, d = query.shape
        hkv = next(iter(self.parts.values())).shape[1]
        grouped = query.float().reshape(b, hkv, (hq // hkv) * t, d)  # query head h reads KV head h // (Hq/Hkv)
        variance = score_variance(self.codec, grouped, self.parts)
        return (0.5 * scaling * scaling) * variance.view(b, hq, t, -1)

    def add_to_mask(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """The additive mask [B, Hq, T, Lk] (query dtype) = the call's mask (bool, additive or None: causal,
        aligned to the last key) with the logit bias on the compressed columns."""
        b, hq, t, _ = query.shape
        length = key.shape[2]
        bias = self.logit_bias(query, scaling)
        full = query.new_zeros(b, hq, t, length, dtype=torch.float32)
        full[..., self.first : self.first + bias.shape[-1]] = bias
        if mask is None:
            rows = torch.arange(t, device=query.device)[:, None] + (length - t)
            mask = torch.arange(length, device=query.device)[None, :] <= rows  # [T, Lk]
        mask = mask[..., :length]
        if mask.dtype == torch.bool:
            full = full.masked_fill(~mask, torch.finfo(torch.float32).min)
        else:
            full = full + mask.float()
        return full.to(query.dtype)


_pending_read: list = [None]  # (key tensor returned by TurboQuantLayer.update, CompressedRead)


def note_compressed_read(keys: torch.Tensor, read: CompressedRead) -> None:
    """Called by `TurboQuantLayer.update` with the K it returns, for the attention call that follows."""
    _pending_read[0] = (keys, read)


def _take_read(key: torch.Tensor) -> CompressedRead | None:
    pending, _pending_read[0] = _pending_read[0], None
    return pending[1] if pending is not None and pending[0] is key else None


def _cat(*tensors):
    present = [t for t in tensors if t is not None and t.shape[-2] > 0]
    if not present:
        return None
    return present[0] if len(present) == 1 else torch.cat(present, dim=-2)


_pending: list = [None]  # (marker key tensor, snapshot) of the layer whose attention runs next


# -- the store side ------------------------------------------------------------------------------------
def kernel_codec(codec):
    """The codec whose codes the kernels read: a RoPE-centered key codec's inner codec (the kernels store
    k - R_p μ and add ⟨q, R_p μ⟩ to the scores), else the codec itself."""
    return codec.inner if getattr(codec, "uses_positions", False) else codec


def fused_ready(layer, key_states: torch.Tensor) -> bool:
    return (
        _enabled
        and getattr(layer, "fused", False)
        and key_states.shape[-2] == 1
        and layer.num_compressed > 0
        and kernels.kernel_device(key_states)
        and kernels.supports(kernel_codec(layer.key_codec))
        and kernels.supports(kernel_codec(layer.value_codec))
    )


def fused_update(layer, key_states: torch.Tensor, value_states: torch.Tensor):
    """TurboQuantLayer.update for one decode token: store it, return a marker (or None: use the reference path)."""
    if not fused_ready(layer, key_states):
        return None
    layer.cumulative_length += 1
    if layer.prefill_exact:
        snap = _Snapshot(
            layer, layer.compressed_keys.parts, layer.compressed_values.parts, layer.sink_keys, layer.sink_values,
            _cat(layer.window_keys, key_states), _cat(layer.window_values, value_states), layer.compressed_start,
        )
        layer._store(key_states, value_states)
    else:
        layer._store(key_states, value_states)
        snap = _Snapshot(
            layer, layer.compressed_keys.parts, layer.compressed_values.parts, layer.sink_keys, layer.sink_values,
            layer.window_keys, layer.window_values, layer.compressed_start,
        )
    if layer.is_sliding:
        layer._trim_front(layer.stored_length - (layer.sliding_window - 1))
    _pending[0] = (key_states, snap)
    return key_states, value_states


def store_compressed(layer, buffer, codec, x: torch.Tensor) -> None:
    """Append x [B, H, T, d] to a TokenBuffer in compressed form; on CUDA the store kernel writes in place."""
    first = layer.compressed_start + len(buffer)
    if not (getattr(layer, "fused", False) and _enabled and kernels.kernel_device(x) and kernels.supports(kernel_codec(codec))):
        buffer.append(layer._encode(codec, x, first))
        return
    if getattr(codec, "uses_positions", False):
        x, codec = codec.center(x, first), codec.inner
    slots = buffer.reserve(x.shape[2])
    if slots is None:
        buffer.append(kernels.encode(codec, x))
    else:
        kernels.encode_into(codec, x, slots)
        buffer.commit(x.shape[2])


# -- the attention side ----------------------------------------------------------------------------------
def _valid_row(attention_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """[B, Lkv] validity of each cached token for the (single) query, or None for no mask."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 4:
        m = m[:, 0, -1, :]
    elif m.dim() != 2:
        raise ValueError("unsupported mask")
    if m.shape[0] != batch:
        m = m.expand(batch, -1)
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m != 0
    return m


def _fused_attention(module, query, snap: _Snapshot, attention_mask, scaling):
    b, hq, q_len, d = query.shape
    row = _valid_row(attention_mask, b)
    s, n = snap.num_sink, snap.num_compressed
    fp_k, fp_v = snap.fp()
    total = s + n + (0 if snap.rest_keys is None else snap.rest_keys.shape[2])
    valid = fp_valid = None
    if row is not None:
        if row.shape[1] != total:
            return None
        valid = row[:, s : s + n]
        fp_valid = row[:, s + n :] if s == 0 else torch.cat([row[:, :s], row[:, s + n :]], dim=1)
    key_codec = snap.layer.key_codec
    q = query[:, :, 0, :]
    rope_bias = norm_bias = None
    if getattr(key_codec, "has_offset", False):  # ⟨q, R_p μ⟩, evaluated inside the kernel from the shared position table
        rope_bias = key_codec.rope_bias(q, snap.first, rows=max(snap.first + n, kernels.ROPE_TABLE_MIN_ROWS))
    if snap.layer.score_variance:  # σ²/2 = Σ_g ½·scaling·w_g(q) ‖k_g‖² on ⟨q, k̃⟩ (the kernel multiplies by scaling)
        hkv = next(iter(snap.key_parts.values())).shape[1]
        weights = key_codec.variance_weights(q.float().view(b, hkv, hq // hkv, d))  # [B, Hkv, G, groups]
        norm_bias = (0.5 * scaling) * weights.reshape(b, hq, -1)
    out = kernels.decode_attention(
        q, kernel_codec(key_codec), kernel_codec(snap.layer.value_codec), snap.key_parts, snap.value_parts,
        fp_k, fp_v, scaling, valid, fp_valid, out_dtype=query.dtype, rope_bias=rope_bias, norm_bias=norm_bias,
        code_query=key_codec.shape_queries(q) if getattr(key_codec, "shaping", None) is not None else None,
    )
    return out.unsqueeze(1)  # [B, 1, Hq, d], as sdpa/eager return it


def _base_function(name: str, module):
    if name == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"tqpatch: no eager_attention_forward next to {type(module).__name__}")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


def _make_attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        pending = _pending[0]
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        if pending is None or pending[0] is not key:
            read = _take_read(key)
            if read is not None:
                attention_mask = read.add_to_mask(query, key, attention_mask, scaling)
            return _base_function(base, module)(module, query, key, value, attention_mask, **kwargs)
        _pending[0] = None
        snap = pending[1]
        unsupported = (
            query.shape[2] != 1
            or kwargs.get("softcap") is not None
            or kwargs.get("s_aux") is not None
            or kwargs.get("output_attentions", False)
            or (kwargs.get("dropout", 0.0) or 0.0) > 0
        )
        out = None if unsupported else _fused_attention(module, query, snap, attention_mask, scaling)
        if out is None:  # rebuild exactly what the reference path would have returned
            keys, values = snap.dequantized(key.dtype)
            read = snap.compressed_read()
            if read is not None:
                attention_mask = read.add_to_mask(query, keys, attention_mask, scaling)
            return _base_function(base, module)(module, query, keys, values, attention_mask, **kwargs)
        return out, None

    attention.__name__ = f"{_PREFIX}{base}_attention"
    return attention


def _register(base: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = _PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_attention(base))
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        type(ALL_MASK_ATTENTION_FUNCTIONS).register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _on_cuda(module: torch.nn.Module) -> bool:
    return any(kernels.kernel_device(p) for p in module.parameters(recurse=True))


def enable(modules: list[torch.nn.Module], everywhere: bool = False) -> None:
    """Route these attention modules through the wrapper: on CUDA with Triton (fused decode), or on every
    device with `everywhere` (the score-variance bias needs the wrapper on the reference path too)."""
    if not (everywhere or kernels.triton_available()):
        return
    for module in modules:
        config = getattr(module, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if config is None or not (everywhere or _on_cuda(module)):
            continue
        if current is not None and current.startswith(_PREFIX):  # another module sharing this config did it
            setattr(module, _ORIGINAL_ATTR, current[len(_PREFIX) :])
            continue
        base = current or "eager"
        if base not in _BASES:
            continue
        name = _register(base)
        config._attn_implementation_internal = name
        setattr(module, _ORIGINAL_ATTR, base)


def disable(modules: list[torch.nn.Module]) -> None:
    for module in modules:
        base = getattr(module, _ORIGINAL_ATTR, None)
        if base is None:
            continue
        delattr(module, _ORIGINAL_ATTR)
        config = module.config
        if getattr(config, "_attn_implementation", None) == _PREFIX + base:
            config._attn_implementation_internal = base


def prepare(module: torch.nn.Module, layer) -> None:
    """Mark the module's store as fused if its attention runs through the wrapper."""
    base = getattr(module, _ORIGINAL_ATTR, None)
    fused = base is not None and getattr(module.config, "_attn_implementation", None) == _PREFIX + base
    if hasattr(layer, "key_codec"):
        layer.fused = fused

"""cache_stats: what the cache holds, per layer and in total, measured from the stored tensors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .patch import last_cache, self_attention_cache
from .store import TurboQuantLayer


@dataclass
class LayerStats:
    layer: int
    kind: str  # "turboquant", "full-precision" (unpatched or protected layer) or "empty"
    compressed_tokens: int
    full_precision_tokens: int
    bytes: int  # bytes of the stored tokens (codes, norms, channel indices, full-precision sinks/window)
    allocated_bytes: int  # bytes of the tensors behind them, spare append room included
    baseline_bytes: int  # the same tokens' K and V in the model dtype
    elements: int  # K and V coordinates those tokens stand for (tokens x heads x head_dim x 2)


@dataclass
class CacheStats:
    layers: list[LayerStats] = field(default_factory=list)

    def _sum(self, name: str) -> int:
        return sum(getattr(layer, name) for layer in self.layers)

    @property
    def compressed_tokens(self) -> int:
        return self._sum("compressed_tokens")

    @property
    def full_precision_tokens(self) -> int:
        return self._sum("full_precision_tokens")

    @property
    def bytes(self) -> int:
        return self._sum("bytes")

    @property
    def allocated_bytes(self) -> int:
        return self._sum("allocated_bytes")

    @property
    def baseline_bytes(self) -> int:
        return self._sum("baseline_bytes")

    @property
    def compression_ratio(self) -> float:
        return self.baseline_bytes / self.bytes if self.bytes else 1.0

    @property
    def bits_per_element(self) -> float:
        """True average bits per cached K/V coordinate, everything stored included."""
        elements = self._sum("elements")
        return 8 * self.bytes / elements if elements else 0.0

    def to_json(self) -> dict:
        totals = {
            name: getattr(self, name)
            for name in ("compressed_tokens", "full_precision_tokens", "bytes", "allocated_bytes", "baseline_bytes", "compression_ratio", "bits_per_element")
        }
        return {"total": totals, "layers": [asdict(layer) for layer in self.layers]}


def _layer_stats(index: int, layer) -> LayerStats:
    if isinstance(layer, TurboQuantLayer):
        if not layer.is_initialized or layer.stored_length == 0:
            return LayerStats(index, "empty", 0, 0, 0, 0, 0, 0)
        mem = layer.memory()
        ref = layer.window_keys if layer.window_keys is not None else layer.sink_keys
        if ref is not None:
            batch, heads, _, head_dim = ref.shape
        else:
            batch, heads = layer.compressed_keys.parts[next(iter(layer.compressed_keys.parts))].shape[:2]
            head_dim = layer.key_codec.head_dim
        tokens = layer.stored_length
        element_size = torch.empty(0, dtype=layer.dtype).element_size()
        elements = 2 * batch * heads * tokens * head_dim
        return LayerStats(
            layer=index,
            kind="turboquant",
            compressed_tokens=mem["compressed_tokens"],
            full_precision_tokens=mem["full_precision_tokens"],
            bytes=mem["compressed_bytes"] + mem["full_precision_bytes"],
            allocated_bytes=mem["allocated_bytes"],
            baseline_bytes=elements * element_size,
            elements=elements,
        )
    if isinstance(layer, DynamicLayer) and layer.is_initialized and layer.keys is not None and layer.keys.numel():
        nbytes = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        return LayerStats(index, "full-precision", 0, layer.keys.shape[-2], nbytes, nbytes, nbytes, layer.keys.numel() + layer.values.numel())
    return LayerStats(index, "empty", 0, 0, 0, 0, 0, 0)


def cache_stats(model_or_cache) -> CacheStats:
    """Per-layer and total token counts and bytes of a cache, or of the cache a patched model used last."""
    cache = model_or_cache
    if isinstance(model_or_cache, torch.nn.Module):
        cache = last_cache(model_or_cache)
        if cache is None:
            raise ValueError("this model has no live cache to report on: run a forward/generate with use_cache=True first (and keep its cache alive)")
    cache = self_attention_cache(cache)
    return CacheStats(layers=[_layer_stats(i, layer) for i, layer in enumerate(cache.layers)])


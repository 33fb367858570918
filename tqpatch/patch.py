"""patch(model, config) / unpatch(model): route every self-attention layer's K/V into TurboQuant stores.

How it works: each self-attention module gets an accelerate `ModelHook`
(chained after any device-placement hook with `append=True`). Before the
module runs, the hook looks at the cache transformers passes it (`cache` in
newer 5.x releases, `past_key_values` in older ones) and makes sure that
cache's layer for this module is a `TurboQuantLayer`, created on the first
K/V it sees (so on that module's device under device_map="auto"). The
attention code then calls `cache.update(...)` as usual and gets the
compressed store's K/V back. Whichever cache object is used, generate()'s own
DynamicCache or one the user made, its full-precision layers are replaced,
so no full-precision copy of compressed tokens remains.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from accelerate.hooks import ModelHook, SequentialHook, add_hook_to_module, remove_hook_from_module
from transformers.cache_utils import Cache, DynamicLayer, EncoderDecoderCache

from . import attention, layer_profiles
from .codec import make_codec
from .config import TurboQuantConfig
from .store import TurboQuantLayer

SUPPORTED = "decoder self-attention with a per-layer K/V cache (multi-head, GQA/MQA, sliding-window and hybrid sliding/global layers)"
_STATE_ATTR = "_tqpatch_state"


class TQPatchError(ValueError):
    """A model or cache tqpatch cannot handle; the message says what is supported."""


@dataclass
class PatchState:
    config: TurboQuantConfig
    modules: list[torch.nn.Module] = field(default_factory=list)
    last_cache: weakref.ReferenceType | None = None
    query_hooks: list = field(default_factory=list)  # handles of the forward hooks `shape_keys` reads queries with


def _cache_of_call(kwargs: dict) -> tuple[str | None, object]:
    for name in ("cache", "past_key_values", "past_key_value"):
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def self_attention_cache(cache: object) -> Cache:
    """The Cache whose layers hold self-attention K/V, or a clear error for caches tqpatch cannot wrap."""
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    if not isinstance(cache, Cache):
        raise TQPatchError(
            f"tqpatch cannot wrap a cache of type {type(cache).__name__}; pass a transformers DynamicCache (or none: generate() makes one)"
        )
    if getattr(cache, "offloading", False):
        raise TQPatchError("tqpatch cannot wrap an offloading cache; create the DynamicCache with offloading=False")
    layers = getattr(cache, "layers", None)
    if layers is None or (layers and not all(isinstance(layer, (DynamicLayer, TurboQuantLayer)) or type(layer).__name__ == "DummyLayer" for layer in layers)):
        kinds = sorted({type(layer).__name__ for layer in layers or []})
        raise TQPatchError(
            f"tqpatch cannot wrap {type(cache).__name__} (layers: {', '.join(kinds) or 'none'}); "
            "supported: DynamicCache with full or sliding-window attention layers"
        )
    return cache


def make_layer(cfg: TurboQuantConfig, head_dim: int, key_bits: float, value_bits: float, sliding_window: int | None = None) -> TurboQuantLayer:
    """The TurboQuantLayer a patched attention module stores its K/V in (codecs, window, sinks from `cfg`).

    `shape_keys` applies to full-attention layers only: a sliding-window layer holds at most its window
    (512 tokens on Gemma 3), against which the stored d×d map costs too much (measured: README); so does
    `key_split` and `value_split`, which also skip protected layers (they store their own bits).
    `shape_sliding_keys` shapes sliding-window layers with a diagonal map instead (d numbers per head)."""
    diagonal = cfg.shape_sliding_keys and sliding_window is not None
    shape = cfg.shape_keys and (sliding_window is None or diagonal)
    split = cfg.key_split if shape and not diagonal and key_bits == cfg.key_bits else None
    value_split = cfg.value_split if sliding_window is None and value_bits == cfg.value_bits else None  # B costs as A does

    def make_key_codec():
        return make_codec(
            head_dim, key_bits, cfg.key_method, cfg.seed, cfg.center_keys, cfg.outlier_step, cfg.rotation_candidates,
            rope=True, shape=shape, norm_bits=cfg.norm_bits, split=split, unbiased=cfg.unbias_keys, diagonal=diagonal,
            prior=cfg.shape_prior, split_rotations=cfg.key_split_rotations, trellis=cfg.trellis_keys, norm_margin=cfg.norm_margin,
        )

    def make_value_codec():
        return make_codec(
            head_dim, value_bits, "mse", cfg.seed, cfg.center_values, cfg.outlier_step, cfg.rotation_candidates, norm_bits=cfg.norm_bits,
            split=value_split, unbiased=cfg.unbias_values, trellis=cfg.trellis_values, norm_margin=cfg.norm_margin,
        )

    return TurboQuantLayer(
        key_codec=make_key_codec(),
        refit_tokens=cfg.refit_tokens,
        make_key_codec=make_key_codec,
        make_value_codec=make_value_codec if cfg.refit_values else None,
        value_codec=make_value_codec(),
        residual_length=cfg.residual_length,
        sink_tokens=cfg.sink_tokens,
        sliding_sinks=cfg.sliding_sinks,
        prefill_exact=cfg.prefill_exact,
        sliding_window=sliding_window,
        score_variance=cfg.score_variance,
    )


class TurboQuantHook(ModelHook):
    """Installs this attention module's TurboQuantLayer into the cache of each call."""

    def __init__(self, config: TurboQuantConfig, layer_idx: int, num_layers: int, state: PatchState):
        self.config = config
        self.layer_idx = layer_idx
        self.bits = config.layer_bits(layer_idx, num_layers)
        self._state = weakref.ref(state)
        self._calibrating: TurboQuantLayer | None = None  # the layer of the current call while it wants queries
        self._kv_heads = 1

    def new_layer(self, head_dim: int, sliding_window: int | None) -> TurboQuantLayer:
        return make_layer(self.config, head_dim, *self.bits, sliding_window)

    def install(self, cache: Cache, head_dim: int) -> None:
        layers = cache.layers
        while len(layers) <= self.layer_idx:
            if cache.layer_class_to_replicate is None:
                raise TQPatchError(f"the cache has {len(layers)} layers but attention layer {self.layer_idx} was called")
            layers.append(cache.layer_class_to_replicate())
        layer = layers[self.layer_idx]
        if isinstance(layer, TurboQuantLayer) or self.bits is None:
            return
        if type(layer).__name__ == "DummyLayer" or not isinstance(layer, DynamicLayer):
            raise TQPatchError(f"layer {self.layer_idx} of the cache is a {type(layer).__name__}; supported: {SUPPORTED}")
        sliding = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
        store = self.new_layer(head_dim, sliding)
        if layer.get_seq_length() > 0:
            # A cache filled before patching (or by a protected pass): compress what it holds.
            store.update(layer.keys, layer.values)
            store.cumulative_length = layer.get_seq_length()
        layers[self.layer_idx] = store

    def pre_forward(self, module, *args, **kwargs):
        _, cache = _cache_of_call(kwargs)
        if cache is not None:
            cache = self_attention_cache(cache)
            head_dim = getattr(module, "head_dim", None) or module.config.hidden_size // module.config.num_attention_heads
            self.install(cache, head_dim)
            if self.bits is not None:
                layer = cache.layers[self.layer_idx]
                if kwargs.get("position_embeddings") is not None:
                    layer.observe_rope(*kwargs["position_embeddings"])
                self._calibrating = layer if layer.wants_queries else None
                if self._calibrating is not None:  # only until the first encode, not on every decode step
                    self._kv_heads = getattr(module.config, "num_key_value_heads", None) or module.config.num_attention_heads
                attention.prepare(module, layer)
            state = self._state()
            if state is not None:
                state.last_cache = weakref.ref(cache)
        return args, kwargs

    def observe_queries(self, projection, inputs, output) -> None:
        """Forward hook on the attention's query projection (or its q_norm): pre-RoPE queries for `shape_keys`."""
        layer, self._calibrating = self._calibrating, None
        if layer is not None and isinstance(output, torch.Tensor):
            head_dim = layer.key_codec.head_dim
            if output.dim() >= 3 and output.shape[-1] % head_dim == 0:
                layer.observe_queries(output.reshape(*output.shape[:2], -1, head_dim), self._kv_heads)


def query_module(attention_module: torch.nn.Module) -> torch.nn.Module | None:
    """The submodule whose output is the pre-RoPE query: `q_norm` where the model normalises queries, else `q_proj`."""
    for name in ("q_norm", "q_proj"):
        found = getattr(attention_module, name, None)
        if isinstance(found, torch.nn.Module):
            return found
    return None


def find_attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Self-attention modules: classes named *Attention with an integer `layer_idx`, not cross-attention."""
    config = getattr(model, "config", None)
    text_config = layer_profiles.text_config(config)
    if text_config is not None and getattr(text_config, "kv_lora_rank", None):
        raise TQPatchError(f"multi-head latent attention (MLA, model type {text_config.model_type!r}) is not supported; supported: {SUPPORTED}")
    found, cross = [], 0
    for name, module in model.named_modules():
        if not type(module).__name__.endswith("Attention") or not isinstance(getattr(module, "layer_idx", None), int):
            continue
        if getattr(module, "is_cross_attention", False) or "crossattention" in name.replace("_", "").lower():
            cross += 1
            continue
        found.append((name, module))
    if not found:
        reason = "only cross-attention modules were found" if cross else "no self-attention modules (a class named *Attention with a layer_idx) were found"
        raise TQPatchError(f"cannot patch {type(model).__name__}: {reason}; supported: {SUPPORTED}")
    layer_types = getattr(text_config, "layer_types", None) or []
    recurrent = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention", "chunked_attention")})
    if recurrent:
        raise TQPatchError(f"cannot patch {type(model).__name__}: it has recurrent/SSM layers ({', '.join(recurrent)}); supported: {SUPPORTED}")
    return found


def patch(model: torch.nn.Module, config: TurboQuantConfig | str | None = None) -> torch.nn.Module:
    """Compress the KV cache of `model` in place with TurboQuant; returns the model.

    config: a TurboQuantConfig, a preset name ("k4v4", "3.5bit+", ...) or spec ("k4v3-s4-ck-qs-n8-sv",
    `TurboQuantConfig.from_spec`), or None for k4v4.
    """
    if getattr(model, _STATE_ATTR, None) is not None:
        raise TQPatchError("this model is already patched by tqpatch; call tqpatch.unpatch(model) first")
    if config is None:
        config = TurboQuantConfig()
    elif isinstance(config, str):
        config = TurboQuantConfig.from_spec(config)
    elif not isinstance(config, TurboQuantConfig):
        raise TypeError(f"config must be a TurboQuantConfig or a preset name, got {type(config).__name__}")
    modules = find_attention_modules(model)
    config = layer_profiles.resolve(config, getattr(model, "config", None))  # "-Bt": the model's shipped bits per layer
    num_layers = max(module.layer_idx for _, module in modules) + 1
    named = set(config.protected_layers) | {layer for layer, _, _ in config.layer_bits_overrides}
    if named and max(named) >= num_layers:
        raise TQPatchError(f"the setting names layer(s) {sorted(i for i in named if i >= num_layers)} but this model's attention layers are 0..{num_layers - 1}")
    protected = sorted(layer for layer, _, _ in config.layer_bits_overrides if config.is_protected(layer, num_layers))
    if protected:
        raise TQPatchError(f"layer(s) {protected} are protected (protect_first / protect_last) and given other bits: choose one")
    state = PatchState(config=config)
    for _, module in modules:
        hook = TurboQuantHook(config, module.layer_idx, num_layers, state)
        add_hook_to_module(module, hook, append=True)
        state.modules.append(module)
        projection = query_module(module) if config.shape_keys else None
        if projection is not None:
            state.query_hooks.append(projection.register_forward_hook(hook.observe_queries))
    setattr(model, _STATE_ATTR, state)
    attention.enable([m for m in state.modules if config.layer_bits(m.layer_idx, num_layers) is not None], everywhere=config.score_variance)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Remove tqpatch's hooks (and only those); the model computes exactly as before patch()."""
    state: PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise TQPatchError("this model is not patched by tqpatch")
    attention.disable(state.modules)
    for handle in state.query_hooks:
        handle.remove()
    for module in state.modules:
        hook = getattr(module, "_hf_hook", None)
        if isinstance(hook, TurboQuantHook):
            remove_hook_from_module(module)
        elif isinstance(hook, SequentialHook):
            others = [h for h in hook.hooks if not isinstance(h, TurboQuantHook)]
            module._hf_hook = others[0] if len(others) == 1 else SequentialHook(*others)
    delattr(model, _STATE_ATTR)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def patched_config(model: torch.nn.Module) -> TurboQuantConfig | None:
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else state.config


def last_cache(model: torch.nn.Module) -> Cache | None:
    """The cache the patched model's attention layers saw last (None if none is alive)."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None or state.last_cache is None:
        return None
    return state.last_cache()

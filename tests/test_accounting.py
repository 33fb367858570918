"""cache_stats: bytes held equal the config's formula, and nothing else holds the tokens."""

import math

import pytest
import torch
from transformers import DynamicCache

import tqpatch
from tqpatch.codec import SplitCodec, TurboQuantCodec
from tqpatch.config import split_bits
from tqpatch.store import TurboQuantLayer
from tiny_models import prompt, tiny_model

FP16_BYTES = 2


def formula_bytes_per_vector(head_dim: int, bits: float, method: str, norm_bits: int = 16) -> float:
    """Stored bytes of one K or V vector of one head, from the config alone (prod residual norms stay fp16)."""
    norm_bytes = norm_bits // 8
    outliers, hi, lo = split_bits(bits, head_dim)
    if outliers:
        return math.ceil(outliers * hi / 8) + math.ceil((head_dim - outliers) * lo / 8) + 2 * norm_bytes
    if method == "prod":
        return math.ceil(head_dim * (bits - 1) / 8) + norm_bytes + math.ceil(head_dim / 8) + FP16_BYTES
    return math.ceil(head_dim * bits / 8) + norm_bytes


CASES = [
    tqpatch.TurboQuantConfig(key_bits=4, value_bits=4),
    tqpatch.TurboQuantConfig(key_bits=3, value_bits=2),
    tqpatch.TurboQuantConfig(key_bits=3, value_bits=2, key_method="prod"),
    tqpatch.TurboQuantConfig(key_bits=2.5, value_bits=3.5),
    tqpatch.TurboQuantConfig(key_bits=2, value_bits=2, residual_length=16, sink_tokens=4),
    tqpatch.TurboQuantConfig(key_bits=4, value_bits=4, norm_bits=8),
    tqpatch.TurboQuantConfig(key_bits=2.5, value_bits=3, key_method="mse", norm_bits=8),
    tqpatch.TurboQuantConfig(key_bits=3, value_bits=2, key_method="prod", norm_bits=8),
]


@pytest.mark.parametrize("config", CASES, ids=lambda c: c.name)
def test_bytes_per_token_per_layer_match_formula(config):
    model = tiny_model("qwen3")  # head_dim 16 x 2 KV heads; a long enough sequence that the split's indices are small
    tqpatch.patch(model, config)
    cache = DynamicCache(config=model.config)
    tokens, batch, heads = 300, 2, model.config.num_key_value_heads
    with torch.no_grad():
        model(prompt(batch=batch, length=tokens), past_key_values=cache)
        for t in range(5):  # decode appends, so the buffers grow with spare room
            model(prompt(batch=batch, length=1, seed=t), past_key_values=cache)
    tokens += 5
    head_dim = model.config.head_dim
    fp_tokens = config.residual_length + config.sink_tokens
    per_token = heads * batch * (
        formula_bytes_per_vector(head_dim, config.key_bits, config.key_method, config.norm_bits)
        + formula_bytes_per_vector(head_dim, config.value_bits, "mse", config.norm_bits)
    )
    fp_per_token = heads * batch * 2 * head_dim * 4  # fp32 model
    stats = tqpatch.cache_stats(cache)
    for layer in stats.layers:
        expected = (tokens - fp_tokens) * per_token + fp_tokens * fp_per_token
        assert layer.compressed_tokens == tokens - fp_tokens and layer.full_precision_tokens == fp_tokens
        assert layer.bytes == pytest.approx(expected, rel=0.02)
        assert layer.bytes <= layer.allocated_bytes <= 1.15 * layer.bytes
        assert layer.baseline_bytes == tokens * fp_per_token


def test_layer_bits_overrides_store_those_layers_at_their_bits():
    """-B<i>k<K>v<V>: the named layers store exactly the formula's bytes at their own bits, the rest at the setting's."""
    model = tiny_model("qwen3")
    config = tqpatch.TurboQuantConfig.from_spec("k4v4-B0k5v4-B1k2.5v3")
    tqpatch.patch(model, config)
    cache = DynamicCache(config=model.config)
    tokens, heads, head_dim = 64, model.config.num_key_value_heads, model.config.head_dim
    with torch.no_grad():
        model(prompt(length=tokens), past_key_values=cache)
    stats = tqpatch.cache_stats(cache)
    expected_bits = {0: (5, 4), 1: (2.5, 3)}
    for layer in stats.layers:
        key_bits, value_bits = expected_bits.get(layer.layer, (4, 4))
        per_token = heads * (formula_bytes_per_vector(head_dim, key_bits, "mse") + formula_bytes_per_vector(head_dim, value_bits, "mse"))
        assert layer.bytes == pytest.approx(tokens * per_token, rel=0.02), layer.layer
    assert stats.layers[0].bytes != stats.layers[2].bytes != stats.layers[1].bytes


def _tensor_bytes_reachable(obj, seen=None) -> int:
    """Bytes of every distinct tensor storage reachable from obj through attributes, dicts, lists and tuples.

    Codecs are skipped: they hold per-device constants (Π, centroids) that do not grow with the sequence.
    """
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (TurboQuantCodec, SplitCodec)):
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        key = ("storage", obj.untyped_storage().data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes_reachable(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(_tensor_bytes_reachable(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        return sum(_tensor_bytes_reachable(v, seen) for v in vars(obj).values())
    return 0


def test_no_hidden_full_precision_copy_anywhere():
    model = tiny_model("llama")
    tqpatch.patch(model, "k2v2")
    out = model.generate(prompt(length=200), max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    stats = tqpatch.cache_stats(cache)
    reachable = _tensor_bytes_reachable(cache)
    # Everything the cache object holds, transformers' own attributes included, is what cache_stats counts
    # (codes, norms, spare append room); a full-precision copy of the 209 tokens would be 4.4x all of it.
    assert reachable == stats.allocated_bytes
    assert stats.baseline_bytes > 4 * reachable
    for layer in cache.layers:
        assert isinstance(layer, TurboQuantLayer)
        assert layer.keys is None and layer.values is None


def test_stats_need_a_live_cache():
    model = tiny_model("llama")
    tqpatch.patch(model, "k4v4")
    with pytest.raises(ValueError, match="no live cache"):
        tqpatch.cache_stats(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt(), past_key_values=cache)
    assert tqpatch.cache_stats(model).compressed_tokens == tqpatch.cache_stats(cache).compressed_tokens > 0


def test_token_buffer_spare_room_is_bounded():
    """Growing after a long prefill adds at most MAX_SPARE tokens of room (12.5% of 32k would cost a card ~4k tokens per layer)."""
    from tqpatch.store import TokenBuffer

    for prefill, spare in ((10, TokenBuffer.MIN_SPARE), (800, 100), (4000, TokenBuffer.MAX_SPARE)):
        buffer = TokenBuffer()
        buffer.append({"codes": torch.zeros(1, 2, prefill, 4, dtype=torch.uint8)})
        buffer.append({"codes": torch.ones(1, 2, 1, 4, dtype=torch.uint8)})
        assert buffer._storage["codes"].shape[2] == prefill + 1 + spare
        assert torch.equal(buffer.parts["codes"][:, :, -1], torch.ones(1, 2, 4, dtype=torch.uint8))
        assert buffer.nbytes_allocated == (prefill + 1 + spare) * 8


def test_sink_tokens_do_not_pin_the_prefill_tensors():
    """The exact sink tokens are copied out: a view would keep the caller's whole prefill K/V alive (found on the H200:
    k4v4+ held 5 GiB per sequence at 32k instead of 1)."""
    from tqpatch.codec import TurboQuantCodec
    from tqpatch.store import TurboQuantLayer

    layer = TurboQuantLayer(TurboQuantCodec(64, 4), TurboQuantCodec(64, 4), sink_tokens=4)
    keys, values = torch.randn(2, 3, 500, 64), torch.randn(2, 3, 500, 64)
    layer.update(keys, values)
    for t in (layer.sink_keys, layer.sink_values):
        assert t.shape[2] == 4
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
        assert t.untyped_storage().data_ptr() not in (keys.untyped_storage().data_ptr(), values.untyped_storage().data_ptr())


@pytest.mark.parametrize("sliding_sinks", [False, True])
def test_sliding_layer_keeps_its_sinks_exact_only_while_its_window_shows_them(sliding_sinks):
    """With sliding_sinks a sliding-window layer returns the first tokens exact until they leave its window, then
    drops them first (nothing is held for them after); without it they are compressed like the rest."""
    torch.manual_seed(0)
    window, sinks = 12, 3
    layer = TurboQuantLayer(TurboQuantCodec(16, 2), TurboQuantCodec(16, 2), sink_tokens=sinks, sliding_sinks=sliding_sinks,
                            prefill_exact=False, sliding_window=window)
    keys = torch.randn(1, 2, 30, 16)
    for t in range(30):
        out, _ = layer.update(keys[:, :, t : t + 1], keys[:, :, t : t + 1])
        first = t + 1 - out.shape[2]  # the sequence index of the first token returned
        assert first == max(t + 1 - window, 0)  # the window - 1 tokens held, and the new one
        visible_sinks = min(max(sinks - first, 0), out.shape[2])
        exact = torch.equal(out[:, :, :visible_sinks], keys[:, :, first : first + visible_sinks])
        assert exact == (sliding_sinks or visible_sinks == 0), t
        held_sinks = min(max(sinks - max(t + 2 - window, 0), 0), t + 1)  # after the trim: the window - 1 newest
        assert layer.num_sink == (held_sinks if sliding_sinks else 0)
    assert layer.memory()["full_precision_tokens"] == 0 and layer.stored_length == window - 1


def test_sliding_sinks_need_sink_tokens():
    with pytest.raises(ValueError, match="sink_tokens"):
        tqpatch.TurboQuantConfig(sliding_sinks=True)
    assert tqpatch.TurboQuantConfig.from_spec("k4v4-s4-ss").sliding_sinks
    assert tqpatch.TurboQuantConfig.from_spec("k4v4-s4-ss").name == "k4v4-s4-ss"

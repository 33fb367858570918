"""patch() on tiny random models of each supported architecture."""

import pytest
import torch
from transformers import DynamicCache

import tqpatch
from tqpatch.store import TurboQuantLayer
from tiny_models import BUILDERS, prompt, tiny_model

ARCHS = list(BUILDERS)


def greedy(model, ids, new_tokens=30, **kwargs):
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)


def cache_of(out):
    return getattr(out, "cache", None) or out.past_key_values


@pytest.mark.parametrize("arch", ARCHS)
def test_8_bits_generates_the_same_greedy_tokens(arch):
    model = tiny_model(arch)
    ids = prompt()
    reference = greedy(model, ids)
    tqpatch.patch(model, "k8v8")
    out = greedy(model, ids, return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference)
    stats = tqpatch.cache_stats(cache_of(out))
    assert stats.compressed_tokens > 0
    assert all(layer.kind == "turboquant" for layer in stats.layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_2_bits_changes_outputs_and_compresses(arch):
    model = tiny_model(arch)
    ids = prompt(length=40)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids[:, :32], past_key_values=cache)
        reference = model(ids[:, 32:], past_key_values=cache).logits
        tqpatch.patch(model, "k2v2")
        cache = DynamicCache(config=model.config)
        model(ids[:, :32], past_key_values=cache)
        compressed = model(ids[:, 32:], past_key_values=cache).logits
    relative = (compressed - reference).norm() / reference.norm()
    assert relative > 1e-3, f"2-bit cache changed the logits by only {relative:.2e}: was anything compressed?"
    stats = tqpatch.cache_stats(cache)
    assert stats.compressed_tokens > 0
    assert stats.bytes < stats.baseline_bytes / 4
    head_dim = cache.layers[0].key_codec.head_dim
    assert stats.bits_per_element == pytest.approx(2 + 16 / head_dim)  # codes + one fp16 norm per vector


@pytest.mark.parametrize("arch", ARCHS)
def test_unpatch_restores_bit_identical_outputs(arch):
    model = tiny_model(arch)
    ids = prompt(length=20)
    with torch.no_grad():
        before = model(ids).logits
        tqpatch.patch(model, "k2v2")
        tqpatch.unpatch(model)
        cache = DynamicCache(config=model.config)
        after = model(ids, past_key_values=cache).logits
    assert torch.equal(before, after)
    assert not any(isinstance(layer, TurboQuantLayer) for layer in cache.layers)
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())


def test_gemma3_sliding_layers_keep_only_their_window():
    model = tiny_model("gemma3")
    tqpatch.patch(model, "k4v4")
    out = greedy(model, prompt(length=12), new_tokens=20, return_dict_in_generate=True)
    cache = cache_of(out)
    total = 12 + 20 - 1
    window = model.config.sliding_window
    for layer, kind in zip(cache.layers, model.config.layer_types):
        assert isinstance(layer, TurboQuantLayer)
        if kind == "sliding_attention":
            assert layer.is_sliding and layer.stored_length == window - 1
        else:
            assert not layer.is_sliding and layer.stored_length == total
        assert layer.get_seq_length() == total


def test_gemma3_sliding_matches_unpatched_at_8_bits_past_the_window():
    # Past the window, the sliding layers must mask exactly like transformers' own sliding layer.
    model = tiny_model("gemma3")
    ids = prompt(length=5)
    reference = greedy(model, ids, new_tokens=40)
    tqpatch.patch(model, tqpatch.TurboQuantConfig(key_bits=8, value_bits=8, prefill_exact=False))
    assert torch.equal(greedy(model, ids, new_tokens=40), reference)


def test_gemma3_sliding_sinks_stay_exact_in_the_window_and_mask_right_past_it():
    """sliding_sinks: the sliding layers return the first tokens exact while their window (8) shows them and drop them
    first after; past the window 8-bit codes give the unpatched model's tokens, as without the option."""
    model = tiny_model("gemma3")
    ids = prompt(length=5)
    reference = greedy(model, ids, new_tokens=40)
    tqpatch.patch(model, tqpatch.TurboQuantConfig.from_spec("k8v8-s2-ss-q"))
    try:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, past_key_values=cache)
        sliding = [layer for layer, kind in zip(cache.layers, model.config.layer_types) if kind == "sliding_attention"]
        assert all(layer.num_sink == 2 and layer.num_compressed == 3 for layer in sliding)
        assert torch.equal(greedy(model, ids, new_tokens=40), reference)
        with torch.no_grad():
            for t in range(10):
                model(prompt(length=1, seed=t), past_key_values=cache)
        assert all(layer.num_sink == 0 and layer.stored_length == model.config.sliding_window - 1 for layer in sliding)
    finally:
        tqpatch.unpatch(model)


def test_sliding_sinks_change_nothing_without_sliding_layers():
    model = tiny_model("llama")
    ids = prompt(length=20)
    outputs = []
    for spec in ("k3v2-s4-ck-q", "k3v2-s4-ss-ck-q"):
        tqpatch.patch(model, spec)
        try:
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                outputs.append(torch.cat([model(ids[:, s : s + 5], past_key_values=cache).logits for s in range(0, 20, 5)], dim=1))
        finally:
            tqpatch.unpatch(model)
    assert torch.equal(outputs[0], outputs[1])


def test_rotation_search_runs_inside_a_patched_model():
    model = tiny_model("llama")
    tqpatch.patch(model, tqpatch.TurboQuantConfig.from_spec("k2v2-rc4"))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt(length=24), past_key_values=cache)
        model(prompt(length=1, seed=5), past_key_values=cache)
    for layer in cache.layers:
        assert layer.key_codec.chosen in range(4) and layer.value_codec.chosen in range(4)
    assert tqpatch.cache_stats(cache).compressed_tokens == 25 * model.config.num_hidden_layers

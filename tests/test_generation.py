"""Generation features through a patched model: padding, sampling, beams, crop, continuation, long prompts."""

import gc
import weakref

import pytest
import torch
from transformers import DynamicCache

import tqpatch
from tqpatch.store import TurboQuantLayer
from tiny_models import prompt, tiny_model


def cache_of(out):
    return getattr(out, "cache", None) or out.past_key_values


@pytest.fixture
def llama():
    return tiny_model("llama")


def test_batch_with_left_padding_matches_unpatched(llama):
    ids = prompt(batch=3, length=14)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[2, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    reference = llama.generate(ids, **kwargs)
    tqpatch.patch(llama, "k8v8")
    assert torch.equal(llama.generate(ids, **kwargs), reference)


def test_sampling_runs_compressed_and_is_seeded(llama):
    tqpatch.patch(llama, "k3v2")
    ids = prompt()
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        out = llama.generate(ids, max_new_tokens=15, do_sample=True, top_k=20, return_dict_in_generate=True)
        outs.append(out.sequences)
        assert tqpatch.cache_stats(cache_of(out)).compressed_tokens > 0
    assert torch.equal(outs[0], outs[1])


def test_beam_search_matches_unpatched_at_8_bits(llama):
    ids = prompt(length=10)
    kwargs = dict(max_new_tokens=12, num_beams=3, num_return_sequences=2, do_sample=False)
    reference = llama.generate(ids, **kwargs)
    tqpatch.patch(llama, "k8v8")
    assert torch.equal(llama.generate(ids, **kwargs), reference)


def test_prompt_lookup_decoding_crops_the_cache(llama, monkeypatch):
    ids = torch.cat([prompt(length=8)] * 3, dim=1)  # repetitive, so candidates get proposed (and some rejected)
    kwargs = dict(max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=4)
    reference = llama.generate(ids, **kwargs)
    crops = []
    original = TurboQuantLayer.crop
    monkeypatch.setattr(TurboQuantLayer, "crop", lambda self, n: (crops.append(n), original(self, n))[1])
    tqpatch.patch(llama, "k8v8")
    assert torch.equal(llama.generate(ids, **kwargs), reference)
    assert any(n < 0 for n in crops), "assisted decoding never rejected a candidate; the test did not exercise crop"


def test_crop_removes_window_then_compressed_tokens():
    llama = tiny_model("llama")
    tqpatch.patch(llama, tqpatch.TurboQuantConfig(key_bits=4, value_bits=4, residual_length=4, sink_tokens=2))
    cache = DynamicCache(config=llama.config)
    with torch.no_grad():
        llama(prompt(length=20), past_key_values=cache)
    layer = cache.layers[0]
    assert (layer.num_sink, layer.num_compressed, layer.num_window) == (2, 14, 4)
    cache.crop(-6)
    assert (layer.num_sink, layer.num_compressed, layer.num_window) == (2, 12, 0)
    assert cache.get_seq_length() == 14
    with pytest.raises(RuntimeError, match="cannot crop"):
        layer.crop(-100)


def test_continuing_generation_on_a_returned_cache(llama):
    ids = prompt(length=10)
    full_reference = llama.generate(ids, max_new_tokens=20, do_sample=False)
    tqpatch.patch(llama, "k8v8")
    first = llama.generate(ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    cache = cache_of(first)
    assert isinstance(cache.layers[0], TurboQuantLayer)
    second = llama.generate(first.sequences, past_key_values=cache, max_new_tokens=10, do_sample=False)
    assert torch.equal(second, full_reference)


def test_user_made_dynamic_cache_in_a_forward_call(llama):
    tqpatch.patch(llama, "k4v4")
    cache = DynamicCache()  # no config: layers are created lazily by transformers, then replaced by tqpatch
    with torch.no_grad():
        llama(prompt(length=16), past_key_values=cache, use_cache=True)
    assert all(isinstance(layer, TurboQuantLayer) for layer in cache.layers)
    assert tqpatch.cache_stats(cache).compressed_tokens == 16 * llama.config.num_hidden_layers


def test_cache_filled_before_patching_is_compressed_on_first_use(llama):
    cache = DynamicCache(config=llama.config)
    ids = prompt(length=24)
    with torch.no_grad():
        llama(ids[:, :16], past_key_values=cache)
        tqpatch.patch(llama, "k8v8")
        logits = llama(ids[:, 16:], past_key_values=cache).logits
        tqpatch.unpatch(llama)
        reference = llama(ids).logits[:, 16:]
    assert isinstance(cache.layers[0], TurboQuantLayer)
    assert cache.layers[0].num_compressed == 24
    assert torch.allclose(logits, reference, atol=2e-2, rtol=0)


def test_long_prompt_dequantizes_one_layer_at_a_time(monkeypatch):
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16384)).eval()
    tqpatch.patch(model, "k2v2")
    live: list[weakref.ref] = []
    peak = []
    original = TurboQuantLayer.stored_kv

    def tracking_stored_kv(self):
        keys, values = original(self)
        gc.collect()
        peak.append(sum(ref() is not None for ref in live))
        live.extend([weakref.ref(keys), weakref.ref(values)])
        return keys, values

    monkeypatch.setattr(TurboQuantLayer, "stored_kv", tracking_stored_kv)
    cache = DynamicCache(config=model.config)
    ids = torch.randint(0, 64, (1, 8192 + 64))
    with torch.no_grad():
        model(ids[:, :8192], past_key_values=cache)  # the 8k prompt
        for step in range(2):  # decode steps read the compressed 8k tokens back
            model(ids[:, 8192 + step : 8193 + step], past_key_values=cache)
    assert cache.get_seq_length() == 8194
    assert len(peak) == 2 * 3
    assert max(peak) == 0, "another layer's dequantized K/V was still alive when a layer dequantized its own"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_store_and_return_their_dtype(dtype):
    model = tiny_model("llama").to(dtype)
    tqpatch.patch(model, "k4v4")
    out = model.generate(prompt(), max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    cache = cache_of(out)
    keys, values = cache.layers[0].stored_kv()
    assert keys.dtype == values.dtype == dtype
    stats = tqpatch.cache_stats(cache)
    assert stats.compressed_tokens > 0
    assert stats.compression_ratio == pytest.approx(16 / (4 + 16 / model.config.head_dim), rel=0.01)

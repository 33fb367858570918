"""The score-variance logit bias (`TurboQuantConfig.score_variance`): σ² = Var(⟨q, k⟩ | codes) is calibrated
against the real error of the codecs, and the attention wrapper adds σ²/2 · scaling² to compressed columns only."""

import pytest
import torch
import transformers as tf

import tqpatch
from tqpatch import attention
from tqpatch.codec import TurboQuantCodec, make_codec, score_variance
from tqpatch.config import TurboQuantConfig

from tiny_models import prompt, tiny_model


def _calibration(codec, keys, queries, **kwargs):
    """(mean predicted σ², mean observed (⟨q, k - k̃⟩)², mean of observed / predicted) over all pairs."""
    parts = codec.encode(keys, **kwargs)
    error = keys - codec.decode(parts, torch.float32, **kwargs)
    predicted = score_variance(codec, queries, parts)
    observed = (queries @ error.transpose(-1, -2)) ** 2
    return predicted.mean().item(), observed.mean().item(), (observed / predicted).mean().item()


@pytest.mark.parametrize("bits", [2, 4])
def test_score_variance_matches_the_observed_error(bits):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, 4000, 64, generator=g) * torch.rand(1, 1, 4000, 1, generator=g)  # norms vary
    queries = torch.randn(1, 1, 16, 64, generator=g) * torch.linspace(0.2, 3, 64)  # anisotropic queries
    predicted, observed, ratio = _calibration(TurboQuantCodec(64, bits, seed=3), keys, queries)
    assert observed == pytest.approx(predicted, rel=0.08)
    assert ratio == pytest.approx(1.0, rel=0.08)


def test_score_variance_ranks_keys_by_their_norm():
    """Keys with larger norms have larger score errors, and σ² says so (correlation over keys)."""
    g = torch.Generator().manual_seed(1)
    codec = TurboQuantCodec(64, 2, seed=5, norm_bits=8)
    keys = torch.randn(1, 1, 6000, 64, generator=g) * torch.rand(1, 1, 6000, 1, generator=g) * 3
    queries = torch.randn(1, 1, 4, 64, generator=g)
    parts = codec.encode(keys)
    observed = (queries @ (keys - codec.decode(parts, torch.float32)).transpose(-1, -2)) ** 2
    predicted = score_variance(codec, queries, parts)
    p, o = predicted - predicted.mean(-1, keepdim=True), observed - observed.mean(-1, keepdim=True)
    assert ((p * o).sum(-1) / (p.norm(dim=-1) * o.norm(dim=-1))).min() > 0.3


@pytest.mark.parametrize("spec", ["split", "eigen"])
def test_codec_score_variance_is_calibrated_for_split_and_shaped_keys(spec):
    g = torch.Generator().manual_seed(2)
    scale = torch.linspace(0.1, 2.0, 64)
    keys = torch.randn(1, 2, 3000, 64, generator=g) * scale + 0.3
    queries = torch.randn(1, 2, 8, 64, generator=g) * scale.flip(0)
    if spec == "split":
        codec = make_codec(64, 2.5, "mse", 0, norm_bits=8)
        kwargs = {}
    else:
        codec = make_codec(64, 3.5, "mse", 0, center=True, rope=True, shape=True, norm_bits=8, split=(6, 2))
        codec.observe_queries(queries.transpose(1, 2).repeat_interleave(2, dim=2), kv_heads=2)
        kwargs = {"first_index": 0}
    predicted, observed, _ = _calibration(codec, keys, queries, **kwargs)
    assert observed == pytest.approx(predicted, rel=0.15)


def test_prod_and_unbiased_keys_refuse_score_variance():
    with pytest.raises(ValueError, match="mse keys"):
        TurboQuantConfig(key_method="prod", score_variance=True)
    with pytest.raises(ValueError, match="mse keys"):
        TurboQuantCodec(64, 3, "prod").variance_weights(torch.ones(1, 1, 1, 64))
    with pytest.raises(ValueError, match="conditional means"):
        TurboQuantCodec(64, 3, unbiased=True).variance_weights(torch.ones(1, 1, 1, 64))
    with pytest.raises(ValueError, match="unbias_keys"):
        TurboQuantConfig(unbias_keys=True, score_variance=True)
    with pytest.raises(ValueError, match="True or False"):
        TurboQuantConfig(score_variance="mean")
    assert TurboQuantConfig.from_spec("k4v4-sv").score_variance is True
    assert TurboQuantConfig.from_spec("k4v4-s4-sv-n8").name == "k4v4-s4-sv-n8"


def test_wrapper_adds_half_the_variance_to_compressed_columns_only(monkeypatch):
    """Capture what the wrapped attention hands SDPA: sinks, the current chunk and masked cells untouched,
    compressed columns raised by σ²/2 · scaling² from the layer's codec."""
    model = tiny_model("llama")
    config = TurboQuantConfig.from_spec("k2v2-s2-ck-qs-n8-sv")
    seen = []
    base = attention._base_function

    def capture(name, module):
        fn = base(name, module)

        def wrapped(module, query, key, value, attention_mask, **kwargs):
            seen.append((module.layer_idx, query, key, attention_mask))
            return fn(module, query, key, value, attention_mask, **kwargs)

        return wrapped

    monkeypatch.setattr(attention, "_base_function", capture)
    ids = prompt(length=24)
    tqpatch.patch(model, config)
    try:
        cache = tf.DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids[:, :16], past_key_values=cache, use_cache=True)
            seen.clear()
            model(ids[:, 16:], past_key_values=cache, use_cache=True)
        layer_idx, query, key, mask = seen[0]
        layer = cache.layers[layer_idx]
        sinks, compressed = layer.num_sink, layer.num_compressed - 8  # the 8 new tokens were stored after the read
        assert mask.dtype == query.dtype and mask.shape == (1, 4, 8, 24)
        grouped = query.float().reshape(1, 2, 2 * 8, -1)
        parts = {n: t[:, :, :compressed] for n, t in layer.compressed_keys.parts.items()}
        expected = 0.5 * model.model.layers[0].self_attn.scaling ** 2 * score_variance(layer.key_codec, grouped, parts).view(1, 4, 8, -1)
        torch.testing.assert_close(mask[..., sinks : sinks + compressed].float(), expected, rtol=1e-5, atol=1e-7)
        assert (expected > 0).all()
        assert (mask[..., :sinks] == 0).all()
        current = mask[..., sinks + compressed :]  # the chunk itself: causal, no bias
        causal = torch.ones(8, 8, dtype=torch.bool).tril()
        assert (current[..., causal] == 0).all() and (current[..., ~causal] < -1e30).all()
    finally:
        tqpatch.unpatch(model)


def test_score_variance_changes_the_logits_and_unpatch_restores_attention():
    model = tiny_model("llama")
    ids = prompt(length=32)
    outputs = {}
    for spec in ("k2v2-s2-ck-qs-n8", "k2v2-s2-ck-qs-n8-sv"):
        tqpatch.patch(model, spec)
        try:
            cache = tf.DynamicCache(config=model.config)
            with torch.no_grad():
                outputs[spec] = torch.cat([model(ids[:, s : s + 8], past_key_values=cache, use_cache=True).logits for s in range(0, 32, 8)], 1)
        finally:
            tqpatch.unpatch(model)
    plain, biased = outputs.values()
    torch.testing.assert_close(plain[:, :8], biased[:, :8])  # nothing compressed yet: identical
    assert (plain[:, 8:] - biased[:, 8:]).abs().max() > 1e-4
    assert model.config._attn_implementation in ("sdpa", "eager")

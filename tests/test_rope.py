"""RoPE recovery (tqpatch.rope) and RoPE-aware key centering (RopeKeyCodec) in codecs and stores."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tiny_models import prompt, tiny_model
from tqpatch.codec import CenteredCodec, RopeKeyCodec, TurboQuantCodec, make_codec
from tqpatch.rope import RopeTable
from tqpatch.store import TurboQuantLayer


def model_cos_sin(start=5, tokens=32, arch="llama"):
    model = tiny_model(arch)
    positions = torch.arange(start, start + tokens)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, tokens, 16), positions)
    return model, cos, sin


def test_fit_recovers_the_models_frequencies_and_reproduces_its_cos_sin():
    model, cos, sin = model_cos_sin()
    table = RopeTable.fit(cos, sin)
    inv_freq = model.model.rotary_emb.inv_freq.double()
    assert torch.allclose(table.frequencies, inv_freq, atol=1e-6) and table.scale == pytest.approx(1.0)
    far = torch.arange(400, 420)[None]
    want_cos, want_sin = model.model.rotary_emb(torch.zeros(1, 20, 16), far)
    got_cos, got_sin = table.cos_sin(far[0], "cpu")
    assert torch.allclose(got_cos, want_cos[0], atol=1e-4) and torch.allclose(got_sin, want_sin[0], atol=1e-4)


def test_fit_refuses_what_it_cannot_read():
    _, cos, sin = model_cos_sin()
    assert RopeTable.fit(cos[:, :2], sin[:, :2]) is None  # fewer than three positions
    half = cos.shape[-1] // 2
    interleaved = lambda t: t[..., :half].repeat_interleave(2, dim=-1)  # GPT-J layout, not rotate_half's
    assert RopeTable.fit(interleaved(cos), interleaved(sin)) is None
    jump = torch.cat([cos[:, :10], cos[:, 20:]], dim=1), torch.cat([sin[:, :10], sin[:, 20:]], dim=1)
    assert RopeTable.fit(*jump) is None  # positions that are not consecutive


def test_apply_matches_transformers_and_invert_undoes_it():
    _, cos, sin = model_cos_sin(start=7, tokens=12)
    table = RopeTable.fit(cos, sin)
    x = torch.randn(2, 3, 12, cos.shape[-1])
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.allclose(table.apply(x, 7), expected, atol=1e-5)
    assert torch.allclose(table.invert(table.apply(x, 7), 7), x, atol=1e-5)


def rope_keys(table, heads=2, tokens=96, start=0, seed=0):
    """Keys R_p (μ + n): a large fixed pre-RoPE offset per head that turns with position, as real keys have."""
    gen = torch.Generator().manual_seed(seed)
    d = table.head_dim
    mean = torch.randn(heads, d, generator=gen) * 4
    pre = torch.randn(1, heads, tokens, d, generator=gen) + mean[None, :, None, :]
    return table.apply(pre, start), mean


@pytest.mark.parametrize("bits", [2, 4])
def test_rope_centering_cuts_the_key_error_where_a_fixed_mean_cannot(bits):
    _, cos, sin = model_cos_sin()
    table = RopeTable.fit(cos, sin)
    keys, mean = rope_keys(table)

    def error(codec):
        if isinstance(codec, RopeKeyCodec):
            codec.observe_rope(cos, sin)
            out = torch.cat([codec.decode(codec.encode(keys[:, :, s : s + 32], s), torch.float32, s) for s in (0, 32, 64)], dim=2)
        else:
            out = torch.cat([codec.decode(codec.encode(keys[:, :, s : s + 32]), torch.float32) for s in (0, 32, 64)], dim=2)
        return (out - keys).norm() / keys.norm()

    plain, fixed = TurboQuantCodec(16, bits), CenteredCodec(TurboQuantCodec(16, bits))
    rope = make_codec(16, bits, "mse", 0, center=True, rope=True)
    assert isinstance(rope, RopeKeyCodec)
    assert error(rope) < 0.5 * error(plain)
    assert error(rope) < 0.5 * error(fixed)
    assert (rope.mean - mean).abs().max() < 0.9  # the pre-RoPE offset, from 31 tokens (σ of each channel ≈ 0.18)


def test_rope_centering_without_rope_is_plain_turboquant():
    x = torch.randn(1, 2, 20, 16)
    codec, plain = make_codec(16, 3, "mse", 0, center=True, rope=True), TurboQuantCodec(16, 3)
    out = codec.decode(codec.encode(x, 0), torch.float32, 0)  # observe_rope was never called
    assert torch.equal(codec.mean, torch.zeros(2, 16)) and torch.allclose(out, plain.decode(plain.encode(x), torch.float32))


def test_store_keeps_sequence_indices_through_sinks_sliding_trims_and_crops():
    """Every stored key must decode the same way however the layer moved it (R_p μ uses each token's index)."""
    _, cos, sin = model_cos_sin(start=0, tokens=3)
    table = RopeTable.fit(cos, sin)
    keys, _ = rope_keys(table, tokens=60, seed=4)
    for sliding, sinks in ((None, 2), (9, 0), (9, 2), (19, 2)):
        layer = TurboQuantLayer(make_codec(16, 2, "mse", 0, center=True, rope=True), TurboQuantCodec(16, 2), sink_tokens=sinks,
                                sliding_sinks=True, prefill_exact=False, sliding_window=sliding)
        layer.observe_rope(cos, sin)
        seen = {}  # sequence index -> the key as first returned
        for start in range(0, 60, 5):
            out_keys, _ = layer.update(keys[:, :, start : start + 5], keys[:, :, start : start + 5])
            end = start + 5
            indices = range(end - out_keys.shape[2], end)
            for i, k in zip(indices, out_keys.unbind(2)):
                if i in seen:
                    assert torch.equal(seen[i], k), (sliding, i)
                seen.setdefault(i, k)
        assert (layer.key_codec.mean.abs() > 0).all()
        before, _ = layer.stored_kv()
        layer.crop(-3)
        after, _ = layer.stored_kv()
        assert torch.equal(after, before[:, :, :-3])


def test_patched_model_fits_rope_in_every_layer_and_stays_close():
    import tqpatch
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids = prompt(length=40)
    with torch.no_grad():
        exact = model(ids).logits
        tqpatch.patch(model, tqpatch.TurboQuantConfig.from_spec("k4v4-ck"))
        cache = DynamicCache(config=model.config)
        out = torch.cat([model(ids[:, s : s + 8], past_key_values=cache, use_cache=True).logits for s in range(0, 40, 8)], dim=1)
        tqpatch.unpatch(model)
    for layer in cache.layers:
        assert isinstance(layer.key_codec, RopeKeyCodec) and layer.key_codec.rope is not None
        assert isinstance(layer.value_codec, TurboQuantCodec)
    assert torch.nn.functional.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.98


def test_position_table_is_shared_grown_and_sliced_exactly():
    from tqpatch import rope

    _, cos, sin = model_cos_sin(start=0, tokens=8)
    a, b = RopeTable.fit(cos, sin), RopeTable.fit(cos, sin)
    first = a.cos_sin_range(5, 10, "cpu")
    assert b.cos_sin_range(5, 10, "cpu")[0].data_ptr() == first[0].data_ptr()  # one table for both layers
    far = a.cos_sin_range(3000, 4, "cpu")  # beyond the first table: grown
    want = a.cos_sin(torch.arange(3000, 3004), "cpu")
    assert torch.equal(far[0], want[0]) and torch.equal(far[1], want[1])
    assert torch.equal(a.cos_sin_range(5, 10, "cpu")[0], first[0])
    assert torch.equal(a.joined_range(3000, 4, "cpu"), torch.cat(want, dim=-1))
    key = next(k for k in rope._TABLES if k[0] == a.frequencies.numpy().tobytes())
    assert rope._TABLES[key].shape == (rope._TABLES[key].shape[0], 2 * a.head_dim) and rope._TABLES[key].shape[0] >= 3004


def test_rope_bias_is_the_query_times_the_rotated_mean():
    """⟨q, R_p μ⟩ from the factored RopeBias and the shared position table equals the product with R_p μ built token by token."""
    _, cos, sin = model_cos_sin()
    table = RopeTable.fit(cos, sin)
    keys, _ = rope_keys(table, heads=2)
    codec = make_codec(16, 4, "mse", 0, center=True, rope=True)
    codec.observe_rope(cos, sin)
    codec.encode(keys[:, :, :32], 7)
    q = torch.randn(3, 6, 16)  # [B, Hq, d]: 3 query heads per KV head
    first, length = 40, 25
    offsets = codec._offset(torch.zeros(1, 2, length, 16), first)[0]  # [Hkv, L, d] = R_p μ
    want = torch.einsum("bgd,gld->bgl", q, offsets.repeat_interleave(3, dim=0))
    bias = codec.rope_bias(q, first, rows=first + length)
    assert bias.table.shape[0] >= first + length and bias.scale == table.scale
    assert torch.allclose(bias.dense(length), want, atol=1e-4)
    rotated = table.apply(codec.mean[:, None, :].expand(2, length, 16), first)  # R_p μ via RopeTable.apply
    assert torch.allclose(offsets, rotated, atol=1e-5)

"""Query-shaped key error (tqpatch.shaping, RopeKeyCodec(shape=True), `shape_keys`): math, codec, patch."""

from __future__ import annotations

import pytest
import torch
from tiny_models import patched_in_chunks, prompt, tiny_model

from tqpatch import kernels
from tqpatch.codec import RopeKeyCodec, TurboQuantCodec, make_codec
from tqpatch.config import TurboQuantConfig
from tqpatch.rope import RopeTable
from tqpatch.shaping import SHAPE_PRIORS, QueryMoments, diagonal_transform, rope_average, shaping_gain, shaping_transform, stored_nbytes, stored_transform


def _anisotropic(d: int, rank: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(d, rank, generator=gen, dtype=torch.float64) * torch.linspace(3, 0.5, rank, dtype=torch.float64)
    return basis @ basis.T + 0.01 * torch.eye(d, dtype=torch.float64)


def test_transform_reaches_the_geometric_mean_bound_and_is_a_symmetric_pair():
    d = 32
    sq, sk = _anisotropic(d, 3, 0), _anisotropic(d, 20, 1)
    a = shaping_transform(sq, sk, shrink=0.0)
    assert torch.allclose(a, a.T, atol=1e-5) and (torch.linalg.eigvalsh(a.double()) > 0).all()
    assert torch.linalg.det(a.double()).item() == pytest.approx(1.0, rel=1e-3)
    values, vectors = torch.linalg.eigh(sk)
    sk_half = (vectors * values.sqrt()) @ vectors.T
    inner = torch.linalg.eigvalsh(sk_half @ sq @ sk_half).clamp_min(0).sqrt().sum()
    bound = inner**2 / (sq.trace() * sk.trace())
    assert shaping_gain(sq, sk, a).item() == pytest.approx(bound.item(), rel=1e-3)
    assert bound < 0.5  # a rank-3 query against 20-dimensional keys: most of the error can go elsewhere
    assert shaping_gain(sq, sk, torch.eye(d)).item() == pytest.approx(1.0)
    # random symmetric perturbations of the optimum only do worse
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        noise = torch.randn(d, d, generator=gen, dtype=torch.float64) * 0.05
        perturbed = torch.linalg.matrix_exp(noise + noise.T) @ a.double()
        assert shaping_gain(sq, sk, (perturbed + perturbed.T) / 2) >= shaping_gain(sq, sk, a) - 1e-6


def test_isotropic_queries_leave_keys_unshaped():
    sk = _anisotropic(16, 10, 3)
    a = shaping_transform(torch.eye(16, dtype=torch.float64), sk, shrink=0.0)
    # with Σq = I the optimum is A² ∝ Σk^{-1/2}: whitening halfway; the gain is (tr Σk^{1/2})² / (d tr Σk)
    expected = torch.linalg.eigvalsh(sk).sqrt().sum() ** 2 / (16 * sk.trace())
    assert shaping_gain(torch.eye(16), sk, a).item() == pytest.approx(expected.item(), rel=1e-3)
    a_same = shaping_transform(sk, sk, shrink=0.0)  # Σq = Σk: A² ∝ I
    assert torch.allclose(a_same, torch.eye(16), atol=1e-3)


def test_rope_average_is_the_mean_over_rotated_positions():
    d, horizon = 16, 40
    frequencies = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    table = RopeTable(frequencies, 1.0)
    sigma = _anisotropic(d, 6, 4)
    cos, sin = table.cos_sin(torch.arange(horizon), torch.device("cpu"))
    eye = torch.eye(d, dtype=torch.float64)
    brute = torch.zeros(d, d, dtype=torch.float64)
    for p in range(horizon):
        rotation = table.apply(eye[:, None, :], p)[:, 0].double().T  # columns: R_p e_i
        brute += rotation @ sigma @ rotation.T
    assert torch.allclose(rope_average(sigma, table, horizon), brute / horizon, atol=1e-4)
    assert cos.shape == (horizon, d)


def test_query_moments_sum_over_the_heads_of_a_group():
    moments = QueryMoments()
    q = torch.randn(2, 5, 4, 8)  # [B, T, Hq, d], 2 KV heads of 2 query heads
    moments.observe(q[:, :3], kv_heads=2)
    moments.observe(q[:, 3:], kv_heads=2)
    flat = q.reshape(10, 2, 2, 8)
    expected = torch.einsum("nhgi,nhgj->hij", flat, flat) / 10
    assert moments.count == 10 and torch.allclose(moments.mean.float(), expected, atol=1e-5)


def _low_rank_queries_and_keys(heads=2, tokens=96, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(heads, d, 2, generator=gen)
    queries = torch.einsum("hdr,bthr->bthd", directions, torch.randn(1, tokens, heads, 2, generator=gen)) * 3
    keys = torch.randn(1, heads, tokens, d, generator=gen)
    return queries, keys


@pytest.mark.parametrize("bits", [2, 4])
def test_shaped_codec_cuts_the_score_error_of_low_rank_queries(bits):
    """Without RoPE (no table) A is fitted on the raw second moments; the decode still reconstructs the keys."""
    queries, keys = _low_rank_queries_and_keys()

    def score_error(codec):
        if isinstance(codec, RopeKeyCodec):
            codec.observe_queries(queries[:, :32], kv_heads=2)
            out = torch.cat([codec.decode(codec.encode(keys[:, :, s : s + 32], s), torch.float32, s) for s in (0, 32, 64)], dim=2)
        else:
            out = torch.cat([codec.decode(codec.encode(keys[:, :, s : s + 32]), torch.float32) for s in (0, 32, 64)], dim=2)
        return torch.einsum("bthd,bhsd->bhts", queries, keys - out).pow(2).mean().sqrt()

    shaped = make_codec(32, bits, "mse", 0, rope=True, shape=True)
    assert isinstance(shaped, RopeKeyCodec) and not shaped.center_keys
    plain_error, shaped_error = score_error(TurboQuantCodec(32, bits)), score_error(shaped)
    assert shaped.shaping is not None and not shaped.wants_queries
    assert shaped_error < 0.8 * plain_error, (shaped_error, plain_error)
    assert (shaped.mean == 0).all()


def test_decode_reference_scores_codes_with_the_shaped_query():
    """decode_attention(q, code_query=A⁻¹q) on the inner codes equals attention with q over the decoded keys."""
    gen = torch.Generator().manual_seed(11)
    queries, keys = _low_rank_queries_and_keys(tokens=64)
    codec = make_codec(32, 4, "mse", 0, rope=True, shape=True)
    codec.observe_queries(queries[:, :32], kv_heads=2)
    values = TurboQuantCodec(32, 4)
    key_parts = codec.inner.encode(codec.center(keys, 0))
    value_parts = values.encode(torch.randn(1, 2, 64, 32, generator=gen))
    fp = torch.randn(1, 2, 3, 32, generator=gen)
    q = torch.randn(1, 2, 32, generator=gen)
    via_codes = kernels.decode_attention_reference(q, codec.inner, values, key_parts, value_parts, fp, fp, 0.2, code_query=codec.shape_queries(q))
    # softmax attention of q over the decoded keys (A⁻¹ applied) and the fp tokens, written out
    k = torch.cat([codec.decode(key_parts, torch.float32, 0), fp], dim=2)[0]  # [H, L, d]
    v = torch.cat([values.decode(value_parts, torch.float32), fp], dim=2)[0]
    weights = torch.softmax(torch.einsum("hd,hld->hl", q[0], k) * 0.2, dim=-1)
    exact = torch.einsum("hl,hld->hd", weights, v)[None]
    unshaped = kernels.decode_attention_reference(q, codec.inner, values, key_parts, value_parts, fp, fp, 0.2)
    assert (via_codes - exact).norm() < 1e-4 * exact.norm()
    assert (unshaped - exact).norm() > 100 * (via_codes - exact).norm()  # the shaped query is what makes them agree


def test_patch_feeds_queries_to_shaped_layers_and_unpatch_removes_the_hooks():
    model = tiny_model("llama")
    config = TurboQuantConfig.from_spec("k4v4-s2-ck-qs")
    assert config.shape_keys and config.name == "k4v4-s2-ck-qs"
    exact, out, cache = patched_in_chunks(model, prompt(length=40), config)
    for layer in cache.layers:
        codec = layer.key_codec
        assert isinstance(codec, RopeKeyCodec) and codec.queries.count == 8  # the first call's tokens (batch 1)
        assert codec.shaping is not None and not layer.wants_queries
    assert torch.nn.functional.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.98
    assert all(not attn.q_proj._forward_hooks for attn in (layer.self_attn for layer in model.model.layers))
    assert cache.layers[0].memory()["compressed_bytes"] > 0


def test_stored_transform_is_symmetric_int8_with_an_exact_inverse_and_keeps_the_gain():
    d = 64
    sq, sk = _anisotropic(d, 4, 5), _anisotropic(d, 30, 6)
    a = shaping_transform(sq, sk)
    stored, stored_inv = stored_transform(a)
    assert torch.equal(stored, stored.T)
    assert torch.allclose(stored.double() @ stored_inv.double(), torch.eye(d, dtype=torch.float64), atol=1e-4)
    # each row's upper part is an int8 multiple of that row's float16 scale
    scale = (a.abs() * torch.ones(d, d).triu().bool()).amax(-1, keepdim=True) / 127
    steps = stored / scale.half().float()
    assert torch.allclose(steps.triu(), steps.triu().round(), atol=1e-3)
    assert shaping_gain(sq, sk, stored).item() == pytest.approx(shaping_gain(sq, sk, a).item(), rel=0.02)
    assert stored_nbytes(3, 64) == 3 * (64 * 65 // 2 + 128)


@pytest.mark.parametrize(
    "arch,shaped",
    [("llama", [True] * 2), ("qwen3", [True] * 2), ("gemma3", [False, False, True, False]), ("phi3", [False] * 2), ("gpt2", [False] * 3)],
)
def test_which_layers_get_shaped_across_architectures(arch, shaped):
    """Full-attention layers with a q_proj/q_norm are shaped; sliding-window layers and models without a separate
    query projection (Phi-3's fused qkv, GPT-2) keep A = I and still run."""
    import tqpatch
    from transformers import DynamicCache

    model = tiny_model(arch)
    ids = prompt(length=24)
    with torch.no_grad():
        exact = model(ids).logits
        tqpatch.patch(model, TurboQuantConfig.from_spec("k4v4-s2-ck-qs"))
        cache = DynamicCache(config=model.config)
        out = torch.cat([model(ids[:, s : s + 8], past_key_values=cache, use_cache=True).logits for s in range(0, 24, 8)], dim=1)
        tqpatch.unpatch(model)
    got = [getattr(layer.key_codec, "shaping", None) is not None for layer in cache.layers]
    assert got[: len(shaped)] == shaped
    assert torch.nn.functional.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.95


def test_diagonal_transform_is_the_best_pair_tied_diagonal():
    """diag(a): det 1, equal on each RoPE pair (i, i + d/2), and no pair-tied diagonal perturbation does better."""
    d = 32
    sq, sk = _anisotropic(d, 3, 7) + torch.diag(torch.linspace(2, 0.1, d, dtype=torch.float64)), _anisotropic(d, 20, 8)
    a = diagonal_transform(sq, sk, shrink=0.0).double()
    assert torch.equal(a[: d // 2], a[d // 2 :]) and a.log().sum().item() == pytest.approx(0.0, abs=1e-5)
    best = shaping_gain(sq, sk, torch.diag(a)).item()
    assert best < 1.0 and shaping_gain(sq, sk, torch.eye(d)).item() == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(9)
    for _ in range(5):
        noise = torch.randn(d // 2, generator=gen, dtype=torch.float64) * 0.1
        perturbed = a * torch.cat([noise, noise]).exp()
        assert shaping_gain(sq, sk, torch.diag(perturbed)).item() >= best - 1e-9


def test_diagonal_shaping_codec_stores_d_numbers_and_decodes_the_keys():
    """RopeKeyCodec(diagonal=True): A is diagonal (float16 entries, exact inverse), counted as d float16 per head,
    and still cuts the score error of low-rank queries whose weight sits on a few channels."""
    queries, keys = _low_rank_queries_and_keys()
    queries = queries * torch.linspace(4, 0.1, 16).repeat(2)  # channel-wise anisotropy, equal on RoPE pairs: what a diagonal map can use
    codec = make_codec(32, 2, "mse", 0, rope=True, shape=True, diagonal=True)
    with pytest.raises(ValueError, match="shape=True"):
        RopeKeyCodec(TurboQuantCodec(32, 2), shape=False, diagonal=True)
    codec.observe_queries(queries[:, :32], kv_heads=2)
    out = torch.cat([codec.decode(codec.encode(keys[:, :, s : s + 32], s), torch.float32, s) for s in (0, 32, 64)], dim=2)
    m, m_inv = codec.shaping
    assert torch.equal(m, torch.diag_embed(m.diagonal(dim1=-2, dim2=-1))) and torch.equal(m.diagonal(dim1=-2, dim2=-1).half().float(), m.diagonal(dim1=-2, dim2=-1))
    assert torch.allclose(m @ m_inv, torch.eye(32).expand(2, 32, 32), atol=1e-6)
    assert codec.extra_nbytes == codec.inner.extra_nbytes + codec.mean.numel() * 2 + 2 * 32 * 2  # μ and a in float16, 2 heads
    plain = TurboQuantCodec(32, 2)
    plain_out = torch.cat([plain.decode(plain.encode(keys[:, :, s : s + 32]), torch.float32) for s in (0, 32, 64)], dim=2)
    error = lambda decoded: torch.einsum("bthd,bhsd->bhts", queries, keys - decoded).pow(2).mean().sqrt()  # noqa: E731
    assert error(out) < 0.93 * error(plain_out), (error(out), error(plain_out))  # 0.875 at this seed


def test_shape_sliding_keys_gives_sliding_layers_a_diagonal_map():
    """`-qsd`: Gemma-3's sliding-window layers get a diagonal A, its full-attention layer keeps the full one."""
    import tqpatch
    from transformers import DynamicCache

    config = TurboQuantConfig.from_spec("k4v4-s2-ck-qsd")
    assert config.shape_keys and config.shape_sliding_keys and config.name == "k4v4-s2-ck-qsd"
    with pytest.raises(ValueError, match="shape_keys=True"):
        TurboQuantConfig(shape_sliding_keys=True)
    model = tiny_model("gemma3")
    ids = prompt(length=24)
    with torch.no_grad():
        exact = model(ids).logits
        tqpatch.patch(model, config)
        cache = DynamicCache(config=model.config)
        out = torch.cat([model(ids[:, s : s + 8], past_key_values=cache, use_cache=True).logits for s in range(0, 24, 8)], dim=1)
        tqpatch.unpatch(model)
    diagonal = [layer.key_codec.diagonal for layer in cache.layers]
    assert diagonal[:4] == [True, True, False, True]  # layer 2 is the full-attention one (as in the test above)
    assert all(layer.key_codec.shaping is not None for layer in cache.layers[:4])
    assert torch.nn.functional.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.95


def test_diagonal_prior_fits_channel_scaled_moments_better_from_few_tokens():
    """`shape_prior="diagonal"` (spec dp): when the true moments' anisotropy is mostly per-channel scales (as QK-norm
    gives Gemma-3), A fitted on 24 sampled vectors comes closer to the optimum shrunk towards the samples' own
    diagonal than towards a multiple of I; on the sample moments themselves both priors keep the fit symmetric, det 1."""
    d, tokens = 64, 24
    gen = torch.Generator().manual_seed(11)
    scale_q = torch.logspace(0.6, -0.6, d, dtype=torch.float64)  # per-channel scales over 1.2 decades
    scale_k = torch.logspace(-0.4, 0.4, d, dtype=torch.float64)[torch.randperm(d, generator=gen)]
    true_q = _anisotropic(d, 4, 12) * 0.05 + torch.diag(scale_q**2)
    true_k = _anisotropic(d, 8, 13) * 0.05 + torch.diag(scale_k**2)
    gains = {"isotropic": [], "diagonal": []}
    for trial in range(4):
        sample = lambda sigma: torch.linalg.cholesky(sigma) @ torch.randn(d, tokens, generator=gen, dtype=torch.float64)  # noqa: E731
        q, k = sample(true_q), sample(true_k)
        fit_q, fit_k = q @ q.T / tokens, k @ k.T / tokens
        for prior, (diagonal_share, shrink) in SHAPE_PRIORS.items():
            a = shaping_transform(fit_q, fit_k, shrink, diagonal_share)
            assert torch.allclose(a, a.T, atol=1e-5) and torch.linalg.det(a.double()).item() == pytest.approx(1.0, rel=1e-3)
            gains[prior].append(shaping_gain(true_q, true_k, a).item())
    assert max(gains["diagonal"]) < min(gains["isotropic"]), gains


def test_shape_prior_spec_and_validation():
    config = TurboQuantConfig.from_spec("k4v4-s4-ck-qsd-dp-n8")
    assert config.shape_prior == "diagonal" and config.name == "k4v4-s4-ck-qsd-dp-n8"
    assert TurboQuantConfig.from_spec(config.name) == config
    with pytest.raises(ValueError, match="'isotropic', 'diagonal'"):
        TurboQuantConfig(shape_keys=True, shape_prior="ledoit")
    with pytest.raises(ValueError, match="shape_keys=True"):
        TurboQuantConfig.from_spec("k4v4-dp")
    with pytest.raises(ValueError, match="isotropic, diagonal"):
        make_codec(32, 4, "mse", 0, rope=True, shape=True, prior="ledoit")


def test_diagonal_prior_reaches_every_key_codec_of_a_patched_gemma3():
    """dp changes only the fit: each layer's codec carries the prior, and the shaped maps differ from the isotropic fit's."""
    import tqpatch
    from transformers import DynamicCache

    model = tiny_model("gemma3")
    ids = prompt(length=24)
    maps = {}
    with torch.no_grad():
        for spec in ("k4v4-s2-ck-qsd", "k4v4-s2-ck-qsd-dp"):
            tqpatch.patch(model, TurboQuantConfig.from_spec(spec))
            cache = DynamicCache(config=model.config)
            for s in range(0, 24, 8):
                model(ids[:, s : s + 8], past_key_values=cache, use_cache=True)
            tqpatch.unpatch(model)
            maps[spec] = [(layer.key_codec.prior, layer.key_codec.shaping[0]) for layer in cache.layers]
    assert all(prior == "isotropic" for prior, _ in maps["k4v4-s2-ck-qsd"])
    assert all(prior == "diagonal" for prior, _ in maps["k4v4-s2-ck-qsd-dp"])
    assert all(not torch.allclose(a, b) for (_, a), (_, b) in zip(maps["k4v4-s2-ck-qsd"], maps["k4v4-s2-ck-qsd-dp"]))

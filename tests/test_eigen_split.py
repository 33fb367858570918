"""Eigen split of query-shaped keys (shaping.eigen_ordered, SplitCodec groups, `key_split`): math, codec, config."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_shaping import _anisotropic, _low_rank_queries_and_keys
from tiny_models import patched_in_chunks, prompt, tiny_model

from tqpatch import kernels
from tqpatch.codec import RopeKeyCodec, SplitCodec, TurboQuantCodec, make_codec
from tqpatch.config import TurboQuantConfig, eigen_split_groups
from tqpatch.shaping import eigen_ordered, shaping_transform, stored_nbytes, stored_transform


def test_eigen_basis_diagonalises_keys_and_score_metric_alike():
    """With the geometric-mean A, B = QᵀA makes B Σk Bᵀ and B⁻ᵀ Σq B⁻¹ the same descending diagonal."""
    d = 24
    sq, sk = _anisotropic(d, 3, 0), _anisotropic(d, 12, 1)
    b = eigen_ordered(shaping_transform(sq, sk, shrink=0.0).double(), sk)
    keys = b @ sk @ b.T
    b_inv = torch.linalg.inv(b)
    metric = b_inv.T @ sq @ b_inv
    diagonal = keys.diagonal()
    assert torch.allclose(keys, torch.diag(diagonal), atol=1e-6 * diagonal.max())
    assert (diagonal[:-1] >= diagonal[1:] - 1e-9).all()
    assert torch.allclose(metric, keys * metric.trace() / keys.trace(), atol=1e-4 * diagonal.max() * metric.trace() / keys.trace())


def test_stored_transform_whole_matrix_in_4_bits_keeps_an_exact_inverse():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 16, 16, generator=gen, dtype=torch.float64) + 4 * torch.eye(16, dtype=torch.float64)
    stored, stored_inv = stored_transform(a, symmetric=False, entry_bits=4)
    assert not torch.equal(stored, stored.transpose(-1, -2))
    assert torch.allclose(stored.double() @ stored_inv.double(), torch.eye(16, dtype=torch.float64).expand(2, -1, -1), atol=1e-4)
    scale = a.abs().amax(-1, keepdim=True) / 7
    steps = stored / scale.half().float()
    assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 7 + 1e-3
    assert stored_nbytes(2, 16, symmetric=False, entry_bits=4) == 2 * (16 * 16 // 2 + 32)
    with pytest.raises(ValueError, match="entry_bits must be 4 or 8"):
        stored_transform(a, entry_bits=6)


@pytest.mark.parametrize("low", [0, 1])
def test_split_codec_groups_and_dropped_channels(low):
    codec = SplitCodec(32, 2.0, groups=(12, 4, low))
    x = torch.randn(1, 2, 10, 32)
    codec.calibrate_leading(2)
    parts = codec.encode(x)
    out = codec.decode(parts, torch.float32)
    assert codec.bits_per_coordinate == (12 * 4 + 20 * low) / 32
    assert torch.equal(codec.outlier_index[0].long(), torch.arange(12))
    hi_error = (out[..., :12] - x[..., :12]).norm() / x[..., :12].norm()
    assert hi_error < 0.2
    if low == 0:
        assert set(parts) == {"hi_codes", "hi_norms"} and (out[..., 12:] == 0).all()
    else:
        assert "lo_codes" in parts and (out[..., 12:] - x[..., 12:]).norm() / x[..., 12:].norm() < 0.9


def test_eigen_split_groups_and_config_validation():
    assert eigen_split_groups(4, 64, 5, 3) == (32, 5, 3)
    assert eigen_split_groups(2, 64, 3, 1) == (32, 3, 1)
    assert eigen_split_groups(2, 64, 4, 0) == (32, 4, 0)
    assert eigen_split_groups(2, 64, 4, 1) == (21, 4, 1)
    config = TurboQuantConfig.from_spec("k2v2-s4-ck-qs-n8-e3.1")
    assert config.key_split == (3, 1) and config.name == "k2v2-s4-ck-qs-n8-e3.1"
    with pytest.raises(ValueError, match="needs shape_keys=True"):
        TurboQuantConfig.from_spec("k2v2-e3.1")
    with pytest.raises(ValueError, match=r"0 <= low < key_bits=2 < high <= 8"):
        TurboQuantConfig.from_spec("k2v2-qs-e2.1")
    with pytest.raises(ValueError, match="leaves a group empty"):
        eigen_split_groups(1.01, 16, 8, 1)


@pytest.mark.parametrize("split", [(3, 1), (4, 0)])
def test_eigen_split_codec_cuts_the_score_error_against_plain_shaping(split):
    """Low-rank queries: spending the bits on the leading shaped directions beats shaping alone at the same bits."""
    queries, keys = _low_rank_queries_and_keys()

    def score_error(codec):
        codec.observe_queries(queries[:, :32], kv_heads=2)
        out = torch.cat([codec.decode(codec.encode(keys[:, :, s : s + 32], s), torch.float32, s) for s in (0, 32, 64)], dim=2)
        return torch.einsum("bthd,bhsd->bhts", queries, keys - out).pow(2).mean().sqrt()

    shaped = make_codec(32, 2, "mse", 0, rope=True, shape=True)
    split_codec = make_codec(32, 2, "mse", 0, rope=True, shape=True, split=split)
    assert isinstance(split_codec, RopeKeyCodec) and split_codec.eigen and isinstance(split_codec.inner, SplitCodec)
    assert split_codec.inner.bits_per_coordinate == 2
    shaped_error, split_error = score_error(shaped), score_error(split_codec)
    assert split_error < 0.8 * shaped_error, (split_error, shaped_error)
    assert split_codec.extra_nbytes > 2 * (32 * 32 // 2)  # B (4-bit entries, both heads) is counted


def test_eigen_split_queries_score_the_codes_like_the_decoded_keys():
    """B is not symmetric: the codes score with B⁻ᵀq (shape_queries), equal to q·decode(k)."""
    queries, keys = _low_rank_queries_and_keys(tokens=64)
    codec = make_codec(32, 2, "mse", 0, rope=True, shape=True, split=(3, 1))
    codec.observe_queries(queries[:, :32], kv_heads=2)
    parts = codec.inner.encode(codec.center(keys, 0))
    q = torch.randn(1, 4, 32)  # 2 query heads per KV head
    via_codes = torch.einsum("bhgd,bhtd->bhgt", codec.shape_queries(q).view(1, 2, 2, 32), codec.inner.decode(parts, torch.float32))
    via_keys = torch.einsum("bhgd,bhtd->bhgt", q.view(1, 2, 2, 32), codec.decode(parts, torch.float32, 0))
    assert torch.allclose(via_codes, via_keys, atol=1e-3 * via_keys.abs().max())
    assert kernels.supports(codec.inner)  # the decode kernel reads the split codes (tests/test_kernels.py)


def test_patched_model_with_an_eigen_split_runs_and_stays_close():
    exact, out, cache = patched_in_chunks(tiny_model("llama"), prompt(length=40), TurboQuantConfig.from_spec("k3v4-s2-ck-qs-e4.2"))
    for layer in cache.layers:
        assert layer.key_codec.eigen and layer.key_codec.inner.calibrated
    assert torch.nn.functional.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.98
    assert isinstance(make_codec(32, 4, "mse", 0), TurboQuantCodec)


def test_eigen_split_warns_when_the_first_chunk_is_too_short_for_its_basis():
    queries, keys = _low_rank_queries_and_keys()
    codec = make_codec(32, 2, "mse", 0, rope=True, shape=True, split=(3, 1))
    codec.observe_queries(queries[:, :5], kv_heads=2)
    with pytest.warns(UserWarning, match="eigen split fitted on 4 key vectors at head_dim 32"):  # the first token is left out
        codec.encode(keys[:, :, :5], 0)
    long_enough = make_codec(32, 2, "mse", 0, rope=True, shape=True, split=(3, 1))
    long_enough.observe_queries(queries[:, :9], kv_heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        long_enough.encode(keys[:, :, :9], 0)


def test_refit_fits_the_key_codec_again_on_more_tokens_and_reencodes_them():
    """refit_tokens: after N compressed keys a fresh codec is fitted on all of them (and all queries so far);
    the stored codes are those of the fresh codec, the exact copies are gone, reads stayed compressed."""
    import tqpatch
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids = prompt(length=48)
    config = TurboQuantConfig.from_spec("k3v4-s2-ck-qs-e4.2-fit20")
    assert config.refit_tokens == 20 and config.name == "k3v4-s2-ck-qs-e4.2-fit20"
    seen = []
    with torch.no_grad():
        reference = DynamicCache(config=model.config)
        exact = model(ids, past_key_values=reference, use_cache=True).logits
        exact_keys = reference.layers[0].keys.float()  # [1, H, 48, d]
        tqpatch.patch(model, config)
        cache = DynamicCache(config=model.config)
        outs = []
        for s in range(0, 48, 8):
            outs.append(model(ids[:, s : s + 8], past_key_values=cache, use_cache=True).logits)
            layer = cache.layers[0]
            seen.append((layer.refit_pending, None if layer._exact_keys is None else layer._exact_keys.shape[-2], layer.key_codec))
        tqpatch.unpatch(model)
    # sinks take 2 tokens; compressed keys after each call: 6, 14, 22 (refit), 30, ...
    assert [(pending, n) for pending, n, _ in seen[:4]] == [(True, 6), (True, 14), (False, None), (False, None)]
    first_codec, refit_codec = seen[0][2], seen[2][2]
    assert refit_codec is not first_codec and refit_codec is seen[-1][2]
    assert refit_codec.queries.count == 24  # the queries of the three calls up to the refit
    assert not torch.equal(refit_codec.shaping[0], first_codec.shaping[0])
    layer = cache.layers[0]
    # all stored codes (those of the first calls too) are the refit codec's: they decode close to the exact keys
    keys_now = layer._decode(layer.key_codec, layer.compressed_keys.parts, torch.float32, layer.compressed_start)
    assert keys_now.shape[-2] == 46 and layer.memory()["full_precision_tokens"] == 2
    cosine = torch.nn.functional.cosine_similarity(keys_now, exact_keys[..., 2:, :], dim=-1)
    assert cosine.min() > 0.9, cosine.min()
    out = torch.cat(outs, dim=1)
    assert torch.nn.functional.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.98


def test_refit_is_off_by_default_and_validated():
    assert TurboQuantConfig().refit_tokens == 0
    with pytest.raises(ValueError, match="refit_tokens must be a non-negative integer"):
        TurboQuantConfig(refit_tokens=-1)


def test_refit_copies_follow_crop_and_batch_changes():
    from tqpatch.patch import make_layer

    layer = make_layer(TurboQuantConfig.from_spec("k4v4-ck-fit64"), 16, 4, 4)
    keys, values = torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    layer.lazy_initialization(keys, values)
    layer.update(keys, values)
    assert layer.refit_pending and layer._exact_keys.shape == (2, 2, 20, 16)
    assert layer.memory()["full_precision_bytes"] == layer._exact_keys.numel() * 4  # the copies are counted
    layer.crop(-5)
    assert layer._exact_keys.shape[-2] == layer.num_compressed == 15
    layer.batch_select_indices(torch.tensor([1]))
    assert layer._exact_keys.shape[0] == 1 and torch.equal(layer._exact_keys, keys[1:, :, :15])
    layer.update(torch.randn(1, 2, 60, 16), torch.randn(1, 2, 60, 16))
    assert not layer.refit_pending and layer._exact_keys is None and layer.num_compressed == 75


def test_refit_of_values_chooses_their_outlier_channels_again_on_more_tokens():
    """fitkv<N>: the values' split codec (outlier channels by mean |v|) is fitted again on the first N compressed
    values and they are encoded again with it; the value copies are counted while held and follow a crop."""
    from tqpatch.patch import make_layer

    config = TurboQuantConfig.from_spec("k4v3.5-fitkv24")
    assert config.refit_values and config.refit_tokens == 24 and config.name == "k4v3.5-fitkv24"
    with pytest.raises(ValueError, match="refit_values needs refit_tokens"):
        TurboQuantConfig(refit_values=True)
    gen = torch.Generator().manual_seed(7)
    layer = make_layer(config, 16, 4, 3.5)
    # the first chunk's loudest value channels (0..7) are quiet later; channels 8..15 carry the sequence
    scale = torch.ones(2, 1, 30, 16)
    scale[..., :6, :8], scale[..., 6:, 8:] = 20.0, 20.0
    keys, values = torch.randn(2, 1, 30, 16, generator=gen), torch.randn(2, 1, 30, 16, generator=gen) * scale
    layer.lazy_initialization(keys, values)
    layer.update(keys[..., :6, :], values[..., :6, :])
    first = layer.value_codec
    assert layer._exact_values.shape == (2, 1, 6, 16)
    assert layer.memory()["full_precision_bytes"] == (layer._exact_keys.numel() + layer._exact_values.numel()) * 4
    layer.crop(-1)
    assert layer._exact_values.shape[-2] == layer.num_compressed == 5
    layer.update(keys[..., 6:, :], values[..., 6:, :])
    assert not layer.refit_pending and layer._exact_values is None and layer.value_codec is not first
    held = values[..., list(range(5)) + list(range(6, 30)), :]
    decoded = layer._decode(layer.value_codec, layer.compressed_values.parts, torch.float32, 0)
    before = first.decode(first.encode(held), torch.float32)
    assert (decoded - held).pow(2).sum() < 0.8 * (before - held).pow(2).sum()  # the refit split sees channels 8..15


def test_value_eigen_split_cuts_the_value_error_and_counts_its_basis():
    """`value_split`: values in their PCA basis (EigenValueCodec), the leading directions at the high bits. On
    correlated values (a random basis, energies spread 30x) it leaves much less error than the paper's outlier
    channels at the same 3.5 bits, decodes through the inverse of the stored B, and counts B (4-bit entries)."""
    from tqpatch.codec import EigenValueCodec

    gen = torch.Generator().manual_seed(4)
    d, heads = 64, 2
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
    values = (torch.randn(1, heads, 256, d, generator=gen) * torch.logspace(0, -1.5, d)) @ basis.T

    def error(codec):
        return ((codec.decode(codec.encode(values), torch.float32) - values).norm() / values.norm()).item()

    split = make_codec(d, 3.5, "mse", 0, split=(5, 2))
    assert isinstance(split, EigenValueCodec) and split.bits == 3.5
    assert error(split) < 0.6 * error(make_codec(d, 3.5, "mse", 0))
    assert split.extra_nbytes == split.inner.extra_nbytes + stored_nbytes(heads, d, symmetric=False, entry_bits=4)
    leading = values @ split.transform[0][0]  # the stored coordinates: energy decreasing
    energy = leading.pow(2).mean(dim=(0, 1, 2))
    assert energy[:8].mean() > 10 * energy[-8:].mean()


def test_value_split_config_and_patched_model():
    """`ev<high>.<low>` parses, labels and validates like `e`; full-attention layers store values through it."""
    config = TurboQuantConfig.from_spec("k4v3.5-s2-ev5.2")
    assert config.value_split == (5, 2) and config.name.endswith("-ev5.2")
    with pytest.raises(ValueError, match="value_split must be integer bits"):
        TurboQuantConfig(key_bits=4, value_bits=3.5, value_split=(3, 2))
    exact, out, cache = patched_in_chunks(tiny_model("llama"), prompt(length=40), config)
    from tqpatch.codec import EigenValueCodec

    assert all(isinstance(layer.value_codec, EigenValueCodec) and layer.value_codec.inner.calibrated for layer in cache.layers)
    assert torch.nn.functional.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.98


def test_split_rotation_search_keeps_the_seed_with_the_least_score_error_and_encodes_with_it():
    """`key_split_rotations` (spec er<N>): the eigen split's groups take the best of N rotation seeds by the
    query-weighted score error on the calibration chunk. The chosen codec is the one that encodes and decodes (a
    codec chosen after the encoder was picked would decode another rotation's codes: garbage), and its score error
    on that chunk is the smallest of the candidates'."""
    chosen = []
    for seed in range(4):
        queries, keys = _low_rank_queries_and_keys(tokens=64, seed=seed)
        codec = make_codec(32, 3, "mse", 0, rope=True, shape=True, split=(5, 1), split_rotations=6)
        codec.observe_queries(queries[:, :32], kv_heads=2)
        decoded = codec.decode(codec.encode(keys, 0), torch.float32, 0)
        assert ((decoded - keys).norm() / keys.norm()).item() < 0.4  # a 3-bit split's error, not another rotation's codes
        chosen.append(codec.inner.outlier.seed)
        stored = codec.center(keys, 0)
        m_inv = codec.shaping[1].double()
        metric = (m_inv @ codec.queries.mean @ m_inv.transpose(-1, -2)).float()

        def error(inner):
            e = inner.decode(inner.encode(stored), torch.float32) - stored
            return torch.einsum("bhti,hij,bhtj->", e, metric, e).item()

        assert error(codec.inner) <= min(error(codec.inner.with_seed(s)) for s in range(6)) * 1.001
    assert any(s != 0 for s in chosen)  # the search did move off the base seed: the swap path is exercised
    config = TurboQuantConfig.from_spec("k4v3-s4-ck-qs-n8-e6.2-er8-fit128")
    assert config.key_split_rotations == 8 and config.name == "k4v3-s4-ck-qs-n8-e6.2-er8-fit128"
    with pytest.raises(ValueError, match="key_split_rotations chooses"):
        TurboQuantConfig(key_bits=4, value_bits=4, key_split_rotations=4)

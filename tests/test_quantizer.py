import math

import pytest
import torch

from tqpatch import TurboQuantMSE, TurboQuantProd
from tqpatch.packing import packed_nbytes
from conftest import DEVICES

D = 128
N = 20_000
# Expected MSE of a unit vector (DESIGN.md §2) and the paper's upper bound.
EXPECTED_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


def unit_vectors(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_distortion_matches_theory(bits):
    x = unit_vectors(N, D, seed=bits)
    q = TurboQuantMSE(D, bits, seed=11, norm_dtype=torch.float32)
    mse = ((q.dequantize(q.quantize(x)) - x) ** 2).sum(-1).mean().item()
    assert mse == pytest.approx(EXPECTED_MSE[bits], rel=0.03)
    assert mse < math.sqrt(3) * math.pi / 2 * 4.0**-bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_prod_inner_product_unbiased_with_bounded_variance(bits):
    x = unit_vectors(N, D, seed=100 + bits)
    query = torch.randn(D, generator=torch.Generator().manual_seed(7)) * 3.0
    q = TurboQuantProd(D, bits, seed=5, norm_dtype=torch.float32)
    err = q.dequantize(q.quantize(x)) @ query - x @ query
    stderr = err.std().item() / math.sqrt(N)
    assert abs(err.mean().item()) < 3 * stderr
    bound = math.sqrt(3) * math.pi**2 * query.norm().item() ** 2 / D * 4.0**-bits
    assert err.var().item() < bound


def test_mse_inner_product_is_biased_prod_fixes_it():
    # The reason Algorithm 2 exists: ⟨q, x̃_mse⟩ shrinks towards 0 at low bits.
    x = unit_vectors(N, D, seed=1)
    query = x[0] * 0 + x.mean(0) + unit_vectors(1, D, seed=2)[0]
    mse_q, prod_q = TurboQuantMSE(D, 1), TurboQuantProd(D, 2)
    exact = x @ query
    ratio_mse = ((mse_q.dequantize(mse_q.quantize(x)) @ query) * exact).sum() / (exact * exact).sum()
    ratio_prod = ((prod_q.dequantize(prod_q.quantize(x)) @ query) * exact).sum() / (exact * exact).sum()
    assert ratio_mse < 0.7  # 2/π ≈ 0.64 shrinkage at 1 bit
    assert abs(ratio_prod - 1) < 0.05


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_unbiased_decoding_removes_the_mean_shrinkage(bits):
    """Lloyd-Max reconstructions are conditional means: E⟨u, ũ⟩ = 1 − D, so an average of many reconstructions
    shrinks by 1 − D. unbiased=True decodes ũ / (1 − D): the same codes, ⟨u, ũ⟩ = 1 on average, and the mean of
    vectors near a common direction comes back at its length."""
    x = unit_vectors(N, D, seed=20 + bits)
    plain = TurboQuantMSE(D, bits, seed=3, norm_dtype=torch.float32)
    unbiased = TurboQuantMSE(D, bits, seed=3, norm_dtype=torch.float32, unbiased=True)
    packed = plain.quantize(x)
    assert torch.equal(unbiased.quantize(x).codes, packed.codes)
    distortion = plain.codebook.unit_vector_mse
    assert unbiased.decode_gain == pytest.approx(1 / (1 - distortion)) and plain.decode_gain == 1.0
    assert torch.allclose(unbiased.dequantize(packed), plain.dequantize(packed) / (1 - distortion), atol=1e-6)
    stderr = 4 / math.sqrt(N)
    assert (plain.dequantize(packed) * x).sum(-1).mean().item() == pytest.approx(1 - distortion, abs=stderr)
    assert (unbiased.dequantize(packed) * x).sum(-1).mean().item() == pytest.approx(1.0, abs=stderr)
    # values that share a direction (as attention averages them): over random rotations the plain mean comes back
    # short by D along it, the unbiased one at its length (one rotation alone spreads by a few percent)
    common = unit_vectors(1, D, seed=9)[0]
    v = 0.8 * common + 0.6 * unit_vectors(2000, D, seed=30 + bits)
    target = v.mean(0) @ common

    def shrink(unbiased: bool) -> float:
        ratios = []
        for seed in range(8):
            q = TurboQuantMSE(D, bits, seed=seed, norm_dtype=torch.float32, unbiased=unbiased)
            ratios.append((q.dequantize(q.quantize(v)).mean(0) @ common).item() / target)
        return sum(ratios) / len(ratios)

    assert shrink(False) == pytest.approx(1 - distortion, abs=0.02)
    assert shrink(True) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("cls", [TurboQuantMSE, TurboQuantProd])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_shapes_dtypes_and_nbytes(cls, dtype, device):
    bits, d = 3, 64
    x = torch.randn(2, 3, 5, d, dtype=dtype, device=device)
    q = cls(d, bits)
    packed = q.quantize(x)
    out = q.dequantize(packed)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    vectors = 2 * 3 * 5
    code_bits = bits if cls is TurboQuantMSE else bits - 1
    expected = vectors * (packed_nbytes(d, code_bits) + 2)  # codes + fp16 norm
    if cls is TurboQuantProd:
        expected += vectors * (packed_nbytes(d, 1) + 2)  # sign bits + fp16 residual norm
    assert packed.nbytes == expected
    assert packed.codes.dtype == torch.uint8


@pytest.mark.parametrize("bits", range(1, 9))
def test_rotated_domain_scores_equal_dequantized_dot_products(bits):
    keys = torch.randn(2, 40, 64) * 4
    queries = torch.randn(2, 3, 64)
    for q in (TurboQuantMSE(64, bits), TurboQuantProd(64, bits)):
        packed = q.quantize(keys)
        expected = queries @ q.dequantize(packed).transpose(-1, -2)
        assert torch.allclose(q.scores(queries, packed), expected, rtol=1e-4, atol=1e-3)


def test_error_shrinks_with_bits_and_8_bits_is_near_exact():
    x = torch.randn(1000, 64)
    errs = []
    for bits in range(1, 9):
        q = TurboQuantMSE(64, bits)
        errs.append(((q.dequantize(q.quantize(x)) - x) ** 2).sum() / (x**2).sum())
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-4


@pytest.mark.parametrize("cls", [TurboQuantMSE, TurboQuantProd])
def test_zero_vector_round_trips_to_zero(cls):
    q = cls(64, 3)
    x = torch.zeros(4, 64)
    x[1] = 1.0
    out = q.dequantize(q.quantize(x))
    assert torch.equal(out[0], torch.zeros(64)) and torch.equal(out[2:], torch.zeros(2, 64))
    assert out[1].abs().sum() > 0


@pytest.mark.parametrize("cls", [TurboQuantMSE, TurboQuantProd])
def test_bad_input_errors(cls):
    with pytest.raises(ValueError, match=r"1\.\.8"):
        cls(64, 9)
    with pytest.raises(ValueError, match=r"1\.\.8"):
        cls(64, 0)
    q = cls(64, 2)
    with pytest.raises(ValueError, match="head_dim=64"):
        q.quantize(torch.randn(3, 32))
    with pytest.raises(TypeError, match="floating"):
        q.quantize(torch.ones(3, 64, dtype=torch.int32))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(3, 64)
        x[1, 5] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            q.quantize(x)


def test_norm_overflow_is_an_error_not_inf():
    q = TurboQuantMSE(64, 4)
    with pytest.raises(ValueError, match="float32"):
        q.quantize(torch.full((1, 64), 1e5))
    big = TurboQuantMSE(64, 4, norm_dtype=torch.float32)
    assert torch.isfinite(big.dequantize(big.quantize(torch.full((1, 64), 1e5)))).all()


def test_same_seed_same_codes_different_seed_different_codes():
    x = torch.randn(10, 64)
    a, b, c = TurboQuantMSE(64, 4, seed=1), TurboQuantMSE(64, 4, seed=1), TurboQuantMSE(64, 4, seed=2)
    assert torch.equal(a.quantize(x).codes, b.quantize(x).codes)
    assert not torch.equal(a.quantize(x).codes, c.quantize(x).codes)

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from tqpatch.codebook import (
    SHIPPED_BITS,
    SHIPPED_DIMS,
    _interval_moments,
    build_codebook,
    codebook_path,
    coordinate_density,
    get_codebook,
    load_codebook_file,
)

# Expected MSE of a unit vector, large d (Lloyd-Max for the Gaussian): DESIGN.md §2.
LARGE_D_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


def test_density_integrates_to_one():
    for d in (3, 16, 64, 256):
        total, _ = quad(lambda t: coordinate_density(np.array([t]), d)[0], -1, 1)
        assert total == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("d", [16, 64, 128])
def test_closed_form_moments_match_quadrature(d):
    lo, hi = np.array([-0.3, 0.01]), np.array([0.05, 0.4])
    mass, moment = _interval_moments(lo, hi, d)
    for k in range(2):
        m_quad, _ = quad(lambda t: coordinate_density(np.array([t]), d)[0], lo[k], hi[k])
        t_quad, _ = quad(lambda t: t * coordinate_density(np.array([t]), d)[0], lo[k], hi[k])
        assert mass[k] == pytest.approx(m_quad, rel=1e-9)
        assert moment[k] == pytest.approx(t_quad, rel=1e-8, abs=1e-14)


@pytest.mark.parametrize("d", SHIPPED_DIMS)
@pytest.mark.parametrize("bits", SHIPPED_BITS)
def test_shipped_codebooks_exist_sorted_symmetric(d, bits):
    path = codebook_path(d, bits)
    assert path.exists(), f"missing shipped codebook {path}"
    book = load_codebook_file(path)
    assert (book.d, book.bits) == (d, bits)
    c = book.centroids
    assert c.shape == (2**bits,) and c.dtype == torch.float64
    assert torch.all(c[1:] > c[:-1]), "centroids must be strictly increasing"
    assert torch.allclose(c, -c.flip(0), atol=1e-12), "centroids must be symmetric about 0"
    assert torch.allclose(book.boundaries, (c[1:] + c[:-1]) / 2)
    assert 4.0**-bits * 0.8 < book.unit_vector_mse < math.sqrt(3) * math.pi / 2 * 4.0**-bits


@pytest.mark.parametrize("d,bits", [(16, 8), (64, 3), (128, 4), (128, 8), (256, 6)])
def test_shipped_equals_fresh_rebuild(d, bits):
    shipped = load_codebook_file(codebook_path(d, bits))
    fresh = build_codebook(d, bits)
    scale = 1 / math.sqrt(d)
    assert torch.allclose(shipped.centroids, fresh.centroids, atol=10 * shipped.tolerance * scale, rtol=0)
    assert shipped.distortion == pytest.approx(fresh.distortion, rel=1e-9)


@pytest.mark.parametrize("bits,mse", LARGE_D_MSE.items())
def test_codebook_distortion_close_to_large_d_limit(bits, mse):
    # d = 256 is close to the Gaussian limit; the exact-density quantizer is a little better.
    assert get_codebook(256, bits).unit_vector_mse == pytest.approx(mse, rel=0.02)


def test_large_d_centroids_match_design_notes():
    d = 256
    assert get_codebook(d, 1).centroids[-1].item() * math.sqrt(d) == pytest.approx(math.sqrt(2 / math.pi), rel=0.01)
    c2 = get_codebook(d, 2).centroids * math.sqrt(d)
    assert c2[2].item() == pytest.approx(0.453, rel=0.01)
    assert c2[3].item() == pytest.approx(1.51, rel=0.01)


def test_missing_pair_builds_with_warning_naming_command():
    get_codebook.cache_clear()
    with pytest.warns(UserWarning, match="tqpatch build-codebooks --dims 44 --bits 3"):
        book = get_codebook(44, 3)
    assert book.d == 44 and book.centroids.shape == (8,)


@pytest.mark.parametrize("bits", [0, 9])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=r"1\.\.8"):
        get_codebook(64, bits)

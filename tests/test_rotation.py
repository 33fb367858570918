import numpy as np
import pytest
import torch
from scipy.stats import beta, kstest

from tqpatch.rotation import haar_rotation, qjl_matrix
from conftest import DEVICES


@pytest.mark.parametrize("d", [16, 64, 128])
def test_orthogonal(d):
    q = haar_rotation(d, seed=3, dtype=torch.float64)
    assert torch.allclose(q @ q.T, torch.eye(d, dtype=torch.float64), atol=1e-12)


def test_seeded_and_distinct():
    assert torch.equal(haar_rotation(64, 7), haar_rotation(64, 7))
    assert not torch.equal(haar_rotation(64, 7), haar_rotation(64, 8))
    assert not torch.allclose(qjl_matrix(64, 7), haar_rotation(64, 7))


@pytest.mark.parametrize("device", DEVICES)
def test_same_matrix_on_every_device(device):
    assert torch.equal(haar_rotation(128, 5, device=device).cpu(), haar_rotation(128, 5))
    assert torch.equal(qjl_matrix(128, 5, device=device).cpu(), qjl_matrix(128, 5))


def test_haar_first_column_follows_sphere_density():
    # A coordinate of Π e1 over many seeds: (1 + t)/2 ~ Beta((d-1)/2, (d-1)/2).
    d = 16
    t = np.array([haar_rotation(d, seed=s, dtype=torch.float64)[0, 0].item() for s in range(2000)])
    a = (d - 1) / 2
    assert kstest((1 + t) / 2, beta(a, a).cdf).pvalue > 0.01
    # Without the sign fix the diagonal entry of Q is biased; with it, its mean is ~0.
    assert abs(t.mean()) < 4 * t.std() / np.sqrt(len(t))


def test_qjl_is_standard_gaussian():
    s = qjl_matrix(256, 1)
    assert s.mean().abs() < 0.01 and (s.std() - 1).abs() < 0.01

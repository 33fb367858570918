"""Seeded random matrices: the Haar rotation Π and the QJL projection S.

Both are drawn on the CPU in float64 from a seeded torch.Generator and then
moved to the requested device, so one seed gives the same matrix on every
device (CPU, any CUDA card) and in every process.
"""

from __future__ import annotations

import functools

import torch

# Different streams for Π and S, so that seed s never reuses Π's Gaussians for S.
_ROTATION_STREAM = 0x5EED_0001
_QJL_STREAM = 0x5EED_0002


def _gaussian(d: int, seed: int, stream: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + stream) % (2**63))
    return torch.randn(d, d, generator=generator, dtype=torch.float64)


@functools.lru_cache(maxsize=64)
def _haar_cpu(d: int, seed: int) -> torch.Tensor:
    gaussian = _gaussian(d, seed, _ROTATION_STREAM)
    q, r = torch.linalg.qr(gaussian)
    # Fold the signs of diag(R) into Q: without this the law of Q is not Haar.
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs.unsqueeze(0)


def haar_rotation(d: int, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A Haar-random orthogonal matrix Π [d, d]; rotate a row vector x by y = x @ Π.T."""
    if d < 1:
        raise ValueError(f"dimension must be positive, got {d}")
    return _haar_cpu(d, seed).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _qjl_cpu(d: int, seed: int) -> torch.Tensor:
    return _gaussian(d, seed, _QJL_STREAM)


def qjl_matrix(d: int, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The QJL projection S [d, d] with i.i.d. N(0, 1) entries."""
    if d < 1:
        raise ValueError(f"dimension must be positive, got {d}")
    return _qjl_cpu(d, seed).to(device=device, dtype=dtype)

"""Rotary position embedding (RoPE), recovered from the (cos, sin) a model hands its attention layers.

RoPE turns a pre-RoPE key k at position p into R_p k, rotating each channel
pair (j, j + d/2) by the angle p·f_j and scaling by `s` (1 for plain RoPE):

    R_p k = k ⊙ cos_p + rotate_half(k) ⊙ sin_p,   cos_p[j] = s·cos(p·f_j),  sin_p[j] = s·sin(p·f_j)

`RopeTable.fit` reads f [d/2] and s from one call's cos/sin [B, T, d]: the
angle advances by exactly f_j from one token to the next, so averaging the
wrapped steps over consecutive tokens gives f (unambiguous while f_j < π,
true of every RoPE variant in transformers). Knowing f, any position's
rotation can be recomputed, so a store can add R_p μ back to a compressed key
without storing anything per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the halves of the last axis."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class RopeTable:
    """The rotations R_p of one layer: frequencies f [d/2] (float64) and scale s."""

    # A fit is accepted when every token-to-token step is within this many radians of the mean step.
    TOLERANCE = 0.05

    def __init__(self, frequencies: torch.Tensor, scale: float):
        self.frequencies = frequencies.double().cpu()
        self.scale = float(scale)
        self.head_dim = 2 * self.frequencies.numel()
        self._table_key = (self.frequencies.numpy().tobytes(), self.scale)  # equal for all layers with this RoPE

    @classmethod
    def fit(cls, cos: torch.Tensor, sin: torch.Tensor) -> RopeTable | None:
        """Frequencies and scale from cos/sin [B, T, d] (or [T, d]) of T ≥ 3 consecutive positions, else None.

        None too when the layout is not transformers' rotate_half one (equal
        halves), e.g. interleaved or partial RoPE, or the steps disagree.
        """
        cos = cos.detach().double().cpu().reshape(-1, *cos.shape[-2:])[0]  # row 0: [T, d]
        sin = sin.detach().double().cpu().reshape(-1, *sin.shape[-2:])[0]
        tokens, d = cos.shape
        if tokens < 3 or d % 2:
            return None
        half = d // 2
        if not (torch.allclose(cos[:, :half], cos[:, half:]) and torch.allclose(sin[:, :half], sin[:, half:])):
            return None
        scale = torch.hypot(cos, sin).mean().item()
        angles = torch.atan2(sin[:, :half], cos[:, :half])  # [T, d/2]
        steps = torch.remainder(angles[1:] - angles[:-1] + math.pi, 2 * math.pi) - math.pi  # wrapped to [-π, π)
        frequencies = steps.mean(dim=0)
        if scale <= 0 or (steps - frequencies).abs().max().item() > cls.TOLERANCE:
            return None
        return cls(frequencies, scale)

    def cos_sin(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_p, sin_p [T, d] float32 for positions [T]."""
        angles = positions.double().cpu()[:, None] * self.frequencies[None, :]  # [T, d/2]
        angles = torch.cat([angles, angles], dim=-1)
        return (self.scale * angles.cos()).float().to(device), (self.scale * angles.sin()).float().to(device)

    def cos_sin_range(self, first: int, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_p, sin_p [count, d] float32 for positions first .. first + count - 1 (views of `joined_range`)."""
        joined = self.joined_range(first, count, device)
        return joined[:, : self.head_dim], joined[:, self.head_dim :]

    def joined_range(self, first: int, count: int, device: torch.device) -> torch.Tensor:
        """[cos_p | sin_p] [count, 2d] float32 for positions first .. first + count - 1, sliced from a table
        kept per device and shared by every RopeTable with the same frequencies (all layers of a model
        with one RoPE), grown by doubling: a decode step over L cached tokens costs a slice, not L·d/2
        cosines."""
        key = (*self._table_key, str(torch.device(device)))
        table = _TABLES.get(key)
        needed = first + count
        if table is None or table.shape[0] < needed:
            size = max(needed, 2 * (0 if table is None else table.shape[0]), 1024)
            table = torch.cat(self.cos_sin(torch.arange(size), device), dim=-1)
            _TABLES[key] = table
        return table[first:needed]

    def apply(self, x: torch.Tensor, first_position: int) -> torch.Tensor:
        """R_p x for x [..., T, d] at positions first_position, first_position + 1, ... (float32)."""
        cos, sin = self.cos_sin_range(first_position, x.shape[-2], x.device)
        x = x.float()
        return x * cos + rotate_half(x) * sin

    def invert(self, x: torch.Tensor, first_position: int) -> torch.Tensor:
        """R_p⁻¹ x (the pre-RoPE vectors) for x [..., T, d] at consecutive positions (float32)."""
        cos, sin = self.cos_sin_range(first_position, x.shape[-2], x.device)
        x = x.float()
        return (x * cos - rotate_half(x) * sin) / self.scale**2


# (frequencies, scale, device) -> [cos | sin] [P, 2d] float32 for positions 0 .. P-1
_TABLES: dict[tuple, torch.Tensor] = {}


@dataclass(frozen=True)
class RopeBias:
    """The scores' position bias of RoPE-centered keys, ⟨q, R_p μ⟩, in factored form (nothing of size L built).

    With R_p μ = μ ⊙ cos_p + rotate_half(μ) ⊙ sin_p and each table half repeating the d/2 frequencies f:

        ⟨q, R_p μ⟩ = Σ_f A_f C_p[f] + B_f S_p[f],   A = (q ⊙ μ)[:d/2] + (q ⊙ μ)[d/2:],  B likewise with rotate_half(μ)

    (C_p | S_p) = (s·cos(p f) | s·sin(p f)), row p of `table`. Compressed token j sits at position first + j.
    The decode kernel evaluates it tile by tile from the rows of p0 and of the in-tile offsets t (angle addition:
    s·C_p0+t = C_p0 C_t - S_p0 S_t); `dense` is the reference.
    """

    coefficients: torch.Tensor  # [B, Hq, d] float32: [A | B]
    table: torch.Tensor  # [rows, 2d] float32, contiguous; row p = position p
    first: int
    scale: float  # s

    def dense(self, length: int) -> torch.Tensor:
        """The bias [B, Hq, length] float32 of compressed tokens 0 .. length-1."""
        h = self.coefficients.shape[-1] // 2
        d = 2 * h
        rows = self.table[self.first : self.first + length]
        a, b = self.coefficients[..., :h], self.coefficients[..., h:]
        return a @ rows[:, :h].T + b @ rows[:, d : d + h].T

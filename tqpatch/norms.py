"""8-bit vector norms: log-uniform codes with a per-head range fixed from the first chunk.

TurboQuant stores one norm per vector beside its b·d code bits. In float16
that is 16/d bits per coordinate: 0.25 bits at d = 64 (0.5 for a fractional
setting, whose two channel groups carry a norm each), as much as a quarter of
a 2-bit budget. Norms of one head's keys or values spread over a few octaves
at most, so 8 bits on a log scale keep them to within a fraction of a percent:

    code = 1 + round((log2 n - lo_h) / step_h), clamped to 1..255;  code 0 <=> n = 0
    n̂    = 2^(lo_h + (code - 1) · step_h)

lo_h and step_h [H] cover the first chunk's range per head widened by `margin`
octaves on both sides (later tokens may be larger or smaller). With a 2-octave
spread and the default margin of 4 that is 10 octaves in 254 steps:
|n̂/n - 1| ≤ 1.4%, RMS 0.8%, which adds ~0.7% to a 4-bit code's squared error
(TurboQuant_mse's 0.0095 relative) and less at fewer bits. Norms outside the
range are clamped to its ends.

A norm off by ε scales a key's whole score ⟨q, k⟩ by 1 + ε, so the error
matters more for keys than its share of the squared error says. A smaller
margin buys precision and risks clamping: 1 octave (4 octaves in 254 steps,
RMS 0.33%) cuts SmolLM2's attention-weighted score error by ~2.5% and clamps
0.03% of its norms, but clamps 1.1% of Gemma-3's (errors up to 4×) and costs
it perplexity (README, "8-bit norm margin"). The default stays 4.
"""

from __future__ import annotations

import torch

NORM_BITS = (16, 8)  # float16 (TurboQuant's) or these log codes
MARGIN = 4.0  # default octaves added below the smallest and above the largest norm of the first chunk
MAX_MARGIN = 16.0
FALLBACK = (-16.0, 16.0)  # log2 range of a head whose first chunk had no nonzero norm


class LogNormQuantizer:
    """Norms [B, H, T] <-> uint8 codes, log-uniform per head (module docstring). Calibrates on its first `encode`."""

    LEVELS = 255  # codes 1..255; 0 is an exact zero norm

    def __init__(self, margin: float = MARGIN) -> None:
        check_norm_margin(margin)
        self.margin = float(margin)  # octaves added on both sides of the calibration range
        self.low: torch.Tensor | None = None  # [H] float32, log2 of the norm that code 1 stands for
        self.step: torch.Tensor | None = None  # [H] float32, octaves per code
        self._ranges: dict[torch.device, torch.Tensor] = {}

    @property
    def calibrated(self) -> bool:
        return self.low is not None

    def calibrate(self, norms: torch.Tensor) -> None:
        """Fix lo_h and step_h from the norms [B, H, T] of the first chunk."""
        logs = norms.float().transpose(0, 1).reshape(norms.shape[1], -1).log2()  # [H, B*T]
        finite = torch.isfinite(logs)
        low = torch.where(finite, logs, torch.inf).amin(-1)
        high = torch.where(finite, logs, -torch.inf).amax(-1)
        empty = ~finite.any(-1)
        low = torch.where(empty, torch.full_like(low, FALLBACK[0]), low - self.margin)
        high = torch.where(empty, torch.full_like(high, FALLBACK[1]), high + self.margin)
        self.low = low
        self.step = (high - low).clamp_min(1e-3) / (self.LEVELS - 1)
        self._ranges = {}

    def ranges(self, device: torch.device) -> torch.Tensor:
        """[low | step] as one [2, H] float32 tensor on `device` (what the kernels read), made once per device."""
        device = torch.device(device)
        if device not in self._ranges:
            self._ranges[device] = torch.stack([self.low, self.step]).float().to(device).contiguous()
        return self._ranges[device]

    def encode(self, norms: torch.Tensor) -> torch.Tensor:
        """norms [B, H, T] (any float dtype, >= 0) -> uint8 codes [B, H, T]."""
        if not self.calibrated:
            self.calibrate(norms)
        low, step = self.low.to(norms.device)[None, :, None], self.step.to(norms.device)[None, :, None]
        logs = norms.float().clamp_min(torch.finfo(torch.float32).tiny).log2()
        codes = (1 + torch.round((logs - low) / step)).clamp(1, self.LEVELS)
        return torch.where(norms > 0, codes, 0).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes [B, H, T] -> norms [B, H, T] float32."""
        low, step = self.low.to(codes.device)[None, :, None], self.step.to(codes.device)[None, :, None]
        norms = torch.exp2(low + (codes.float() - 1) * step)
        return torch.where(codes > 0, norms, 0.0)

    @property
    def extra_nbytes(self) -> int:
        """lo and step per head, float32."""
        return 0 if self.low is None else 8 * self.low.numel()


def check_norm_bits(norm_bits) -> None:
    if isinstance(norm_bits, bool) or norm_bits not in NORM_BITS:
        raise ValueError(f"norm_bits must be one of {NORM_BITS} (float16 norms or 8-bit log codes), got {norm_bits!r}")


def check_norm_margin(margin) -> None:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= MAX_MARGIN:
        raise ValueError(f"norm_margin must be a number of octaves in 0..{MAX_MARGIN:g}, got {margin!r}")

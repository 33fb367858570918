"""TurboQuant_mse (Algorithm 1) and TurboQuant_prod (Algorithm 2) in plain PyTorch.

This module is the reference implementation: every GPU kernel is tested
against it. All maths runs in float32 whatever the input dtype; vectors live
in the last dimension, any leading batch shape is allowed.

TurboQuant_mse, b bits, for x ∈ R^d:
    n = ‖x‖,  u = x / n,  y = Π u,  idx_j = argmin_k |y_j - c_k|
    x̃ = n · Πᵀ c[idx]
TurboQuant_prod, b bits: TurboQuant_mse with b-1 bits on u, residual
r = u - ũ_mse, γ = ‖r‖, signs = sign(S r); then
    x̃ = n · (ũ_mse + √(π/2)/d · γ · Sᵀ signs)
so ⟨q, x̃⟩ is an unbiased estimate of ⟨q, x⟩.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .codebook import get_codebook
from .packing import byte_table, check_bits, pack_codes, packed_nbytes, unpack_codes
from .rotation import haar_rotation, qjl_matrix
from .trellis import decode_packed, get_trellis, viterbi_encode
from .trellis import unit_vector_mse as trellis_unit_vector_mse

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class QuantizedVectors:
    """Compressed vectors: everything that is stored, nothing else.

    codes:          [..., ceil(d*b_mse/8)] uint8, bit-packed centroid indices (b_mse may be 0)
    norms:          [...]                  norm dtype (float16 by default), ‖x‖
    qjl_signs:      [..., ceil(d/8)]       uint8, packed sign bits of S r (prod only)
    residual_norms: [...]                  norm dtype, γ = ‖r‖ of the unit vector's residual (prod only)
    dtype:          the dtype x had, restored by dequantize
    """

    codes: torch.Tensor
    norms: torch.Tensor
    qjl_signs: torch.Tensor | None = None
    residual_norms: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    @property
    def nbytes(self) -> int:
        """Bytes held by every stored tensor."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def batch_shape(self) -> torch.Size:
        return self.norms.shape


def check_input(x: torch.Tensor, head_dim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"expected a floating tensor (one of {[str(t) for t in FLOAT_DTYPES]}), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != head_dim:
        raise ValueError(f"expected last dimension head_dim={head_dim}, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("input contains NaN or Inf; refusing to quantize it into the cache")


def _check_shape_args(head_dim: int, bits: int) -> None:
    check_bits(bits)
    if not isinstance(head_dim, int) or head_dim < 3:
        raise ValueError(f"head_dim must be an integer >= 3, got {head_dim!r}")


def _norm_and_direction(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n = ‖x‖ [...], u = x / n [..., d]) in float32; a zero vector gives n = 0, u = 0."""
    x32 = x.float()
    norms = torch.linalg.vector_norm(x32, dim=-1)
    return norms, x32 / norms.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)


def _to_norm_dtype(norms: torch.Tensor, norm_dtype: torch.dtype) -> torch.Tensor:
    stored = norms.to(norm_dtype)
    if not bool(torch.isfinite(stored).all()):
        raise ValueError(f"a vector norm ({norms.max().item():.4g}) overflows {norm_dtype}; use norm_dtype=torch.float32")
    return stored


class TurboQuantMSE:
    """TurboQuant_mse: b-bit Lloyd-Max codes of the Haar-rotated unit vector, plus its norm.

    >>> q = TurboQuantMSE(128, bits=4)
    >>> packed = q.quantize(x)            # x: [..., 128]
    >>> x_hat = q.dequantize(packed)      # [..., 128], x's dtype
    """

    def __init__(self, head_dim: int, bits: int, seed: int = 0, norm_dtype: torch.dtype = torch.float16, unbiased: bool = False,
                 trellis: bool = False):
        _check_shape_args(head_dim, bits)
        self.head_dim = head_dim
        self.bits = bits
        self.seed = seed
        self.norm_dtype = norm_dtype
        self.unbiased = unbiased
        self.trellis = get_trellis(bits) if trellis else None  # trellis codes (`tqpatch.trellis`): same bits, decoded by windows
        self.codebook = get_codebook(head_dim, bits)
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._tables: dict[torch.device, torch.Tensor] = {}

    @property
    def decode_gain(self) -> float:
        """1 / (1 − D) when `unbiased`, else 1; D = E‖u − ũ‖² of a unit vector (the codebook's MSE).

        Lloyd-Max centroids are conditional means, so E⟨u, ũ⟩ = E‖ũ‖² = 1 − D: a reconstruction is shrunk
        towards 0 on average, and a sum of many (an attention output Σ p_t ṽ_t, or the scores' scale) shrinks
        by 1 − D where the independent errors average out. Decoding ũ / (1 − D) removes that bias and costs
        (1 − D)⁻² more noise per vector (`TurboQuantConfig.unbias_values`, `unbias_keys`). Codes are unchanged."""
        return 1.0 / (1.0 - self.unit_vector_mse) if self.unbiased else 1.0

    @property
    def unit_vector_mse(self) -> float:
        """D = E‖u − ũ‖² of a unit vector: the Lloyd-Max codebook's, or the trellis code's at this d."""
        return self.codebook.unit_vector_mse if self.trellis is None else trellis_unit_vector_mse(self.head_dim, self.bits)

    # -- per-device constants -------------------------------------------------
    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Π [d, d], centroids [2^b] (times `decode_gain`), boundaries [2^b - 1]) in float32 on `device`."""
        device = torch.device(device)
        if device not in self._device_cache:
            self._device_cache[device] = (
                haar_rotation(self.head_dim, self.seed, device),
                (self.codebook.centroids * self.decode_gain).to(device=device, dtype=torch.float32),
                self.codebook.boundaries.to(device=device, dtype=torch.float32),
            )
        return self._device_cache[device]

    def rotation(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return self._constants(torch.device(device))[0]

    def centroids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return self._constants(torch.device(device))[1]

    # -- rotated-domain pieces (what a fused attention kernel uses) -----------
    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """y = Π x for each row: [..., d] -> [..., d] float32."""
        return x.float() @ self.rotation(x.device).T

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """x = Πᵀ y for each row: [..., d] -> [..., d] float32."""
        return y.float() @ self.rotation(y.device)

    def encode_unit(self, u: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest centroids of Π u: [..., d] float32 -> [..., d] int64."""
        if self.trellis is not None:  # the Viterbi search over the whole vector, at unit coordinate variance
            y = self.rotate(u) * math.sqrt(self.head_dim)
            return viterbi_encode(y.reshape(-1, self.head_dim), self.trellis).view(y.shape)
        _, _, boundaries = self._constants(u.device)
        return torch.bucketize(self.rotate(u), boundaries)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Rotated unit-scale reconstruction ỹ = c[idx]: packed [..., nbytes] uint8 -> [..., d] float32."""
        if self.trellis is not None:
            gain = self.decode_gain / math.sqrt(self.head_dim)
            return decode_packed(codes, self.trellis, self.head_dim) * gain
        if 8 % self.bits:
            return self.centroids(codes.device)[unpack_codes(codes, self.bits, self.head_dim)]
        if codes.device not in self._tables:  # bits 1, 2, 4, 8: one gather per byte
            self._tables[codes.device] = byte_table(self.centroids(codes.device), self.bits)
        return self._tables[codes.device][codes.long()].flatten(-2)[..., : self.head_dim]

    # -- public API ----------------------------------------------------------
    @property
    def code_nbytes(self) -> int:
        return packed_nbytes(self.head_dim, self.bits)

    def quantize(self, x: torch.Tensor) -> QuantizedVectors:
        check_input(x, self.head_dim)
        norms, unit = _norm_and_direction(x)
        codes = pack_codes(self.encode_unit(unit), self.bits)
        return QuantizedVectors(codes=codes, norms=_to_norm_dtype(norms, self.norm_dtype), dtype=x.dtype)

    def dequantize_unit(self, q: QuantizedVectors) -> torch.Tensor:
        """ũ = Πᵀ c[idx], the reconstruction of the unit vector: [..., d] float32."""
        return self.unrotate(self.lookup(q.codes))

    def dequantize(self, q: QuantizedVectors) -> torch.Tensor:
        return (q.norms.float().unsqueeze(-1) * self.dequantize_unit(q)).to(q.dtype)

    def scores(self, query: torch.Tensor, q: QuantizedVectors) -> torch.Tensor:
        """⟨query_i, x̃_j⟩ = n_j ⟨Π query_i, c[idx_j]⟩ without un-rotating any key.

        query: [..., Lq, d], q: batch shape [..., Lk] -> [..., Lq, Lk] float32.
        """
        rotated = self.rotate(query)
        return (rotated @ self.lookup(q.codes).transpose(-1, -2)) * q.norms.float().unsqueeze(-2)

    @property
    def coordinate_variance(self) -> float:
        """Var of one rotated coordinate of a unit vector given its code, on average: D / d (D the codebook's
        unit-vector MSE). Lloyd-Max centroids are conditional means, so the score error ⟨q, x - x̃⟩ has zero mean
        given the codes and variance ≈ ‖x‖² ‖q‖² D / d (`codec.score_variance`). Not for `unbiased` decoding."""
        if self.unbiased:
            raise ValueError("the score variance is for codes decoded as conditional means, not unbiased (c / (1 - D)) decoding")
        return self.unit_vector_mse / self.head_dim


class TurboQuantProd:
    """TurboQuant_prod: (b-1)-bit TurboQuant_mse plus a 1-bit QJL sketch of the residual.

    The estimate ⟨q, x̃⟩ of ⟨q, x⟩ is unbiased, with variance at most
    √3·π²·‖q‖²·‖x‖²/d · 4^-b.
    """

    def __init__(self, head_dim: int, bits: int, seed: int = 0, norm_dtype: torch.dtype = torch.float16):
        _check_shape_args(head_dim, bits)
        self.head_dim = head_dim
        self.bits = bits
        self.seed = seed
        self.norm_dtype = norm_dtype
        self.mse = TurboQuantMSE(head_dim, bits - 1, seed, norm_dtype) if bits > 1 else None
        self.qjl_scale = math.sqrt(math.pi / 2) / head_dim
        self._qjl_cache: dict[torch.device, torch.Tensor] = {}

    def qjl(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """S [d, d] float32 on `device`."""
        device = torch.device(device)
        if device not in self._qjl_cache:
            self._qjl_cache[device] = qjl_matrix(self.head_dim, self.seed, device)
        return self._qjl_cache[device]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """S x for each row: [..., d] -> [..., d] float32."""
        return x.float() @ self.qjl(x.device).T

    def signs(self, q: QuantizedVectors) -> torch.Tensor:
        """The stored signs as ±1: [..., d] float32."""
        return unpack_codes(q.qjl_signs, 1, self.head_dim).float() * 2 - 1

    def quantize(self, x: torch.Tensor) -> QuantizedVectors:
        check_input(x, self.head_dim)
        norms, unit = _norm_and_direction(x)
        if self.mse is not None:
            codes = pack_codes(self.mse.encode_unit(unit), self.mse.bits)
            base = self.mse.unrotate(self.mse.lookup(codes))
        else:
            codes = torch.zeros(*unit.shape[:-1], 0, dtype=torch.uint8, device=x.device)
            base = torch.zeros_like(unit)
        residual = unit - base
        sign_bits = (self.project(residual) >= 0).to(torch.uint8)
        return QuantizedVectors(
            codes=codes,
            norms=_to_norm_dtype(norms, self.norm_dtype),
            qjl_signs=pack_codes(sign_bits, 1),
            residual_norms=_to_norm_dtype(torch.linalg.vector_norm(residual, dim=-1), self.norm_dtype),
            dtype=x.dtype,
        )

    def dequantize_unit(self, q: QuantizedVectors) -> torch.Tensor:
        base = self.mse.dequantize_unit(q) if self.mse is not None else 0.0
        correction = self.qjl_scale * q.residual_norms.float().unsqueeze(-1) * (self.signs(q) @ self.qjl(q.norms.device))
        return base + correction

    def dequantize(self, q: QuantizedVectors) -> torch.Tensor:
        return (q.norms.float().unsqueeze(-1) * self.dequantize_unit(q)).to(q.dtype)

    def scores(self, query: torch.Tensor, q: QuantizedVectors) -> torch.Tensor:
        """⟨query_i, x̃_j⟩ in sketch space: n_j (⟨Π q, c[idx_j]⟩ + √(π/2)/d · γ_j ⟨S q, sign_j⟩).

        query: [..., Lq, d], q: batch shape [..., Lk] -> [..., Lq, Lk] float32.
        """
        qjl_term = (self.project(query) @ self.signs(q).transpose(-1, -2)) * (self.qjl_scale * q.residual_norms.float().unsqueeze(-2))
        base = self.mse.rotate(query) @ self.mse.lookup(q.codes).transpose(-1, -2) if self.mse is not None else 0.0
        return (base + qjl_term) * q.norms.float().unsqueeze(-2)

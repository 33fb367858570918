"""Bit-packing of b-bit codes (1 <= b <= 8) into uint8.

Layout: the codes of one vector form an LSB-first bit stream. Code i occupies
bits [i*b, (i+1)*b) of the stream, and stream bit j lives in byte j // 8 at bit
position j % 8. A vector of d codes therefore takes exactly ceil(d*b/8) bytes.
For b = 4 this is "code 2k in the low nibble of byte k, code 2k+1 in the high
nibble"; for b = 2 four codes per byte, lowest first. Kernels read the same
layout (a b-bit code starting at stream bit s spans bytes s//8 and (s+b-1)//8).
"""

from __future__ import annotations

import torch

VALID_BITS = tuple(range(1, 9))


def packed_nbytes(num_codes: int, bits: int) -> int:
    """Bytes used by `num_codes` codes of `bits` bits: ceil(num_codes * bits / 8)."""
    check_bits(bits)
    return (num_codes * bits + 7) // 8


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in VALID_BITS:
        raise ValueError(f"bits must be an integer in 1..8 (valid: {list(VALID_BITS)}), got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dimension.

    codes: [..., d] any integer dtype. Returns [..., ceil(d*bits/8)] uint8.
    """
    check_bits(bits)
    d = codes.shape[-1]
    nbytes = packed_nbytes(d, bits)
    if bits == 8:
        return codes.to(torch.uint8)
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, lowest code in the lowest bits
        per_byte = 8 // bits
        pad = nbytes * per_byte - d
        grouped = torch.nn.functional.pad(codes.to(torch.int32), (0, pad)).unflatten(-1, (nbytes, per_byte))
        shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
        return (grouped << shifts).sum(-1).to(torch.uint8)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    stream = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # [..., d, bits]
    stream = stream.flatten(-2)  # [..., d*bits]
    pad = nbytes * 8 - d * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.unflatten(-1, (nbytes, 8))  # [..., nbytes, 8]
    weights = torch.arange(8, device=codes.device, dtype=torch.int32)
    return (stream << weights).sum(-1).to(torch.uint8)


def byte_table(values: torch.Tensor, bits: int) -> torch.Tensor:
    """For bits in {1, 2, 4, 8}: the [256, 8/bits] table mapping a packed byte to the values of its codes.

    values: [2^bits]. Decoding then is one gather per byte: table[packed].flatten(-2).
    """
    if 8 % bits:
        raise ValueError(f"byte tables need bits dividing 8 (1, 2, 4, 8), got {bits}")
    every_byte = torch.arange(256, device=values.device, dtype=torch.uint8).unsqueeze(-1)
    return values[unpack_codes(every_byte, bits, 8 // bits)]


def unpack_codes(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of `pack_codes`: [..., ceil(num_codes*bits/8)] uint8 -> [..., num_codes] int64."""
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    expected = packed_nbytes(num_codes, bits)
    if packed.shape[-1] != expected:
        raise ValueError(f"expected {expected} packed bytes for {num_codes} codes of {bits} bits, got {packed.shape[-1]}")
    if bits == 8:
        return packed.to(torch.int64)
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # [..., nbytes, 8/bits]
        return codes.flatten(-2)[..., :num_codes].to(torch.int64)
    positions = torch.arange(8, device=packed.device, dtype=torch.int32)
    stream = (packed.to(torch.int32).unsqueeze(-1) >> positions) & 1  # [..., nbytes, 8]
    stream = stream.flatten(-2)[..., : num_codes * bits].unflatten(-1, (num_codes, bits))
    weights = torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (stream << weights).sum(-1).to(torch.int64)

"""The x16 store kernel's fp16x2 quantizer (tqpatch.kernels.ptx.store_codes_asm), checked on the CPU: the exact PTX
text the GPU runs, interpreted by ptx.run_ptx, must give every coordinate the code of the symmetric rule evaluated
in fp16, and therefore the float32 reference's code except within fp16 rounding of a boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tqpatch.codec import TurboQuantCodec
from tqpatch.kernels.ptx import run_ptx, store_code_constants, store_codes_asm


def _ptx_codes(u: np.ndarray, boundaries: np.ndarray, bits: int) -> np.ndarray:
    """Run the quantizer's PTX on the pairs (u[2i], u[2i+1]) of float32 coordinates; the codes, unpacked."""
    asm, consts = store_codes_asm(bits), store_code_constants(boundaries)
    words = u.astype(np.float32).view(np.uint32)
    out = []
    for i in range(0, len(u), 2):
        pair = run_ptx(asm, {"$1": int(words[i]), "$2": int(words[i + 1]), **{f"${3 + j}": c for j, c in enumerate(consts)}})["$0"]
        code_mask = (1 << bits) - 1
        assert pair & ~(code_mask | code_mask << 16) == 0, "bits beside the pair's two codes must be clear"
        out += [pair & code_mask, pair >> 16]
    return np.array(out)


@pytest.mark.parametrize("d,bits", [(128, 4), (128, 3), (64, 2), (32, 1), (64, 4)])
def test_store_quantizer_ptx_gives_the_fp16_rule_and_the_float32_codes_off_boundaries(d, bits):
    boundaries = TurboQuantCodec(d, bits, "mse", seed=0).quantizer._constants(torch.device("cpu"))[2].numpy().astype(np.float32)
    gen = np.random.default_rng(d + bits)
    x = gen.standard_normal((24, d)).astype(np.float32)
    u = (x / np.linalg.norm(x, axis=1, keepdims=True)).ravel()  # coordinates of unit vectors, as the kernel sees them
    half = len(boundaries) // 2
    edges = [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, boundaries[half], *boundaries, *(-boundaries)]
    u = np.concatenate([np.array(edges, dtype=np.float32), np.nextafter(boundaries, 1).astype(np.float32), u])
    u = u[: len(u) // 2 * 2]
    got = _ptx_codes(u, boundaries, bits)
    # the rule on u rounded to fp16, exactly: k = #{positive boundaries p_i < |u|}, code = H + k above mid, H - 1 - k
    # otherwise (no Lloyd-Max boundary is an fp16 number, so no ties)
    u16 = u.astype(np.float16).astype(np.float64)
    k = (np.abs(u16)[:, None] > boundaries[None, half + 1 :].astype(np.float64)).sum(1)
    rule = np.where(u16 > float(boundaries[half]), half + 1 + k, half - k)
    np.testing.assert_array_equal(got, rule)
    ref = (u[:, None] > boundaries[None, :]).sum(1)  # the float32 reference (strict >, like the codec)
    assert got[0] == ref[0] and got[1] == ref[1]  # +0 and -0: the zero vector's codes
    assert np.abs(got - ref).max() <= 1
    random = slice(len(edges) + len(boundaries), None)
    assert (got[random] != ref[random]).mean() <= 4e-3  # ~1e-3 expected at 4 bits
    # beyond fp16 rounding (2^-11 relative, 2^-24 absolute) of every boundary
    far = (np.abs(u[:, None] - boundaries[None, :]) > 1e-3 * np.abs(boundaries[None, :]) + 2.0**-24).all(1)
    np.testing.assert_array_equal(got[far], ref[far])


def test_store_quantizer_ptx_rejects_unsupported_bits():
    with pytest.raises(ValueError, match="1, 2, 3 or 4"):
        store_codes_asm(5)

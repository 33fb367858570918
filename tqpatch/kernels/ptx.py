"""PTX snippets the kernels inline, and a small interpreter that runs them on the CPU for tests.

store_codes_asm(mb)   the x16 store kernel's quantizer on two coordinates at once (fp16 pairs, integer masks)
run_ptx(asm, ...)     interprets the PTX subset these snippets and `groups.lut_asm` use, on Python ints

The quantizer of a symmetric b-bit codebook (boundaries b_0 < ... < b_{2^b - 2}, mid = b_{H-1} ≈ 0, H = 2^(b-1),
positive boundaries p_i = b_{H+i}) gives a normalized coordinate u the code

    code(u) = #{i : u > b_i} = H + k(|u|)      for u > mid
                             = H - 1 - k(|u|)  otherwise,     k(a) = #{i : a > p_i}   (0 <= k < H)

`store_codes_asm` evaluates it for a pair (u0, u1) packed as one fp16x2 word: k by a binary search over the p_i
(one fp16x2 compare per level, thresholds picked by LOP3 bit selects on the 0xFFFF/0 masks), the sign by one more
compare, and the two codes come out as c0 | c1 << 16, one per half: 14 instructions per pair at 4 bits. The
boundaries are rounded down to fp16 (`store_code_constants`), so the code is exactly that of u rounded to fp16;
it differs from the float32 reference's only where u lies within fp16 rounding (2^-11 relative) of a boundary,
~1e-3 of the coordinates of random unit vectors at 4 bits, where both neighbouring centroids are equally close
to within that rounding.
"""

from __future__ import annotations

import numpy as np


def _floor_fp16(v: float) -> np.float16:
    """The largest fp16 value <= v. Comparing an fp16 number h > floor(b) is exactly h > b when b is not an fp16
    value, and h > b when it is: so the quantizer gives the fp16-rounded coordinate its exact code."""
    h = np.float16(v)
    return np.nextafter(h, np.float16(-np.inf)) if float(h) > v else h


def store_code_constants(boundaries) -> list[int]:
    """The operands `store_codes_asm` reads after the pair: the positive boundaries p_0 .. p_{H-2}, then mid, each
    rounded down to fp16 (`_floor_fp16`) and held in both halves of a word, as a signed int32 (a kernel argument).
    boundaries: the 2^b - 1 sorted boundaries of a symmetric codebook. (A mid of -1e-9 becomes -2^-24, so the zero
    vector's coordinates 0 > mid code as the float32 reference codes them.)"""
    b = [float(v) for v in boundaries]
    half = (len(b) + 1) // 2
    halves = np.array([_floor_fp16(v) for v in b[half:] + [b[half - 1]]], dtype=np.float16).view(np.uint16).astype(np.int64)
    words = [int(v | v << 16) for v in halves]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def store_codes_asm(mb: int) -> str:
    """PTX for Triton's inline_asm_elementwise (pack=1): inputs $1, $2 = the coordinates u0, u1 (float32 bits) of a
    pair of channels, $3 + i = the constant i of `store_code_constants`; output $0 = the pair's codes c0 | c1 << 16,
    one in each half (the kernel packs four such pairs into a word with shifted adds). See the module docstring."""
    if not 1 <= mb <= 4:
        raise ValueError(f"store_codes_asm: bits must be 1, 2, 3 or 4, got {mb}")
    levels = mb - 1  # binary-search levels: k has mb - 1 bits
    p = [f"${3 + i}" for i in range((1 << levels) - 1)]
    mid = f"${3 + len(p)}"
    sel = "0xCA"  # lop3 a ? b : c, bit by bit
    lines = ["{", ".reg .b32 %h, %a, %s, %k, %t, %hi, %lo, %x, %m<4>;",
             "cvt.rn.f16x2.f32 %h, $2, $1;",  # low half u0, high half u1
             "and.b32 %a, %h, 0x7FFF7FFF;",  # |u|
             f"set.gt.u32.f16x2 %s, %h, {mid};"]  # 0xFFFF where u > mid
    # Level j (from the top) compares |u| with the middle of the boundaries still possible: a complete binary
    # search tree stored in p's index order, whose node thresholds are picked by the masks found so far.
    for j in range(levels):
        bit = levels - 1 - j  # this level decides bit `bit` of k
        span = 1 << (bit + 1)  # boundaries per candidate subtree at this level: indices base + span/2 - 1
        candidates = [p[base + span // 2 - 1] for base in range(0, len(p) + 1, span)]
        for depth in range(j):  # fold the candidates pairwise by the masks of the levels above, deepest first
            m = f"%m{levels - j + depth}"
            folded = []
            for i in range(0, len(candidates), 2):
                dst = "%t" if len(candidates) == 2 else ("%hi" if i else "%lo")
                lines.append(f"lop3.b32 {dst}, {m}, {candidates[i + 1]}, {candidates[i]}, {sel};")
                folded.append(dst)
            candidates = folded
        lines.append(f"set.gt.u32.f16x2 %m{bit}, %a, {candidates[0]};")
    # k with every bit above its top set: then bits 0..mb-1 of ~(k ^ s) are the code (k or its complement, and
    # bit mb-1 = s). Built as bit i = m_i for i < levels, ones above.
    if levels == 0:
        lines.append("mov.b32 %k, 0xFFFFFFFF;")
    else:
        top = (0xFFFF << levels) & 0xFFFF
        lines.append(f"or.b32 %k, %m0, {top | top << 16:#010x};")
        for i in range(1, levels):
            c = 1 << i
            lines.append(f"lop3.b32 %k, %m{i}, %k, {c | c << 16:#010x}, 0xE4;")  # (m_i & c) | (k & ~c)
    code_mask = (1 << mb) - 1
    lines += [f"lop3.b32 $0, %k, %s, {code_mask | code_mask << 16:#010x}, 0x82;",  # c & ~(k ^ s): code in each half
              "}"]
    return "\n".join(lines)


def _f16x2_compare_gt(a: int, b: int) -> int:
    """set.gt.u32.f16x2: 0xFFFF in each half where a's half > b's (as fp16 numbers), else 0."""
    ha = np.array([a & 0xFFFF, a >> 16], dtype=np.uint16).view(np.float16)
    hb = np.array([b & 0xFFFF, b >> 16], dtype=np.uint16).view(np.float16)
    gt = ha > hb
    return (0xFFFF if gt[0] else 0) | (0xFFFF0000 if gt[1] else 0)


def run_ptx(asm: str, operands: dict[str, int]) -> dict[str, int]:
    """Interpret the PTX subset of `store_codes_asm` and `groups.lut_asm` (shl, shr, and, or, xor, mov, mul.lo, mul.hi, prmt,
    lop3 on 32 bits, default-mode prmt; cvt.rn.f16x2.f32, set.gt.u32.f16x2) on Python ints: operands {"$n": value}
    in (32-bit patterns; float32 operands as their bits), every register written out. For CPU tests of the exact
    text the GPU runs."""
    regs = {k: v & 0xFFFFFFFF for k, v in operands.items()}
    val = lambda x: regs[x] if x in regs else int(x, 0) & 0xFFFFFFFF  # noqa: E731
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}.":
            continue
        op, args = line.split(None, 1)
        a = [x.strip() for x in args.split(",")]
        if op == "shl.b32":
            r = val(a[1]) << val(a[2])
        elif op == "shr.b32":
            r = val(a[1]) >> val(a[2])
        elif op == "and.b32":
            r = val(a[1]) & val(a[2])
        elif op == "or.b32":
            r = val(a[1]) | val(a[2])
        elif op == "xor.b32":
            r = val(a[1]) ^ val(a[2])
        elif op == "mov.b32":
            r = val(a[1])
        elif op == "mul.lo.u32":
            r = val(a[1]) * val(a[2])
        elif op == "mul.hi.u32":
            r = (val(a[1]) * val(a[2])) >> 32
        elif op == "lop3.b32":
            x, y, z, lut = (val(v) for v in a[1:])
            r = sum(((lut >> (((x >> k & 1) << 2) | ((y >> k & 1) << 1) | (z >> k & 1))) & 1) << k for k in range(32))
        elif op == "prmt.b32":
            src = val(a[1]) | val(a[2]) << 32
            sel = val(a[3])
            r = 0
            for i in range(4):
                nib = sel >> 4 * i & 15
                byte = src >> 8 * (nib & 7) & 0xFF
                r |= (0xFF if nib & 8 and byte & 0x80 else 0 if nib & 8 else byte) << 8 * i
        elif op == "cvt.rn.f16x2.f32":  # d = {hi: a, lo: b}, round to nearest even
            hi, lo = (np.array([val(v)], dtype=np.uint32).view(np.float32).astype(np.float16).view(np.uint16)[0] for v in a[1:])
            r = int(lo) | int(hi) << 16
        elif op == "set.gt.u32.f16x2":
            r = _f16x2_compare_gt(val(a[1]), val(a[2]))
        else:
            raise ValueError(f"run_ptx does not know {op!r}")
        regs[a[0]] = r & 0xFFFFFFFF
    return regs

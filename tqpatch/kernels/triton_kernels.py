"""Triton kernels (private: call them through `tqpatch.kernels`, which checks and launches them).

Imported lazily, only when a CUDA tensor meets a kernel, so CPU installs never need Triton.
All three kernels read/write the bit layout of `tqpatch.packing` (LSB-first
b-bit stream per vector) and the parts of `tqpatch.codec.TurboQuantCodec`.

_tq_store_kernel          x [rows, d] -> packed codes + fp16 norms (+ QJL signs, residual norms)
_tq_store_x16_kernel      the same for mse codes of bfloat16/float16 x at d 32..128: two MMAs, packing in registers
_tq_decode_split_kernel   one query token vs. a span of compressed tokens (flash-decoding split),
                          scores and value sums in the rotated space
_tq_decode_combine_kernel merges the splits, attends to the full-precision tokens exactly,
                          rotates the value sum back once, writes the output
_tq_rotate_rows_kernel    the decode queries' rotation: x [R, d] (any float dtype) @ W [d, N] in float32, one launch
"""

from __future__ import annotations

import triton
import triton.language as tl

from .ptx import store_codes_asm

STORE_CODES_ASM_4 = tl.constexpr(store_codes_asm(4))  # the x16 store kernel's fp16x2 quantizer (ptx.store_codes_asm)
STORE_CODES_ASM_3 = tl.constexpr(store_codes_asm(3))
STORE_CODES_ASM_2 = tl.constexpr(store_codes_asm(2))
STORE_CODES_ASM_1 = tl.constexpr(store_codes_asm(1))
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": exp2(NEG - NEG) stays finite, weights of masked tokens are forced to 0


@triton.jit
def _log_norm_code(norm, low, step):
    """8-bit log code of norms (tqpatch.norms): 1 + round((log2 n - low) / step) clamped to 1..255, 0 for n = 0, with
    n rounded to fp16 first (as the PyTorch codec does); uint8, norm's shape."""
    n16 = norm.to(tl.float16).to(tl.float32)
    code = tl.floor((tl.log2(tl.maximum(n16, 1.1754943508222875e-38)) - low) / step + 0.5) + 1.0
    return tl.where(n16 > 0, tl.minimum(tl.maximum(code, 1.0), 255.0), 0.0).to(tl.uint8)


@triton.jit
def _tq_store_kernel(
    x_ptr, sxb, sxh, sxt,                 # x [B, H, T, D] any float dtype (last stride 1)
    H, T, R,                              # R = B*H*T rows
    rotT_ptr,                             # Πᵀ [D, D] fp32 contiguous: y = u @ Πᵀ
    rhi_ptr, rlo_ptr,                     # PREC "fp16x3": 4096 Πᵀ = hi + lo, both fp16 [D, D] contiguous
    bnd_ptr,                              # boundaries [2^MB - 1] fp32, symmetric about the middle one (≈ 0)
    cent_ptr,                             # centroids [2^MB] fp32 (prod: residual)
    projT_ptr,                            # Π Sᵀ [D, D] fp32 (prod): S r = r_rot @ (Π Sᵀ)
    c_ptr, scb, sch, sct,                 # codes [B, H, *, D*MB/8] uint8 (last stride 1)
    n_ptr, snb, snh, snt,                 # norms [B, H, *] fp16, or uint8 log codes (NORM8)
    nrange_ptr,                           # NORM8: [2, H] fp32, log2 of code 1's norm and octaves per code, per head
    g_ptr, sgb, sgh, sgt,                 # qjl signs [B, H, *, D/8] uint8 (prod)
    r_ptr, srb, srh, srt,                 # residual norms [B, H, *] fp16 (prod)
    D: tl.constexpr, MB: tl.constexpr, PROD: tl.constexpr,
    BLOCK_R: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, WORD: tl.constexpr, NORM8: tl.constexpr,
):
    # Persistent: each program walks row blocks; with BN == D the rotation tile is loaded once per program.
    # PREC "fp16x3": 4096 y = u_hi·hi + u_lo·hi + u_hi·lo, three fp16 MMAs into one accumulator, with
    # u = u_hi + u_lo and 4096 Πᵀ = hi + lo split into fp16 parts (the dropped u_lo·lo is ~2^-22 of y): the
    # precision of tf32x3 at half its shared memory and twice its MMA rate (mse only). The boundaries are
    # scaled by 4096 instead of the products.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    nblocks = tl.cdiv(R, BLOCK_R)
    cols = tl.arange(0, D)
    G8: tl.constexpr = BN // 8
    HALF: tl.constexpr = 1 << (MB - 1)
    shifts = tl.arange(0, 8) * MB
    SCALE: tl.constexpr = 4096.0 if PREC == "fp16x3" else 1.0
    mid = tl.load(bnd_ptr + HALF - 1) * SCALE
    if BN == D:
        if PREC == "fp16x3":
            rhi_all = tl.load(rhi_ptr + cols[:, None] * D + cols[None, :])  # [D, D] fp16
            rlo_all = tl.load(rlo_ptr + cols[:, None] * D + cols[None, :])
        else:
            rot_all = tl.load(rotT_ptr + cols[:, None] * D + cols[None, :])  # [D, D]
        if PROD:
            proj_all = tl.load(projT_ptr + cols[:, None] * D + cols[None, :])
    for blk in range(pid, nblocks, nprog):
        rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        t = (rows % T).to(tl.int64)
        bh = rows // T
        h = (bh % H).to(tl.int64)
        b = (bh // H).to(tl.int64)
        x = tl.load(x_ptr + (b * sxb + h * sxh + t * sxt)[:, None] + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(x * x, axis=1))
        u = x / tl.maximum(norm, 1.1754943508222875e-38)[:, None]
        if PREC == "fp16x3":
            u_hi = u.to(tl.float16)
            u_lo = (u - u_hi.to(tl.float32)).to(tl.float16)  # |u_lo| <= 2^-11 |u| (fp16 subnormals keep 2^-24)
        c_row = b * scb + h * sch + t * sct
        if PROD:
            proj = tl.zeros([BLOCK_R, D], dtype=tl.float32)
            gamma2 = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k in tl.static_range(D // BN):
            ncols = k * BN + tl.arange(0, BN)
            if PREC == "fp16x3":
                if BN == D:
                    rhi, rlo = rhi_all, rlo_all
                else:
                    rhi = tl.load(rhi_ptr + cols[:, None] * D + ncols[None, :])
                    rlo = tl.load(rlo_ptr + cols[:, None] * D + ncols[None, :])
                y = tl.dot(u_hi, rlo, tl.dot(u_lo, rhi, tl.dot(u_hi, rhi)))  # 4096 y
            elif BN == D:
                y = tl.dot(u, rot_all, input_precision=PREC)
            else:
                y = tl.dot(u, tl.load(rotT_ptr + cols[:, None] * D + ncols[None, :]), input_precision=PREC)  # [BLOCK_R, BN]
            # The codebook is symmetric: count the positive boundaries below |y| (half the comparisons of
            # counting all 2^MB - 1), then idx = HALF + count above the middle boundary, HALF - 1 - count below.
            a = tl.abs(y)
            count = tl.zeros([BLOCK_R, BN], dtype=tl.int32)
            if MB <= 4:
                for j in tl.static_range(HALF - 1):
                    count += (a > tl.load(bnd_ptr + HALF + j) * SCALE).to(tl.int32)
            else:  # 5-8 bits: binary search over the HALF - 1 positive boundaries p_j = bnd[HALF + j] (MB - 1 gathers)
                for lvl in tl.static_range(MB - 2, -1, -1):
                    probe = count + (1 << lvl)  # count <= HALF - 1 - 2^lvl here, so p_{probe - 1} exists
                    count = tl.where(a > tl.load(bnd_ptr + HALF - 1 + probe) * SCALE, probe, count)
            idx = tl.where(y > mid, HALF + count, HALF - 1 - count)
            # 8 codes of MB bits fill exactly MB bytes: build the 8*MB-bit word (int64 past 32 bits), write its bytes.
            if MB <= 4:
                idx8 = tl.reshape(idx.to(tl.int8), [BLOCK_R, G8, 8]).to(tl.int32)  # (int8 through any layout change)
                word = tl.sum(idx8 << shifts[None, None, :], axis=2)  # [BLOCK_R, G8]
            else:
                idx8 = tl.reshape(idx.to(tl.int16), [BLOCK_R, G8, 8]).to(tl.int64)
                word = tl.sum(idx8 << shifts.to(tl.int64)[None, None, :], axis=2)
            grp = k * G8 + tl.arange(0, G8)
            if WORD:  # MB = 2 or 4: the word is one aligned int16/int32 store (little-endian = byte order)
                wtype = tl.int16 if MB == 2 else tl.int32
                wptr = (c_ptr + c_row[:, None] + (grp * MB)[None, :]).to(tl.pointer_type(wtype))
                tl.store(wptr, word.to(wtype), mask=rmask[:, None])
            else:
                for j in tl.static_range(MB):
                    tl.store(c_ptr + c_row[:, None] + (grp * MB + j)[None, :], ((word >> (8 * j)) & 255).to(tl.uint8), mask=rmask[:, None])
            if PROD:
                resid = y - tl.load(cent_ptr + idx)
                gamma2 += tl.sum(resid * resid, axis=1)
                if BN == D:
                    proj += tl.dot(resid, proj_all, input_precision=PREC)
                else:
                    proj += tl.dot(resid, tl.load(projT_ptr + ncols[:, None] * D + cols[None, :]), input_precision=PREC)
        if NORM8:
            low = tl.load(nrange_ptr + h, mask=rmask, other=0.0)
            step = tl.load(nrange_ptr + H + h, mask=rmask, other=1.0)
            tl.store(n_ptr + b * snb + h * snh + t * snt, _log_norm_code(norm, low, step), mask=rmask)
        else:
            tl.store(n_ptr + b * snb + h * snh + t * snt, norm.to(tl.float16), mask=rmask)
        if PROD:
            bits = (proj >= 0).to(tl.int32)
            sw = tl.sum(tl.reshape(bits, [BLOCK_R, D // 8, 8]) << tl.arange(0, 8)[None, None, :], axis=2)
            tl.store(g_ptr + (b * sgb + h * sgh + t * sgt)[:, None] + tl.arange(0, D // 8)[None, :], sw.to(tl.uint8), mask=rmask[:, None])
            tl.store(r_ptr + b * srb + h * srh + t * srt, tl.sqrt(gamma2).to(tl.float16), mask=rmask)


@triton.jit
def _magnitude_index(a, p0, p1, p2, p3, p4, p5, p6, MB: tl.constexpr):
    """k = how many of the 2^(MB-1) - 1 positive boundaries p0 < p1 < ... lie below a >= 0, by binary search
    (MB - 1 compares and a few selects instead of one compare per boundary); int32, same shape as a."""
    if MB == 4:
        c2 = a > p3
        c1 = a > tl.where(c2, p5, p1)
        c0 = a > tl.where(c2, tl.where(c1, p6, p4), tl.where(c1, p2, p0))
        return c2.to(tl.int32) * 4 + c1.to(tl.int32) * 2 + c0.to(tl.int32)
    elif MB == 3:
        c1 = a > p1
        c0 = a > tl.where(c1, p2, p0)
        return c1.to(tl.int32) * 2 + c0.to(tl.int32)
    elif MB == 2:
        return (a > p0).to(tl.int32)
    else:
        return tl.zeros(a.shape, dtype=tl.int32)


@triton.jit
def _rotation_block(r_ptr, D: tl.constexpr, CB: tl.constexpr, cb: tl.constexpr):
    """Columns of the rotation [D, D] for channel block cb (CB channels), in the x16 kernel's column order:
    kernel column k = 8j + 2m + e is channel cb·CB + m·CB/4 + 8(j // 4) + j % 4 + 4e (see `_tq_store_x16_kernel`)."""
    rows = tl.arange(0, D)
    k = tl.arange(0, CB)
    j = k // 8
    chan = cb * CB + ((k % 8) // 2) * (CB // 4) + 8 * (j // 4) + j % 4 + 4 * (k % 2)
    return tl.load(r_ptr + rows[:, None] * D + chan[None, :])


@triton.jit
def _pair_codes(u, h0, h1, h2, h3, h4, h5, h6, h7, MB: tl.constexpr):
    """u [R, C] float32 -> int32 [R, C/2]: the codes of kernel columns 2i and 2i + 1 as c0 | c1 << 16, by the fp16x2
    quantizer of `ptx.store_codes_asm` (h0..: `ptx.store_code_constants`, the positive boundaries then mid)."""
    u0, u1 = tl.split(tl.reshape(u, [u.shape[0], u.shape[1] // 2, 2]))
    u0 = u0.to(tl.int32, bitcast=True)
    u1 = u1.to(tl.int32, bitcast=True)
    if MB == 4:
        return tl.inline_asm_elementwise(STORE_CODES_ASM_4, "=r" + ",r" * 10, [u0, u1, h0, h1, h2, h3, h4, h5, h6, h7],
                                         dtype=tl.int32, is_pure=True, pack=1)
    elif MB == 3:
        return tl.inline_asm_elementwise(STORE_CODES_ASM_3, "=r" + ",r" * 6, [u0, u1, h0, h1, h2, h3], dtype=tl.int32, is_pure=True, pack=1)
    elif MB == 2:
        return tl.inline_asm_elementwise(STORE_CODES_ASM_2, "=r" + ",r" * 4, [u0, u1, h0, h1], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(STORE_CODES_ASM_1, "=r" + ",r" * 3, [u0, u1, h0], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _store_as_held(ptr, value, mask, BITS: tl.constexpr):
    """tl.store of BITS-bit value [any shape] at ptr where mask, from the registers that hold it: an inline st.global
    that Triton's coalescing cannot re-layout (its shared-memory round trip and barriers cost the x16 kernel more
    than the partly filled sectors it saves). A value that several lanes hold (a row's norm) is written by each of
    them: the same bytes. Returns a dummy int32 tensor (inline asm must have an output)."""
    if BITS == 32:
        asm: tl.constexpr = "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.b32 [$1], $2; mov.b32 $0, 0; }"
    elif BITS == 16:
        asm: tl.constexpr = "{ .reg .pred p; .reg .b16 t; setp.ne.b32 p, $3, 0; cvt.u16.u32 t, $2; @p st.global.b16 [$1], t; mov.b32 $0, 0; }"
    else:
        asm: tl.constexpr = "{ .reg .pred p; .reg .b16 t; setp.ne.b32 p, $3, 0; cvt.u16.u32 t, $2; @p st.global.b8 [$1], t; mov.b32 $0, 0; }"
    value = value.to(tl.int32, bitcast=True) if BITS == 32 else value.to(tl.int32)
    return tl.inline_asm_elementwise(asm, "=r,l,r,r", [ptr.to(tl.int64), value, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _store_code_block(y, inv, mid, p0, p1, p2, p3, p4, p5, p6, h0, h1, h2, h3, h4, h5, h6, h7, c_row, rmask,
                      BLOCK_R: tl.constexpr, CB: tl.constexpr, cb: tl.constexpr, MB: tl.constexpr, F16X2: tl.constexpr,
                      ASM_STORE: tl.constexpr):
    """Quantize and write one channel block: y [BLOCK_R, CB] = SCALE·(Πx) in kernel column order, inv [BLOCK_R] =
    1 / (SCALE·‖x‖), codes at byte rows c_row [BLOCK_R]. The symmetric codebook gives the code as the magnitude
    index k of |y|·inv (binary search), HALF + k above the middle boundary and HALF - 1 - k below; each thread
    packs the whole words of 8 codes it holds and writes them. Kernel column 8j + 2m + e holds code q + 4e of word
    a = j // 4 (q = j % 4, `_rotation_block`): a pair's two codes go to the word's two halves, so the four pairs of
    a word add up shifted by MB·q with no per-pair combining. F16X2: the search runs on fp16 pairs in inline PTX
    (`_pair_codes`, constants h0..h7), else in float32 (boundaries mid, p0..p6)."""
    HALF: tl.constexpr = 1 << (MB - 1)
    WT: tl.constexpr = CB // 32  # words per thread and row
    u = y * inv[:, None]  # (a zero vector gives 0 and compares 0 > mid like the reference)
    if F16X2:  # pair i = kernel columns 2i, 2i + 1 = 8j + 2m + (0, 1), i.e. 4j + m = 16a + 4q + m
        pair = tl.permute(tl.reshape(_pair_codes(u, h0, h1, h2, h3, h4, h5, h6, h7, MB), [BLOCK_R, WT, 4, 4]), [0, 1, 3, 2])  # [r, a, m, q]
        word = tl.sum(pair << (tl.arange(0, 4) * MB)[None, None, None, :], axis=3)  # [r, a, m]: codes 0-3 at 0, 4-7 at 16
        if MB < 4:  # codes 4-7 follow codes 0-3 at bit 4·MB
            word = (word & ((1 << 4 * MB) - 1)) | ((word >> (16 - 4 * MB)) & (((1 << 4 * MB) - 1) << 4 * MB))
    else:
        code = _magnitude_index(tl.abs(u), p0, p1, p2, p3, p4, p5, p6, MB) ^ tl.where(u > mid, HALF, HALF - 1)
        code = tl.permute(tl.reshape(code, [BLOCK_R, WT, 4, 4, 2]), [0, 1, 3, 2, 4])  # [r, a, m, q, e]
        shift = (tl.arange(0, 4)[:, None] + 4 * tl.arange(0, 2)[None, :]) * MB  # code q + 4e of the word
        word = tl.sum(tl.reshape(code << shift[None, None, None, :, :], [BLOCK_R, WT, 4, 8]), axis=3)  # [r, a, m]
    word_byte = (cb * CB // 8 + tl.arange(0, 4)[None, :] * WT + tl.arange(0, WT)[:, None]) * MB  # [WT, 4]: word (a, m)
    wptr = c_row[:, None, None] + word_byte[None, :, :]
    wmask = rmask[:, None, None]
    if ASM_STORE:
        if MB == 4:
            _store_as_held(wptr, word, wmask, 32)
        elif MB == 2:
            _store_as_held(wptr, word & 0xFFFF, wmask, 16)
        else:
            for j in tl.static_range(MB):
                _store_as_held(wptr + j, (word >> (8 * j)) & 255, wmask, 8)
    elif MB == 4:
        tl.store(wptr.to(tl.pointer_type(tl.int32)), word, mask=wmask)
    elif MB == 2:
        tl.store(wptr.to(tl.pointer_type(tl.int16)), word.to(tl.int16), mask=wmask)
    else:
        for j in tl.static_range(MB):
            tl.store(wptr + j, ((word >> (8 * j)) & 255).to(tl.uint8), mask=wmask)


@triton.jit
def _row_sum_of_squares(y, BLOCK_R: tl.constexpr, CB: tl.constexpr):
    """Σ_c y[r, c]² of y [BLOCK_R, CB] -> [BLOCK_R], summed as four interleaved partial sums: columns c and
    c + CB/4, c + CB/2, c + 3CB/4 lie in the same thread (kernel column 8j + 2m + e, the four differ in j), so the
    sum over the four is CB/16 independent 3-add chains and the serial chain per row is ~CB/16 + 3 adds long, not CB/4
    (more work in flight while the quantizer waits for the norm)."""
    quarters = tl.sum(tl.reshape(y * y, [BLOCK_R, 4, CB // 4]), axis=1)
    return tl.sum(quarters, axis=1)


@triton.jit
def _tq_store_x16_kernel(
    x_ptr, sxb, sxh, sxt,                 # x [B, H, T, D] bfloat16 or float16 (last stride 1)
    x_desc,                               # TMA: a tensor descriptor of x, blocks [1, 1, BLOCK_R, D] (else unused)
    H, T, R,                              # R = B*H*T rows
    rhi_ptr, rlo_ptr,                     # SCALE·Πᵀ = hi + lo [D, D] in x's dtype, contiguous
    bnd_ptr,                              # boundaries [2^MB - 1] fp32, symmetric about the middle one (≈ 0)
    bnd16_ptr,                            # F16X2: `ptx.store_code_constants` [2^(MB-1)] int32
    c_ptr, scb, sch, sct,                 # codes [B, H, *, D*MB/8] uint8 (last stride 1)
    n_ptr, snb, snh, snt,                 # norms [B, H, *] fp16, or uint8 log codes (NORM8)
    nrange_ptr,                           # NORM8: [2, H] fp32 (tqpatch.norms)
    D: tl.constexpr, MB: tl.constexpr, BLOCK_R: tl.constexpr, SCALE: tl.constexpr, NORM8: tl.constexpr, LO: tl.constexpr,
    F16X2: tl.constexpr, CBMAX: tl.constexpr, TMA: tl.constexpr, ASM_STORE: tl.constexpr,
):
    # mse codes of 16-bit inputs, 32 <= D <= 128 (LO = False: the hi part of Πᵀ alone, one MMA, ~8 significant bits). x is exact in its own dtype, so y = x·hi + x·lo (two MMAs with
    # x as it is, no normalising or splitting) carries the ~16 significant bits of the split Πᵀ; the code of
    # y/‖x‖ is the code of Π(x/‖x‖). Channels are handled in blocks of CB = min(D, CBMAX) columns (one MMA chain each).
    # Packing without moving data between threads: in the MMA accumulator a thread holds, per row, the columns
    # 8j + 2m + e (m = lane % 4, e = 0, 1). The rotation's columns are loaded permuted so that kernel column
    # 8j + 2m + e of block cb is channel cb·CB + m·CB/4 + 8(j // 4) + j % 4 + 4e: each thread then holds CB/4
    # consecutive channels of its rows, whole words of 8 codes, which it packs and writes itself (the two codes of
    # an fp16 pair, e = 0 and 1, are codes q and q + 4 of one word: they land in its two halves).
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    CB: tl.constexpr = D if D < CBMAX else CBMAX
    rhi0 = _rotation_block(rhi_ptr, D, CB, 0)
    rlo0 = _rotation_block(rlo_ptr, D, CB, 0) if LO else rhi0
    if D > CB:
        rhi1 = _rotation_block(rhi_ptr, D, CB, 1)
        rlo1 = _rotation_block(rlo_ptr, D, CB, 1) if LO else rhi1
    HALF: tl.constexpr = 1 << (MB - 1)
    mid = tl.load(bnd_ptr + HALF - 1)
    p0, p1, p2, p3, p4, p5, p6 = mid, mid, mid, mid, mid, mid, mid
    if MB >= 2:
        p0 = tl.load(bnd_ptr + HALF)
    if MB >= 3:
        p1 = tl.load(bnd_ptr + HALF + 1)
        p2 = tl.load(bnd_ptr + HALF + 2)
    if MB == 4:
        p3 = tl.load(bnd_ptr + HALF + 3)
        p4 = tl.load(bnd_ptr + HALF + 4)
        p5 = tl.load(bnd_ptr + HALF + 5)
        p6 = tl.load(bnd_ptr + HALF + 6)
    h0 = tl.load(bnd16_ptr)  # F16X2's operands (unused otherwise)
    h1, h2, h3, h4, h5, h6, h7 = h0, h0, h0, h0, h0, h0, h0
    if F16X2 and MB >= 2:
        h1 = tl.load(bnd16_ptr + 1)
    if F16X2 and MB >= 3:
        h2 = tl.load(bnd16_ptr + 2)
        h3 = tl.load(bnd16_ptr + 3)
    if F16X2 and MB == 4:
        h4 = tl.load(bnd16_ptr + 4)
        h5 = tl.load(bnd16_ptr + 5)
        h6 = tl.load(bnd16_ptr + 6)
        h7 = tl.load(bnd16_ptr + 7)
    cols = tl.arange(0, D)
    TB = tl.cdiv(T, BLOCK_R)  # a tile is BLOCK_R consecutive tokens of one (b, h): index arithmetic once per tile
    for blk in range(pid, R // T * TB, nprog):
        bh = blk // TB
        h = (bh % H).to(tl.int64)
        b = (bh // H).to(tl.int64)
        t = (blk % TB) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = t < T
        t = t.to(tl.int64)
        if TMA:  # one bulk copy of the tile (rows past T read as zeros)
            x = tl.reshape(x_desc.load([b.to(tl.int32), h.to(tl.int32), (blk % TB) * BLOCK_R, 0]), [BLOCK_R, D])
        else:
            x = tl.load(x_ptr + (b * sxb + h * sxh + t * sxt)[:, None] + cols[None, :], mask=rmask[:, None], other=0.0)
        c_row = c_ptr + b * scb + h * sch + t * sct
        y0 = tl.dot(x, rhi0)
        if LO:
            y0 = tl.dot(x, rlo0, y0)
        sq = _row_sum_of_squares(y0, BLOCK_R, CB)
        if D > CB:
            y1 = tl.dot(x, rhi1)
            if LO:
                y1 = tl.dot(x, rlo1, y1)
            sq += _row_sum_of_squares(y1, BLOCK_R, CB)
        # ‖y‖ = SCALE·‖x‖ (Π is orthogonal; the split carries ~16 bits): the norm from the accumulators, not from x
        # one reciprocal square root (MUFU.RSQ) instead of a square root and a division, each with its slow-path checks:
        # a shorter chain of dependent instructions between the MMA and the quantizer. A zero row gives inv = 2^63, u = 0
        inv = tl.math.rsqrt(tl.maximum(sq, 1.1754943508222875e-38))
        norm = sq * inv * (1.0 / SCALE)
        _store_code_block(y0, inv, mid, p0, p1, p2, p3, p4, p5, p6, h0, h1, h2, h3, h4, h5, h6, h7, c_row, rmask,
                          BLOCK_R, CB, 0, MB, F16X2, ASM_STORE)
        if D > CB:
            _store_code_block(y1, inv, mid, p0, p1, p2, p3, p4, p5, p6, h0, h1, h2, h3, h4, h5, h6, h7, c_row, rmask,
                              BLOCK_R, CB, 1, MB, F16X2, ASM_STORE)
        if NORM8:  # this tile's head
            low = tl.load(nrange_ptr + h)
            step = tl.load(nrange_ptr + H + h)
            ncode = _log_norm_code(norm, low, step)
            if ASM_STORE:
                _store_as_held(n_ptr + b * snb + h * snh + t * snt, ncode, rmask, 8)
            else:
                tl.store(n_ptr + b * snb + h * snh + t * snt, ncode, mask=rmask)
        elif ASM_STORE:
            _store_as_held(n_ptr + b * snb + h * snh + t * snt, norm.to(tl.float16).to(tl.int16, bitcast=True), rmask, 16)
        else:
            tl.store(n_ptr + b * snb + h * snh + t * snt, norm.to(tl.float16), mask=rmask)


@triton.jit
def _unpack(row_ptr, tmask, BT: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, NBY: tl.constexpr):
    """Code indices [BT, D] int32, natural channel order, from rows of a packed b-bit stream of NBY bytes
    (D may pad the row: codes past its NBY bytes read as 0).

    The row's bytes are loaded once ([BT, D*BITS/8], or three [BT, D/8] byte planes for b = 3)
    and broadcast to the codes they hold, so no per-code pointers are built.
    """
    if (8 % BITS) == 0:
        P: tl.constexpr = 8 // BITS  # codes per byte
        NB: tl.constexpr = D // P
        w = _row_bytes(row_ptr, tmask, NB, NBY).to(tl.int32)
        w = tl.reshape(tl.broadcast_to(w[:, :, None], (BT, NB, P)), (BT, D))
        shift = (tl.arange(0, D) % P) * BITS
    else:  # 8 codes in BITS bytes: build the word of each group of 8 (3 bits: 24, int32; 5-7 bits: 40-56, int64)
        grp = tl.arange(0, D // 8) * BITS
        if BITS > 4:
            w = tl.zeros([BT, D // 8], dtype=tl.int64)
        else:
            w = tl.zeros([BT, D // 8], dtype=tl.int32)
        for j in tl.static_range(BITS):
            cb = grp + j
            w = w | (tl.load(row_ptr[:, None] + cb[None, :], mask=tmask[:, None] & (cb < NBY)[None, :], other=0).to(w.dtype) << (8 * j))
        w = tl.reshape(tl.broadcast_to(w[:, :, None], (BT, D // 8, 8)), (BT, D))
        shift = (tl.arange(0, D) % 8) * BITS
    return ((w >> shift[None, :]) & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _unpack_windows(row_ptr, tmask, BT: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, SB: tl.constexpr, NBY: tl.constexpr):
    """Trellis windows [BT, D] int32 (`tqpatch.trellis.windows`) of rows of a packed b-bit stream of NBY bytes:
    w_j = Σ_k code_{j−k} << (k·b) over the K = ⌈S/b⌉ codes before j, masked to S + b bits (codes before the
    stream and past its bytes read 0).

    As in `_unpack`, bytes are loaded as tiles, not per code: the stream is cut into units of U codes in UB
    bytes (U = 8/b in one byte for b | 8, else 8 codes in b bytes), and each unit's word is its UB bytes with
    the PRE = ⌈K·b/8⌉ bytes before it below them, PRE + UB tile loads of [BT, D/U] in all. Code j = U·u + i and
    the K codes before it are then word bits 8·PRE + b(i − K) .. of unit u, broadcast to its U codes. With S = 0
    (K = PRE = 0) this computes `_unpack`'s codes; the two stay separate until a GPU run shows that the Lloyd-Max
    paths keep their speed through the shared code."""
    K: tl.constexpr = (SB + BITS - 1) // BITS
    if (8 % BITS) == 0:
        U: tl.constexpr = 8 // BITS
        UB: tl.constexpr = 1
    else:
        U: tl.constexpr = 8
        UB: tl.constexpr = BITS
    PRE: tl.constexpr = (K * BITS + 7) // 8
    NU: tl.constexpr = D // U
    first = tl.arange(0, NU) * UB - PRE  # [NU]: each unit word's first byte (negative before the stream)
    if 8 * (PRE + UB) > 31:
        word = tl.zeros([BT, NU], dtype=tl.int64)
    else:
        word = tl.zeros([BT, NU], dtype=tl.int32)
    for i in tl.static_range(PRE + UB):
        idx = first + i
        ok = (idx >= 0) & (idx < NBY)
        word = word | (tl.load(row_ptr[:, None] + idx[None, :], mask=tmask[:, None] & ok[None, :], other=0).to(word.dtype) << (8 * i))
    word = tl.reshape(tl.broadcast_to(word[:, :, None], (BT, NU, U)), (BT, D))
    shift = 8 * PRE + ((tl.arange(0, D) % U) - K) * BITS  # ≥ 0: PRE bytes hold the K codes before a unit's first
    codes = (word >> shift[None, :]).to(tl.int32)  # code j − K in the low bits, code j at bits K·b ..
    window = tl.zeros([BT, D], dtype=tl.int32)
    for k in tl.static_range(K + 1):  # code j − k is bits (K − k)·b ..
        window = window | (((codes >> ((K - k) * BITS)) & ((1 << BITS) - 1)) << (k * BITS))
    return window & ((1 << (SB + BITS)) - 1)


@triton.jit
def _lookup(tab_ptr, idx, BITS: tl.constexpr, LUT: tl.constexpr):
    """centroids[idx] in fp16 from the fp16 table: a gather load (LUT=0), a select chain over the 2^BITS values
    (LUT=1), or over the 2^(BITS-1) magnitudes of the symmetric codebook, c[H + k] = -c[H - 1 - k], then the sign
    (LUT=2). The chains avoid the gather but cost more issue slots: both measured slower on the H200
    (bench/RESULTS.md, run 20); they stay as tuning variants that `tqpatch bench` sweeps."""
    if LUT == 2:
        H: tl.constexpr = 1 << (BITS - 1)
        neg = idx < H
        k = tl.where(neg, (H - 1) - idx, idx - H)
        mag = tl.zeros(idx.shape, dtype=tl.float16) + tl.load(tab_ptr + H)
        for j in tl.static_range(1, H):
            mag = tl.where(k == j, tl.load(tab_ptr + H + j), mag)
        return tl.where(neg, -mag, mag)
    elif LUT == 1:
        val = tl.zeros(idx.shape, dtype=tl.float16) + tl.load(tab_ptr)
        for j in tl.static_range(1, 1 << BITS):
            val = tl.where(idx == j, tl.load(tab_ptr + j), val)
        return val
    else:
        return tl.load(tab_ptr + idx)


@triton.jit
def _plane(tab_ptr, w, j: tl.constexpr, BITS: tl.constexpr, LUT: tl.constexpr):
    """fp16 centroid values of code j (bits j*BITS..) of every byte of the tile w [BT, NB]."""
    return _lookup(tab_ptr, (w >> (j * BITS)) & ((1 << BITS) - 1), BITS, LUT)


@triton.jit
def _plane_query(qr_ptr, qrow, gmask, j: tl.constexpr, NP: tl.constexpr):
    """Columns j*NP .. (j+1)*NP of the (plane-ordered) rotated queries, fp16 [GP, NP]."""
    return tl.load(qr_ptr + qrow[:, None] + j * NP + tl.arange(0, NP)[None, :], mask=gmask[:, None], other=0.0).to(tl.float16)


@triton.jit
def _group_queries(qr_ptr, qrow, gmask, W: tl.constexpr, PL: tl.constexpr):
    """A code group's rotated queries (its W columns from qrow on): PL planes fp16 [GP, W/PL], or the whole
    group [GP, W] for PL = 1. Planes a group does not have repeat plane 0 (unused)."""
    NP: tl.constexpr = W // PL
    q0 = _plane_query(qr_ptr, qrow, gmask, 0, NP)
    q1, q2, q3 = q0, q0, q0
    if PL >= 2:
        q1 = _plane_query(qr_ptr, qrow, gmask, 1, NP)
    if PL == 4:
        q2 = _plane_query(qr_ptr, qrow, gmask, 2, NP)
        q3 = _plane_query(qr_ptr, qrow, gmask, 3, NP)
    return q0, q1, q2, q3


@triton.jit
def _row_bytes(rows, mask, NB: tl.constexpr, NBY: tl.constexpr):
    """The first NB code bytes [BT, NB] uint8 of the rows starting at `rows` [BT] (bytes past a row's NBY read 0)."""
    cb = tl.arange(0, NB)
    if NBY < NB:
        return tl.load(rows[:, None] + cb[None, :], mask=mask[:, None] & (cb < NBY)[None, :], other=0)
    else:
        return tl.load(rows[:, None] + cb[None, :], mask=mask[:, None], other=0)


@triton.jit
def _plane_bytes(rows, mask, W: tl.constexpr, PL: tl.constexpr, NBY: tl.constexpr):
    """A plane group's byte tile [BT, W/PL] (prefetched a tile ahead); a placeholder for groups read in natural order."""
    if PL > 1:
        return _row_bytes(rows, mask, W // PL, NBY)
    else:
        return tl.zeros([1], dtype=tl.uint8)


@triton.jit
def _group_scores(q0, q1, q2, q3, w, rows, tmask, cent_ptr,
                  BT: tl.constexpr, W: tl.constexpr, NBY: tl.constexpr, BITS: tl.constexpr, PL: tl.constexpr, LUT: tl.constexpr,
                  SB: tl.constexpr):
    """⟨Π q, c⟩ [GP, BT] of one code group over a tile: PL planes of the byte tile w [BT, W/PL] (int32), or
    (PL = 1) the codes unpacked from the rows at `rows` in natural order (SB > 0: trellis codes of S = SB state
    bits, looked up by window in the group's 2^(S+b)-entry table)."""
    if SB > 0:
        val = tl.load(cent_ptr + _unpack_windows(rows, tmask, BT, W, BITS, SB, NBY))  # [BT, W]
        s = tl.dot(q0, tl.trans(val))
    elif PL == 1:
        val = _lookup(cent_ptr, _unpack(rows, tmask, BT, W, BITS, NBY), BITS, LUT)  # [BT, W] rotated unit vectors
        s = tl.dot(q0, tl.trans(val))
    else:
        s = tl.dot(q0, tl.trans(_plane(cent_ptr, w, 0, BITS, LUT)))
        s = tl.dot(q1, tl.trans(_plane(cent_ptr, w, 1, BITS, LUT)), s)
        if PL == 4:
            s = tl.dot(q2, tl.trans(_plane(cent_ptr, w, 2, BITS, LUT)), s)
            s = tl.dot(q3, tl.trans(_plane(cent_ptr, w, 3, BITS, LUT)), s)
    return s


@triton.jit
def _group_values(pv, alpha, a0, a1, a2, a3, w, rows, tmask, cent_ptr,
                  BT: tl.constexpr, W: tl.constexpr, NBY: tl.constexpr, BITS: tl.constexpr, PL: tl.constexpr, LUT: tl.constexpr,
                  SB: tl.constexpr):
    """Accumulators ← alpha · accumulators + pv [GP, BT] @ centroids of one code group (per plane, as `_group_scores`)."""
    if SB > 0:
        a0 = tl.dot(pv, tl.load(cent_ptr + _unpack_windows(rows, tmask, BT, W, BITS, SB, NBY)), a0 * alpha[:, None])
    elif PL == 1:
        a0 = tl.dot(pv, _lookup(cent_ptr, _unpack(rows, tmask, BT, W, BITS, NBY), BITS, LUT), a0 * alpha[:, None])
    else:
        a0 = tl.dot(pv, _plane(cent_ptr, w, 0, BITS, LUT), a0 * alpha[:, None])
        a1 = tl.dot(pv, _plane(cent_ptr, w, 1, BITS, LUT), a1 * alpha[:, None])
        if PL == 4:
            a2 = tl.dot(pv, _plane(cent_ptr, w, 2, BITS, LUT), a2 * alpha[:, None])
            a3 = tl.dot(pv, _plane(cent_ptr, w, 3, BITS, LUT), a3 * alpha[:, None])
    return a0, a1, a2, a3


@triton.jit
def _store_group(arow, gmask, a0, a1, a2, a3, W: tl.constexpr, PL: tl.constexpr):
    """Write a value group's accumulators (PL planes of W/PL columns, in order) from the row pointers arow [GP]."""
    NP: tl.constexpr = W // PL
    ptr = arow[:, None] + tl.arange(0, NP)[None, :]
    tl.store(ptr, a0, mask=gmask[:, None])
    if PL >= 2:
        tl.store(ptr + NP, a1, mask=gmask[:, None])
    if PL == 4:
        tl.store(ptr + 2 * NP, a2, mask=gmask[:, None])
        tl.store(ptr + 3 * NP, a3, mask=gmask[:, None])


@triton.jit
def _norms(raw, range_ptr, h, Hkv, N8: tl.constexpr):
    """Stored norms of a tile -> float32: fp16 as they are, or 8-bit log codes (tqpatch.norms) decoded as
    2^(low_h + (code - 1) step_h), 0 for code 0, with (low, step) from range_ptr [2, Hkv]."""
    if N8:
        code = raw.to(tl.float32)
        low, step = tl.load(range_ptr + h), tl.load(range_ptr + Hkv + h)
        return tl.where(code > 0, tl.exp2(low + (code - 1.0) * step), 0.0)
    else:
        return raw.to(tl.float32)


@triton.jit
def _online_softmax_step(s, valid, m_i, l_i):
    """One tile of the online softmax in base 2: scores s [GP, T] (log2 units), valid [T], running max m_i and
    sum l_i [GP] -> (p [GP, T] = 2^(s - m_new) on valid tokens else 0, alpha = 2^(m_i - m_new), m_new, l_new)."""
    s = tl.where(valid[None, :], s, NEG)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.where(valid[None, :], tl.exp2(s - m_new[:, None]), 0.0)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _rope_tile_bias(ra, rb, cos_t, sin_t, prow, hcols, D: tl.constexpr, ROPE_PREC: tl.constexpr):
    """s · ⟨q, R_p μ⟩ [rows, BT] of the tile's tokens p0 + t from the coefficient halves ra, rb [rows, D/2], the table's
    in-tile rows cos_t, sin_t [BT, D/2] (s·cos t f, s·sin t f) and row p0 at `prow` (angle addition:
    s·C_p0+t = (C_p0 C_t - S_p0 S_t) / s, s·S_p0+t = (S_p0 C_t + C_p0 S_t) / s; the caller divides by s)."""
    c0 = tl.load(prow + hcols)
    s0 = tl.load(prow + D + hcols)
    a2 = ra * c0[None, :] + rb * s0[None, :]
    b2 = rb * c0[None, :] - ra * s0[None, :]
    bias = tl.dot(a2, tl.trans(cos_t), input_precision=ROPE_PREC)
    return tl.dot(b2, tl.trans(sin_t), bias, input_precision=ROPE_PREC)


@triton.jit
def _tq_decode_split_kernel(
    qr_ptr, sqr,                          # rotated queries [B*Hq, QW] fp32: key group 0's Π₀q₀ in columns 0..KW0-1, group 1's
                                          # from KW0 (plane order within a group of planes), then S q for prod keys
    kc0_ptr, skc0b, skc0h, skc0t,         # key codes of group 0 [B, Hkv, *, bytes] uint8
    kn0_ptr, skn0b, skn0h, skn0t,         # its norms [B, Hkv, *] fp16, or uint8 log codes (KN8)
    kc1_ptr, skc1b, skc1h, skc1t,         # key group 1 (KG = 2): codes
    kn1_ptr, skn1b, skn1h, skn1t,         # and norms
    kg_ptr, skgb, skgh, skgt,             # key qjl signs [B, Hkv, *, D/8] uint8 (prod)
    kr_ptr, skrb, skrh, skrt,             # key residual norms [B, Hkv, *] fp16 (prod)
    kcent_ptr,                            # key centroids [KG, KCS] fp16 (group g's 2^bits values from g*KCS)
    vc0_ptr, svc0b, svc0h, svc0t,         # value codes and norms of group 0, group 1 (VG = 2)
    vn0_ptr, svn0b, svn0h, svn0t,
    vc1_ptr, svc1b, svc1h, svc1t,
    vn1_ptr, svn1b, svn1h, svn1t,
    vcent_ptr,                            # value centroids [VG, VCS] fp16
    krange_ptr, vrange_ptr,               # KN8/VN8: [KG or VG, 2, Hkv] fp32 (low, step) of each group's norm codes
    mask_ptr, smb, mask_off,              # valid flags uint8 [B, *]: compressed token j -> column mask_off + j
    kbias_ptr, skb,                       # score bias [B*Hq, L] fp32 (HAS_BIAS): added to ⟨q, k̃⟩ (centered keys)
    rc_ptr, src,                          # HAS_ROPE: [A | B] [B*Hq, D] fp32, the RoPE-position bias of compressed token j at
    rt_ptr, srt, rope_first, rope_log2,   # position p = rope_first + j: Σ_f A_f C_p[f] + B_f S_p[f] over the D/2 frequencies,
                                          # with (C_p | S_p) = row p of the table [rows, 2D] fp32 (s·cos | s·sin, halves repeated);
                                          # rope_log2 = scale_log2 / s
    nb_ptr,                               # HAS_NORM_BIAS: [B*Hq, KG] fp32, Σ_g nb_g n_g² added to ⟨q, k̃⟩ (the score variance)
    m_ptr, l_ptr, acc_ptr,                # partials [B*Hkv, S, G], [B*Hkv, S, G], [B*Hkv, S, G, AW] fp32
    Hkv, L, per_split, scale_log2, qjl_scale,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, AW: tl.constexpr,
    KG: tl.constexpr, KB0: tl.constexpr, KW0: tl.constexpr, KNB0: tl.constexpr, KPL0: tl.constexpr, KSB0: tl.constexpr,
    KB1: tl.constexpr, KW1: tl.constexpr, KNB1: tl.constexpr, KPL1: tl.constexpr, KSB1: tl.constexpr,
    VG: tl.constexpr, VB0: tl.constexpr, VW0: tl.constexpr, VNB0: tl.constexpr, VPL0: tl.constexpr, VSB0: tl.constexpr,
    VB1: tl.constexpr, VW1: tl.constexpr, VNB1: tl.constexpr, VPL1: tl.constexpr, VSB1: tl.constexpr,
    PROD: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROPE: tl.constexpr, ROPE_PREC: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, LUT: tl.constexpr, KN8: tl.constexpr, VN8: tl.constexpr,
    KCS: tl.constexpr, VCS: tl.constexpr,  # centroid table rows: max(16, 2^bits of the side's widest group, 2^(S+b) of a trellis group)
):
    # Code groups: a vector is stored as one group (TurboQuantCodec) or two (SplitCodec: channel groups with their own
    # bits, rotation and norm). Group g of the keys scores n_g ⟨Π_g q_g, c⟩ (the launcher gathers and rotates
    # q_g per head); its value sums Σ p n_g c are written at column offset g·VW0 of the partials and the combine
    # kernel maps them back through each group's rotation and channels at once.
    # Per group: bits B, W = padded width (a power of two: the launcher pads queries with zeros, so padding codes
    # score 0), NBY = real code bytes per token, PL = codes per byte read as planes (2 or 4): the byte tile
    # [BT, W/PL] is read once and code j of every byte (channels PL*k + j) is one plane [BT, W/PL] that feeds
    # tl.dot directly (queries and value sums in plane order); PL = 1: codes unpacked to natural order. SB > 0: trellis
    # codes with S = SB state bits (PL = 1), each coordinate looked up by its window in a 2^(S+b)-entry table.
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    b = (pid_bh // Hkv).to(tl.int64)
    h = (pid_bh % Hkv).to(tl.int64)
    g = tl.arange(0, GP)
    gmask = g < G
    cols = tl.arange(0, D)
    qrow = (b * Hkv * G + h * G + g) * sqr
    kq00, kq01, kq02, kq03 = _group_queries(qr_ptr, qrow, gmask, KW0, KPL0)
    if KG == 2:
        kq10, kq11, kq12, kq13 = _group_queries(qr_ptr, qrow + KW0, gmask, KW1, KPL1)
    if PROD:
        q_sk = tl.load(qr_ptr + qrow[:, None] + KW0 + cols[None, :], mask=gmask[:, None], other=0.0).to(tl.float16)
    if HAS_ROPE:  # the bias of a tile at p0 + t from the rows of p0 and of t (angle addition): no [B*Hq, L] tensor
        HD: tl.constexpr = D // 2
        hcols = tl.arange(0, HD)
        crow = (b * Hkv * G + h * G + g) * src
        ra = tl.load(rc_ptr + crow[:, None] + hcols[None, :], mask=gmask[:, None], other=0.0)  # [GP, D/2]
        rb = tl.load(rc_ptr + crow[:, None] + HD + hcols[None, :], mask=gmask[:, None], other=0.0)
        trow = tl.arange(0, BLOCK_T)[:, None] * srt
        cos_t = tl.load(rt_ptr + trow + hcols[None, :])  # [BT, D/2] C_t of the offsets t = 0 .. BT-1
        sin_t = tl.load(rt_ptr + trow + D + hcols[None, :])
    if HAS_NORM_BIAS:  # per query row and key group, in log2 units: s += nb_g n_g²
        nrow = (b * Hkv * G + h * G + g) * KG
        nb0 = tl.load(nb_ptr + nrow, mask=gmask, other=0.0) * scale_log2
        if KG == 2:
            nb1 = tl.load(nb_ptr + nrow + 1, mask=gmask, other=0.0) * scale_log2
    m_i = tl.full([GP], NEG, dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    a00 = tl.zeros([GP, VW0 // VPL0], dtype=tl.float32)
    a01, a02, a03 = a00, a00, a00
    if VG == 2:
        a10 = tl.zeros([GP, VW1 // VPL1], dtype=tl.float32)
        a11, a12, a13 = a10, a10, a10
    start = pid_s * per_split
    end = tl.minimum(L, start + per_split)  # per_split is a multiple of BLOCK_T: splits never overlap
    kb0 = kc0_ptr + b * skc0b + h * skc0h
    kb1 = kc1_ptr + b * skc1b + h * skc1h
    vb0 = vc0_ptr + b * svc0b + h * svc0h
    vb1 = vc1_ptr + b * svc1b + h * svc1h
    first = start + tl.arange(0, BLOCK_T)
    fmask = first < end
    first = first.to(tl.int64)
    # Norms and the byte tiles of plane groups are prefetched a tile ahead by hand (8-bit norms are too narrow for
    # the async copies Triton pipelines wider loads with); groups read in natural order load in the loop.
    kn0_next = tl.load(kn0_ptr + b * skn0b + h * skn0h + first * skn0t, mask=fmask, other=0)
    vn0_next = tl.load(vn0_ptr + b * svn0b + h * svn0h + first * svn0t, mask=fmask, other=0)
    kw0_next = _plane_bytes(kb0 + first * skc0t, fmask, KW0, KPL0, KNB0)
    vw0_next = _plane_bytes(vb0 + first * svc0t, fmask, VW0, VPL0, VNB0)
    if KG == 2:
        kn1_next = tl.load(kn1_ptr + b * skn1b + h * skn1h + first * skn1t, mask=fmask, other=0)
        kw1_next = _plane_bytes(kb1 + first * skc1t, fmask, KW1, KPL1, KNB1)
    if VG == 2:
        vn1_next = tl.load(vn1_ptr + b * svn1b + h * svn1h + first * svn1t, mask=fmask, other=0)
        vw1_next = _plane_bytes(vb1 + first * svc1t, fmask, VW1, VPL1, VNB1)
    for t0 in range(0, per_split, BLOCK_T):
        offs = start + t0 + tl.arange(0, BLOCK_T)
        tmask = offs < L
        nxt = (offs + BLOCK_T).to(tl.int64)
        nmask = (offs + BLOCK_T) < end
        offs = offs.to(tl.int64)
        # scores: Σ_g n_g ⟨Π_g q_g, c_g⟩ (+ the QJL term), in log2 units
        kw0 = kw0_next.to(tl.int32)
        kw0_next = _plane_bytes(kb0 + nxt * skc0t, nmask, KW0, KPL0, KNB0)
        kn0 = _norms(kn0_next, krange_ptr, h, Hkv, KN8)
        kn0_next = tl.load(kn0_ptr + b * skn0b + h * skn0h + nxt * skn0t, mask=nmask, other=0)
        s = _group_scores(kq00, kq01, kq02, kq03, kw0, kb0 + offs * skc0t, tmask, kcent_ptr, BLOCK_T, KW0, KNB0, KB0, KPL0, LUT, KSB0)
        if PROD:
            sgn = _unpack(kg_ptr + b * skgb + h * skgh + offs * skgt, tmask, BLOCK_T, D, 1, D // 8).to(tl.float16) * 2.0 - 1.0
            gam = tl.load(kr_ptr + b * skrb + h * skrh + offs * skrt, mask=tmask, other=0.0).to(tl.float32)
            s += tl.dot(q_sk, tl.trans(sgn)) * (qjl_scale * gam)[None, :]
        s = s * (kn0 * scale_log2)[None, :]
        if HAS_NORM_BIAS:
            s += nb0[:, None] * (kn0 * kn0)[None, :]
        if KG == 2:
            kw1 = kw1_next.to(tl.int32)
            kw1_next = _plane_bytes(kb1 + nxt * skc1t, nmask, KW1, KPL1, KNB1)
            kn1 = _norms(kn1_next, krange_ptr + 2 * Hkv, h, Hkv, KN8)
            kn1_next = tl.load(kn1_ptr + b * skn1b + h * skn1h + nxt * skn1t, mask=nmask, other=0)
            s1 = _group_scores(kq10, kq11, kq12, kq13, kw1, kb1 + offs * skc1t, tmask, kcent_ptr + KCS, BLOCK_T, KW1, KNB1, KB1, KPL1, LUT, KSB1)
            s += s1 * (kn1 * scale_log2)[None, :]
            if HAS_NORM_BIAS:
                s += nb1[:, None] * (kn1 * kn1)[None, :]
        if HAS_BIAS:
            brow = (b * Hkv * G + h * G + g) * skb
            s += tl.load(kbias_ptr + brow[:, None] + offs[None, :], mask=gmask[:, None] & tmask[None, :], other=0.0) * scale_log2
        if HAS_ROPE:
            p0 = rope_first + tl.minimum(start + t0, L - 1)  # a tile past the last token (all masked) reads a valid row
            s += _rope_tile_bias(ra, rb, cos_t, sin_t, rt_ptr + p0.to(tl.int64) * srt, hcols, D, ROPE_PREC) * rope_log2
        valid = tmask
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + b * smb + mask_off + offs, mask=tmask, other=0) != 0)
        p, alpha, m_new, l_i = _online_softmax_step(s, valid, m_i, l_i)
        # value sums per group in its rotated space: Σ p n_g c_g
        vw0 = vw0_next.to(tl.int32)
        vw0_next = _plane_bytes(vb0 + nxt * svc0t, nmask, VW0, VPL0, VNB0)
        vn0 = _norms(vn0_next, vrange_ptr, h, Hkv, VN8)
        vn0_next = tl.load(vn0_ptr + b * svn0b + h * svn0h + nxt * svn0t, mask=nmask, other=0)
        a00, a01, a02, a03 = _group_values((p * vn0[None, :]).to(tl.float16), alpha, a00, a01, a02, a03, vw0, vb0 + offs * svc0t,
                                           tmask, vcent_ptr, BLOCK_T, VW0, VNB0, VB0, VPL0, LUT, VSB0)
        if VG == 2:
            vw1 = vw1_next.to(tl.int32)
            vw1_next = _plane_bytes(vb1 + nxt * svc1t, nmask, VW1, VPL1, VNB1)
            vn1 = _norms(vn1_next, vrange_ptr + 2 * Hkv, h, Hkv, VN8)
            vn1_next = tl.load(vn1_ptr + b * svn1b + h * svn1h + nxt * svn1t, mask=nmask, other=0)
            a10, a11, a12, a13 = _group_values((p * vn1[None, :]).to(tl.float16), alpha, a10, a11, a12, a13, vw1, vb1 + offs * svc1t,
                                               tmask, vcent_ptr + VCS, BLOCK_T, VW1, VNB1, VB1, VPL1, LUT, VSB1)
        m_i = m_new
    out = pid_bh * n_split + pid_s
    tl.store(m_ptr + out * G + g, m_i, mask=gmask)
    tl.store(l_ptr + out * G + g, l_i, mask=gmask)
    arow = acc_ptr + (out * G + g) * AW
    _store_group(arow, gmask, a00, a01, a02, a03, VW0, VPL0)
    if VG == 2:
        _store_group(arow + VW0, gmask, a10, a11, a12, a13, VW1, VPL1)


@triton.jit
def _tq_rope_bias_kernel(
    rc_ptr, src,                          # [A | B] [R, D] fp32 (`rope.RopeBias.coefficients`, rows = B*Hq)
    rt_ptr, srt, rope_first, inv_scale,   # table [rows, 2D] fp32 (s·cos | s·sin); compressed token j at position rope_first + j
    out_ptr, sout,                        # bias [R, L] fp32: ⟨q_r, R_p μ⟩ of compressed token j
    R, L, tiles_per_program,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, ROPE_PREC: tl.constexpr,
):
    """The centered keys' position bias written out dense (`RopeBias.dense`), for the warp decode kernel, which adds
    a dense bias but cannot afford the table's registers: grid (cdiv(R, BLOCK_R), programs along L), each program
    `tiles_per_program` consecutive tiles of BLOCK_T tokens by the split kernel's angle addition (`_rope_tile_bias`)."""
    HD: tl.constexpr = D // 2
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    hcols = tl.arange(0, HD)
    crow = rows.to(tl.int64) * src
    ra = tl.load(rc_ptr + crow[:, None] + hcols[None, :], mask=rmask[:, None], other=0.0)
    rb = tl.load(rc_ptr + crow[:, None] + HD + hcols[None, :], mask=rmask[:, None], other=0.0)
    t = tl.arange(0, BLOCK_T)
    cos_t = tl.load(rt_ptr + t[:, None] * srt + hcols[None, :])
    sin_t = tl.load(rt_ptr + t[:, None] * srt + D + hcols[None, :])
    orow = out_ptr + rows.to(tl.int64)[:, None] * sout
    for i in range(tiles_per_program):
        t0 = (tl.program_id(1) * tiles_per_program + i) * BLOCK_T
        if t0 < L:
            p0 = (rope_first + t0).to(tl.int64)
            bias = _rope_tile_bias(ra, rb, cos_t, sin_t, rt_ptr + p0 * srt, hcols, D, ROPE_PREC) * inv_scale
            tl.store(orow + (t0 + t)[None, :], bias, mask=rmask[:, None] & ((t0 + t) < L)[None, :])


@triton.jit
def _tq_rotate_rows_kernel(x_ptr, sx, w_ptr, out_ptr, R, N, D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out [R, N] fp32 = x [R, D] @ W [D, N] fp32 (contiguous), x's rows `sx` apart in any float dtype, products and
    sums in float32 (tl.dot at "ieee" precision). Grid (cdiv(R, BLOCK_R), cdiv(N, BLOCK_N)); BLOCK_K = D rounded up
    to a power of two. One launch instead of a cast and a GEMM (a decode step's queries are a few hundred rows)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + rows[:, None] * sx + k[None, :], mask=(rows < R)[:, None] & (k < D)[None, :], other=0.0).to(tl.float32)
    w = tl.load(w_ptr + k[:, None] * N + cols[None, :], mask=(k < D)[:, None] & (cols < N)[None, :], other=0.0)
    out = tl.dot(x, w, input_precision="ieee")
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], out, mask=(rows < R)[:, None] & (cols < N)[None, :])


@triton.jit
def _tq_decode_merge_kernel(
    m_ptr, l_ptr, acc_ptr, S,             # partials [P, S, G], [P, S, G], [P, S, G, AW] of the split kernel
    m2_ptr, l2_ptr, acc2_ptr, S2,         # merged partials [P, S2, G], [P, S2, G], [P, S2, G, AW]: splits CH·i .. CH·i + CH - 1
    G: tl.constexpr, AW: tl.constexpr, CH: tl.constexpr,
):
    """Program (p·G + g, i) merges CH consecutive splits of one query head into one, exactly as the combine kernel
    would: M = max m_s, l = Σ e^(m_s - M) l_s, acc = Σ e^(m_s - M) acc_s (base-2 exponents). A first level for long
    contexts at small batch, where the combine kernel's B·Hq programs would each read hundreds of splits."""
    pid = tl.program_id(0)
    p = pid // G
    g = pid % G
    i = tl.program_id(1)
    sidx = i * CH + tl.arange(0, CH)
    smask = sidx < S
    row = (p * S + sidx) * G + g
    m_s = tl.load(m_ptr + row, mask=smask, other=NEG)
    l_s = tl.load(l_ptr + row, mask=smask, other=0.0)
    cols = tl.arange(0, AW)
    a_s = tl.load(acc_ptr + row.to(tl.int64)[:, None] * AW + cols[None, :], mask=smask[:, None], other=0.0)
    big = tl.max(m_s, axis=0)
    w_s = tl.exp2(m_s - big)
    out = (p * S2 + i) * G + g
    tl.store(m2_ptr + out, big)
    tl.store(l2_ptr + out, tl.sum(w_s * l_s, axis=0))
    tl.store(acc2_ptr + out.to(tl.int64) * AW + cols, tl.sum(w_s[:, None] * a_s, axis=0))


@triton.jit
def _tq_decode_combine_kernel(
    m_ptr, l_ptr, acc_ptr, S,             # partials of the split kernel (value sums [.., AW] in the groups' rotated spaces)
    q_ptr, sqb, sqh,                      # queries [B, Hq, D] (last stride 1), any float dtype
    fk_ptr, sfkb, sfkh, sfkt,             # full-precision keys [B, Hkv, F, D]
    fv_ptr, sfvb, sfvh, sfvt,             # full-precision values [B, Hkv, F, D]
    F,
    fm_ptr, sfmb, fm_off,                 # valid flags uint8 [B, *]: fp token f -> column fm_off + f
    rot_ptr, srh,                         # U [Hkv (head stride srh, 0 if shared), AW, D] fp32: x = y @ U maps the partials'
                                          # columns back (Π for one group, rows in plane order; per group Π_g into its channels)
    o_ptr, sob, soh,                      # out [B, Hq, D] (last stride 1)
    Hkv, scale_log2,
    G: tl.constexpr, D: tl.constexpr, AW: tl.constexpr, AWU: tl.constexpr,  # the split kernel wrote columns < AWU
    HAS_FMASK: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """One program per query head (B*Hq): the partials of the S splits are read BLOCK_S at a time (one round of
    independent loads for S <= BLOCK_S, not a chain of S dependent steps), with M the max of all m:
        out = (e^(m_fp - M) acc_fp + Σ_s e^(m_s - M) acc_s U) / (e^(m_fp - M) l_fp + Σ_s e^(m_s - M) l_s)
    the un-rotation U applied BLOCK_J rotated columns at a time (any AW, D)."""
    pid = tl.program_id(0)
    bh = pid // G
    g = pid % G
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    cols = tl.arange(0, D)
    q = tl.load(q_ptr + b * sqb + (h * G + g) * sqh + cols).to(tl.float32)
    # 1. the full-precision tokens (sinks, window, the new token), exactly
    m_fp = NEG
    l_fp = 0.0
    acc_fp = tl.zeros([D], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        offs = f0 + tl.arange(0, BLOCK_F)
        fmask = offs < F
        k = tl.load(fk_ptr + b * sfkb + h * sfkh + offs[:, None] * sfkt + cols[None, :], mask=fmask[:, None], other=0.0).to(tl.float32)
        s = tl.sum(q[None, :] * k, axis=1) * scale_log2
        valid = fmask
        if HAS_FMASK:
            valid = valid & (tl.load(fm_ptr + b * sfmb + fm_off + offs, mask=fmask, other=0) != 0)
        s = tl.where(valid, s, NEG)
        m_new = tl.maximum(m_fp, tl.max(s, axis=0))
        alpha = tl.exp2(m_fp - m_new)
        p = tl.where(valid, tl.exp2(s - m_new), 0.0)
        l_fp = l_fp * alpha + tl.sum(p, axis=0)
        v = tl.load(fv_ptr + b * sfvb + h * sfvh + offs[:, None] * sfvt + cols[None, :], mask=fmask[:, None], other=0.0).to(tl.float32)
        acc_fp = acc_fp * alpha + tl.sum(p[:, None] * v, axis=0)
        m_fp = m_new
    # 2. the compressed tokens, BLOCK_J rotated columns at a time (unrolled: the chunks' loads are independent): merge
    #    the splits online (running max `big`, normaliser `total`, value sums `part`), then rotate back: part @ U
    sidx = tl.arange(0, BLOCK_S)
    base = bh * S
    jj = tl.arange(0, BLOCK_J)
    out = tl.zeros([D], dtype=tl.float32)
    big = m_fp
    total = l_fp
    for j0 in tl.static_range(0, AWU, BLOCK_J):
        big = m_fp
        total = l_fp
        part = tl.zeros([BLOCK_J], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            smask = (s0 + sidx) < S
            m_s = tl.load(m_ptr + (base + s0 + sidx) * G + g, mask=smask, other=NEG)
            l_s = tl.load(l_ptr + (base + s0 + sidx) * G + g, mask=smask, other=0.0)
            a_s = tl.load(acc_ptr + ((base + s0 + sidx) * G + g)[:, None] * AW + (j0 + jj)[None, :],
                          mask=smask[:, None] & ((j0 + jj) < AWU)[None, :], other=0.0)
            new = tl.maximum(big, tl.max(m_s, axis=0))
            alpha = tl.exp2(big - new)
            w_s = tl.exp2(m_s - new)
            total = total * alpha + tl.sum(w_s * l_s, axis=0)
            part = part * alpha + tl.sum(w_s[:, None] * a_s, axis=0)
            big = new
        rot = tl.load(rot_ptr + h * srh + (j0 + jj)[:, None] * D + cols[None, :], mask=((j0 + jj) < AWU)[:, None], other=0.0)
        out += tl.sum(part[:, None] * rot, axis=0)
    # every chunk saw the same splits, so `big` and `total` are the same after each
    inv = 1.0 / tl.where(total > 0, total, 1.0)
    out = (out + acc_fp * tl.exp2(m_fp - big)) * inv
    tl.store(o_ptr + b * sob + (h * G + g) * soh + cols, out.to(o_ptr.dtype.element_ty))

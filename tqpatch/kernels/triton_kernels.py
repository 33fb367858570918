"""Triton kernels (private: call them through `tqpatch.kernels`, which checks and launches them).

Imported lazily, only when a CUDA tensor meets a kernel, so CPU installs never need Triton.
All three kernels read/write the bit layout of `tqpatch.packing` (LSB-first
b-bit stream per vector) and the parts of `tqpatch.codec.TurboQuantCodec`.

_tq_store_kernel          x [rows, d] -> packed codes + fp16 norms (+ QJL signs, residual norms)
_tq_decode_split_kernel   one query token vs. a span of compressed tokens (flash-decoding split),
                          scores and value sums in the rotated space
_tq_decode_combine_kernel merges the splits, attends to the full-precision tokens exactly,
                          rotates the value sum back once, writes the output
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": exp2(NEG - NEG) stays finite, weights of masked tokens are forced to 0


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
            for j in tl.static_range(HALF - 1):
                count += (a > tl.load(bnd_ptr + HALF + j) * SCALE).to(tl.int32)
            idx = tl.where(y > mid, HALF + count, HALF - 1 - count)
            # 8 codes of MB bits fill exactly MB bytes: build the 8*MB-bit word, write its bytes.
            idx8 = tl.reshape(idx.to(tl.int8), [BLOCK_R, G8, 8]).to(tl.int32)  # (int8 through any layout change)
            word = tl.sum(idx8 << shifts[None, None, :], axis=2)  # [BLOCK_R, G8]
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
        if NORM8:  # tqpatch.norms: code = 1 + round((log2 n - low_h) / step_h) in 1..255, 0 for n = 0 (n rounded to fp16 first)
            n16 = norm.to(tl.float16).to(tl.float32)
            low = tl.load(nrange_ptr + h, mask=rmask, other=0.0)
            step = tl.load(nrange_ptr + H + h, mask=rmask, other=1.0)
            code = tl.floor((tl.log2(tl.maximum(n16, 1.1754943508222875e-38)) - low) / step + 0.5) + 1.0
            code = tl.where(n16 > 0, tl.minimum(tl.maximum(code, 1.0), 255.0), 0.0)
            tl.store(n_ptr + b * snb + h * snh + t * snt, code.to(tl.uint8), mask=rmask)
        else:
            tl.store(n_ptr + b * snb + h * snh + t * snt, norm.to(tl.float16), mask=rmask)
        if PROD:
            bits = (proj >= 0).to(tl.int32)
            sw = tl.sum(tl.reshape(bits, [BLOCK_R, D // 8, 8]) << tl.arange(0, 8)[None, None, :], axis=2)
            tl.store(g_ptr + (b * sgb + h * sgh + t * sgt)[:, None] + tl.arange(0, D // 8)[None, :], sw.to(tl.uint8), mask=rmask[:, None])
            tl.store(r_ptr + b * srb + h * srh + t * srt, tl.sqrt(gamma2).to(tl.float16), mask=rmask)


@triton.jit
def _unpack(row_ptr, tmask, BT: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Code indices [BT, D] int32, natural channel order, from rows of a packed b-bit stream.

    The row's bytes are loaded once ([BT, D*BITS/8], or three [BT, D/8] byte planes for b = 3)
    and broadcast to the codes they hold, so no per-code pointers are built.
    """
    if (8 % BITS) == 0:
        P: tl.constexpr = 8 // BITS  # codes per byte
        NB: tl.constexpr = D // P
        w = tl.load(row_ptr[:, None] + tl.arange(0, NB)[None, :], mask=tmask[:, None], other=0).to(tl.int32)
        w = tl.reshape(tl.broadcast_to(w[:, :, None], (BT, NB, P)), (BT, D))
        shift = (tl.arange(0, D) % P) * BITS
    else:  # 8 codes in BITS bytes: build the word of each group of 8
        grp = tl.arange(0, D // 8) * BITS
        w = tl.zeros([BT, D // 8], dtype=tl.int32)
        for j in tl.static_range(BITS):
            w = w | (tl.load(row_ptr[:, None] + (grp + j)[None, :], mask=tmask[:, None], other=0).to(tl.int32) << (8 * j))
        w = tl.reshape(tl.broadcast_to(w[:, :, None], (BT, D // 8, 8)), (BT, D))
        shift = (tl.arange(0, D) % 8) * BITS
    return (w >> shift[None, :]) & ((1 << BITS) - 1)


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
def _nibble_planes(w8, ASM: tl.constexpr):
    """LUT=3, 4-bit codes: both planes of a byte tile w8 [BT, NB] uint8 -> (fp16 centroids of the low nibbles,
    of the high nibbles), looked up in registers by byte permutes (PTX prmt) with the 16-entry table baked into
    ASM (`kernels.nibble_lut_asm`): no gather, but ~4 integer instructions per value, which measured slower
    than the L1 gather on the H200 (bench/RESULTS.md, run 22); a tuning variant the bench sweeps."""
    return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [w8], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def _plane(tab_ptr, w, j: tl.constexpr, BITS: tl.constexpr, LUT: tl.constexpr):
    """fp16 centroid values of code j (bits j*BITS..) of every byte of the tile w [BT, NB]."""
    return _lookup(tab_ptr, (w >> (j * BITS)) & ((1 << BITS) - 1), BITS, LUT)


@triton.jit
def _plane_query(qr_ptr, qrow, gmask, j: tl.constexpr, NP: tl.constexpr):
    """Columns j*NP .. (j+1)*NP of the (plane-ordered) rotated queries, fp16 [GP, NP]."""
    return tl.load(qr_ptr + qrow[:, None] + j * NP + tl.arange(0, NP)[None, :], mask=gmask[:, None], other=0.0).to(tl.float16)


@triton.jit
def _norm_from_code(code, low, step):
    """8-bit log norm codes (tqpatch.norms) -> float32 norms: 2^(low + (code - 1) step), 0 for code 0."""
    code = code.to(tl.float32)
    return tl.where(code > 0, tl.exp2(low + (code - 1.0) * step), 0.0)


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
def _tq_decode_split_kernel(
    qr_ptr, sqr,                          # rotated queries [B*Hq, QW] fp32: Π q (| S q for prod keys), plane order when KPL
    kc_ptr, skcb, skch, skct,             # key codes [B, Hkv, *, NBK] uint8
    kn_ptr, sknb, sknh, sknt,             # key norms [B, Hkv, *] fp16, or uint8 log codes (KN8)
    kg_ptr, skgb, skgh, skgt,             # key qjl signs [B, Hkv, *, D/8] uint8 (prod)
    kr_ptr, skrb, skrh, skrt,             # key residual norms [B, Hkv, *] fp16 (prod)
    kcent_ptr,                            # key centroids [2^KB] fp16
    vc_ptr, svcb, svch, svct,             # value codes [B, Hkv, *, NBV] uint8
    vn_ptr, svnb, svnh, svnt,             # value norms fp16, or uint8 log codes (VN8)
    vcent_ptr,                            # value centroids [2^VB] fp16
    krange_ptr, vrange_ptr,               # KN8/VN8: [2, Hkv] fp32 (low, step) of the norm codes, per KV head
    mask_ptr, smb, mask_off,              # valid flags uint8 [B, *]: compressed token j -> column mask_off + j
    kbias_ptr, skb,                       # score bias [B*Hq, L] fp32 (HAS_BIAS): added to ⟨q, k̃⟩ (centered keys)
    m_ptr, l_ptr, acc_ptr,                # partials [B*Hkv, S, G], [B*Hkv, S, G], [B*Hkv, S, G, D] fp32 (plane order when VPL)
    Hkv, L, per_split, scale_log2, qjl_scale,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    KB: tl.constexpr, VB: tl.constexpr, PROD: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, KPL: tl.constexpr, VPL: tl.constexpr, LUT: tl.constexpr, KN8: tl.constexpr, VN8: tl.constexpr,
    KASM: tl.constexpr = "", VASM: tl.constexpr = "",  # LUT=3: the byte-permute lookups of the key / value tables
):
    # KPL/VPL = P > 0 (codes per byte, 2 or 4): "plane" path. The byte tile [BT, D/P] is read once and
    # code j of every byte (channels P*k + j) is one plane [BT, D/P] that feeds tl.dot directly: the
    # queries come in plane order (Π's rows permuted on the host), the value sums are written in plane
    # order and the combine kernel rotates back with Π's rows permuted the same way.
    # KPL/VPL = 0: codes unpacked to natural channel order (3 bits, or planes too narrow for tl.dot).
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    b = (pid_bh // Hkv).to(tl.int64)
    h = (pid_bh % Hkv).to(tl.int64)
    g = tl.arange(0, GP)
    gmask = g < G
    cols = tl.arange(0, D)
    qrow = (b * Hkv * G + h * G + g) * sqr
    if KPL > 0:
        NK: tl.constexpr = D // KPL
        ck = tl.arange(0, NK)
        q0 = _plane_query(qr_ptr, qrow, gmask, 0, NK)
        q1 = _plane_query(qr_ptr, qrow, gmask, 1, NK)
        if KPL == 4:
            q2 = _plane_query(qr_ptr, qrow, gmask, 2, NK)
            q3 = _plane_query(qr_ptr, qrow, gmask, 3, NK)
    else:
        q_rot = tl.load(qr_ptr + qrow[:, None] + cols[None, :], mask=gmask[:, None], other=0.0).to(tl.float16)  # [GP, D]
    if PROD:
        q_sk = tl.load(qr_ptr + qrow[:, None] + D + cols[None, :], mask=gmask[:, None], other=0.0).to(tl.float16)
    m_i = tl.full([GP], NEG, dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    k_low, k_step, v_low, v_step = 0.0, 0.0, 0.0, 0.0
    if KN8:
        k_low, k_step = tl.load(krange_ptr + h), tl.load(krange_ptr + Hkv + h)
    if VN8:
        v_low, v_step = tl.load(vrange_ptr + h), tl.load(vrange_ptr + Hkv + h)
    if VPL > 0:
        NV: tl.constexpr = D // VPL
        cv = tl.arange(0, NV)
        acc0 = tl.zeros([GP, NV], dtype=tl.float32)
        acc1 = tl.zeros([GP, NV], dtype=tl.float32)
        if VPL == 4:
            acc2 = tl.zeros([GP, NV], dtype=tl.float32)
            acc3 = tl.zeros([GP, NV], dtype=tl.float32)
    else:
        acc = tl.zeros([GP, D], dtype=tl.float32)
    start = pid_s * per_split
    end = tl.minimum(L, start + per_split)  # per_split is a multiple of BLOCK_T: splits never overlap
    kbase = kc_ptr + b * skcb + h * skch
    vbase = vc_ptr + b * svcb + h * svch
    first = start + tl.arange(0, BLOCK_T)
    # 8-bit norm codes are prefetched a tile ahead by hand (one byte per token is too narrow for the async copies
    # Triton pipelines the fp16 norms with)
    if KN8:
        kn_next = tl.load(kn_ptr + b * sknb + h * sknh + first.to(tl.int64) * sknt, mask=first < end, other=0)
    if VN8:
        vn_next = tl.load(vn_ptr + b * svnb + h * svnh + first.to(tl.int64) * svnt, mask=first < end, other=0)
    if KPL > 0:  # the plane path prefetches the next tile's code bytes while this tile is computed
        kw_next = tl.load(kbase + first.to(tl.int64)[:, None] * skct + ck[None, :], mask=(first < end)[:, None], other=0)
    if VPL > 0:
        vw_next = tl.load(vbase + first.to(tl.int64)[:, None] * svct + cv[None, :], mask=(first < end)[:, None], other=0)
    for t0 in range(0, per_split, BLOCK_T):
        offs = start + t0 + tl.arange(0, BLOCK_T)
        tmask = offs < L
        nxt = (offs + BLOCK_T).to(tl.int64)
        nmask = (offs + BLOCK_T) < end
        offs = offs.to(tl.int64)
        krow = kbase + offs * skct
        if KPL > 0:
            if LUT == 3 and KB == 4:
                k0, k1 = _nibble_planes(kw_next, KASM)
            kw = kw_next.to(tl.int32)  # [BT, D/P] bytes
            kw_next = tl.load(kbase + nxt[:, None] * skct + ck[None, :], mask=nmask[:, None], other=0)
            if LUT == 3 and KB == 4:
                s = tl.dot(q1, tl.trans(k1), tl.dot(q0, tl.trans(k0)))
            else:
                s = tl.dot(q0, tl.trans(_plane(kcent_ptr, kw, 0, KB, LUT)))
                s = tl.dot(q1, tl.trans(_plane(kcent_ptr, kw, 1, KB, LUT)), s)
            if KPL == 4:
                s = tl.dot(q2, tl.trans(_plane(kcent_ptr, kw, 2, KB, LUT)), s)
                s = tl.dot(q3, tl.trans(_plane(kcent_ptr, kw, 3, KB, LUT)), s)
        else:
            kval = _lookup(kcent_ptr, _unpack(krow, tmask, BLOCK_T, D, KB), KB, LUT)  # [BT, D] rotated unit keys
            s = tl.dot(q_rot, tl.trans(kval))  # [GP, BT]
        if PROD:
            sgn = _unpack(kg_ptr + b * skgb + h * skgh + offs * skgt, tmask, BLOCK_T, D, 1).to(tl.float16) * 2.0 - 1.0
            gam = tl.load(kr_ptr + b * skrb + h * skrh + offs * skrt, mask=tmask, other=0.0).to(tl.float32)
            s += tl.dot(q_sk, tl.trans(sgn)) * (qjl_scale * gam)[None, :]
        if KN8:
            kn = _norm_from_code(kn_next, k_low, k_step)
            kn_next = tl.load(kn_ptr + b * sknb + h * sknh + nxt * sknt, mask=nmask, other=0)
        else:
            kn = tl.load(kn_ptr + b * sknb + h * sknh + offs * sknt, mask=tmask, other=0.0).to(tl.float32)
        s = s * (kn * scale_log2)[None, :]
        if HAS_BIAS:
            brow = (b * Hkv * G + h * G + g) * skb
            s += tl.load(kbias_ptr + brow[:, None] + offs[None, :], mask=gmask[:, None] & tmask[None, :], other=0.0) * scale_log2
        valid = tmask
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + b * smb + mask_off + offs, mask=tmask, other=0) != 0)
        p, alpha, m_new, l_i = _online_softmax_step(s, valid, m_i, l_i)
        if VN8:
            vn = _norm_from_code(vn_next, v_low, v_step)
            vn_next = tl.load(vn_ptr + b * svnb + h * svnh + nxt * svnt, mask=nmask, other=0)
        else:
            vn = tl.load(vn_ptr + b * svnb + h * svnh + offs * svnt, mask=tmask, other=0.0).to(tl.float32)
        pv = (p * vn[None, :]).to(tl.float16)
        vrow = vbase + offs * svct
        if VPL > 0:
            if LUT == 3 and VB == 4:
                v0, v1 = _nibble_planes(vw_next, VASM)
            vw = vw_next.to(tl.int32)
            vw_next = tl.load(vbase + nxt[:, None] * svct + cv[None, :], mask=nmask[:, None], other=0)
            if LUT == 3 and VB == 4:
                acc0 = tl.dot(pv, v0, acc0 * alpha[:, None])
                acc1 = tl.dot(pv, v1, acc1 * alpha[:, None])
            else:
                acc0 = tl.dot(pv, _plane(vcent_ptr, vw, 0, VB, LUT), acc0 * alpha[:, None])
                acc1 = tl.dot(pv, _plane(vcent_ptr, vw, 1, VB, LUT), acc1 * alpha[:, None])
            if VPL == 4:
                acc2 = tl.dot(pv, _plane(vcent_ptr, vw, 2, VB, LUT), acc2 * alpha[:, None])
                acc3 = tl.dot(pv, _plane(vcent_ptr, vw, 3, VB, LUT), acc3 * alpha[:, None])
        else:
            vval = _lookup(vcent_ptr, _unpack(vrow, tmask, BLOCK_T, D, VB), VB, LUT)  # [BT, D] rotated unit values
            acc = tl.dot(pv, vval, acc * alpha[:, None])
        m_i = m_new
    out = pid_bh * n_split + pid_s
    tl.store(m_ptr + out * G + g, m_i, mask=gmask)
    tl.store(l_ptr + out * G + g, l_i, mask=gmask)
    if VPL > 0:
        arow = acc_ptr + (out * G + g)[:, None] * D + cv[None, :]
        tl.store(arow, acc0, mask=gmask[:, None])
        tl.store(arow + NV, acc1, mask=gmask[:, None])
        if VPL == 4:
            tl.store(arow + 2 * NV, acc2, mask=gmask[:, None])
            tl.store(arow + 3 * NV, acc3, mask=gmask[:, None])
    else:
        tl.store(acc_ptr + (out * G + g)[:, None] * D + cols[None, :], acc, mask=gmask[:, None])


@triton.jit
def _tq_decode_combine_kernel(
    m_ptr, l_ptr, acc_ptr, S,             # partials of the split kernel
    q_ptr, sqb, sqh,                      # queries [B, Hq, D] (last stride 1), any float dtype
    fk_ptr, sfkb, sfkh, sfkt,             # full-precision keys [B, Hkv, F, D]
    fv_ptr, sfvb, sfvh, sfvt,             # full-precision values [B, Hkv, F, D]
    F,
    fm_ptr, sfmb, fm_off,                 # valid flags uint8 [B, *]: fp token f -> column fm_off + f
    rot_ptr,                              # Π [D, D] fp32 row-major: x = y @ Π (rows in the partials' channel order)
    o_ptr, sob, soh,                      # out [B, Hq, D] (last stride 1)
    Hkv, scale_log2,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    HAS_FMASK: tl.constexpr, BLOCK_F: tl.constexpr, UNROT: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // Hkv).to(tl.int64)
    h = (pid % Hkv).to(tl.int64)
    g = tl.arange(0, GP)
    gmask = g < G
    cols = tl.arange(0, D)
    q = tl.load(q_ptr + b * sqb + (h * G + g)[:, None] * sqh + cols[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
    m_i = tl.full([GP], NEG, dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc_fp = tl.zeros([GP, D], dtype=tl.float32)
    # 1. the full-precision tokens (sinks, window, the new token), exactly
    for f0 in range(0, F, BLOCK_F):
        offs = f0 + tl.arange(0, BLOCK_F)
        fmask = offs < F
        k = tl.load(fk_ptr + b * sfkb + h * sfkh + offs[:, None] * sfkt + cols[None, :], mask=fmask[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        valid = fmask
        if HAS_FMASK:
            valid = valid & (tl.load(fm_ptr + b * sfmb + fm_off + offs, mask=fmask, other=0) != 0)
        p, alpha, m_new, l_i = _online_softmax_step(s, valid, m_i, l_i)
        v = tl.load(fv_ptr + b * sfvb + h * sfvh + offs[:, None] * sfvt + cols[None, :], mask=fmask[:, None], other=0.0).to(tl.float32)
        acc_fp = acc_fp * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    # 2. merge the splits over compressed tokens (their value sums are in the rotated space)
    acc_rot = tl.zeros([GP, D], dtype=tl.float32)
    for s_i in range(0, S):
        part = pid * S + s_i
        m_s = tl.load(m_ptr + part * G + g, mask=gmask, other=NEG)
        l_s = tl.load(l_ptr + part * G + g, mask=gmask, other=0.0)
        a_s = tl.load(acc_ptr + (part * G + g)[:, None] * D + cols[None, :], mask=gmask[:, None], other=0.0)
        m_new = tl.maximum(m_i, m_s)
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(m_s - m_new)
        l_i = l_i * alpha + l_s * beta
        acc_fp = acc_fp * alpha[:, None]
        acc_rot = acc_rot * alpha[:, None] + a_s * beta[:, None]
        m_i = m_new
    inv = 1.0 / tl.where(gmask, l_i, 1.0)
    # 3. rotate the compressed tokens' value sum back once: Σ p n Πᵀ c = (Σ p n c) @ Π
    acc_rot = acc_rot * inv[:, None]
    out = acc_fp * inv[:, None]
    if UNROT:
        rot = tl.load(rot_ptr + cols[:, None] * D + cols[None, :])
        out += tl.dot(acc_rot, rot, input_precision="ieee")
    elif S > 0:  # the launcher rotates back: leave Σ p n c / l in this program's first partial slot
        tl.debug_barrier()
        tl.store(acc_ptr + (pid * S * G + g)[:, None] * D + cols[None, :], acc_rot, mask=gmask[:, None])
    tl.store(o_ptr + b * sob + (h * G + g)[:, None] * soh + cols[None, :], out.to(o_ptr.dtype.element_ty), mask=gmask[:, None])

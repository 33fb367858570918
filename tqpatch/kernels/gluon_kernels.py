"""Gluon kernels (Triton with explicit layouts; private: launched by `tqpatch.kernels`).

_tq_decode_warp_kernel   the flash-decoding split kernel for one 4-bit code group per side, one warp per program

Why a second split kernel. `_tq_decode_split_kernel` (triton_kernels.py) lets Triton pick the layouts: the decoded
centroids of every tile go through shared memory to reach the mma operand layout (a layout conversion and a barrier
per plane, ~12 instructions per code). Here every layout is written down, so that nothing moves between threads:

- one warp per program, so no barrier at all: its tokens, its online softmax, its partial sums;
- the codes are read in the channel order the mma operands need. A thread of `mma_v2` (m16n8k16) holds, of the key
  operand B [K = channels, N = tokens], the channels k = 8j + 2m + e (m = lane % 4, e = 0, 1) of token lane / 4; the
  launcher orders the rotated query's channels so that kernel channel 8j + 2m + e is stored channel 2(16m + j) + e
  (d = 128; D/8 bytes per lane in general): each lane loads 16 contiguous code bytes of its token and unpacks them in
  place. For the value operand B [K = tokens, N = channels] a lane holds channels 8c + lane / 4 of tokens 2m + e
  (+ 8); kernel column 8c + r is stored channel (D/8) r + c, so a lane loads D/16 contiguous bytes per token;
- the scores' accumulator [16, 16] is, register for register, the value product's A operand (as in FlashAttention-2);
- the next step's code bytes and norms are loaded while this step computes (prefetch in registers);
- PAIRS (`DECODE_TUNING["warp_key_pairs"]`, on by default): key bytes looked up in a 256-entry table of centroid
  pairs, one gather per byte instead of one per code.

Only 4-bit codes of one group per side (the paper-exact k4v4 presets, fp16 or 8-bit norms), head_dim 64 or 128.
The partials it writes are the split kernel's, with value columns in this kernel's order (`value_columns`), so
`_tq_decode_combine_kernel` merges and rotates them back with a row-permuted un-rotation.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .groups import key_channels, pair_table, value_columns  # noqa: F401  (the launcher's side of the layouts)

NEG = gl.constexpr(-1.0e30)  # finite "minus infinity" (as in triton_kernels.NEG)


def byte_layouts(d: int) -> tuple:
    """(key, value) layouts of the [16 tokens, d/2 bytes] code tiles of `_tq_decode_warp_kernel`:
    keys: lane 4r + m holds bytes (d/8) m .. (d/8) m + d/8 - 1 of tokens r and r + 8;
    values: lane 4r + m holds bytes (d/16) r .. (d/16) r + d/16 - 1 of tokens 2m, 2m + 1, 2m + 8, 2m + 9."""
    kb, vb, nb = d // 8, d // 16, d // 2
    keys = gl.BlockedLayout(size_per_thread=[1, kb], threads_per_warp=[8, 4], warps_per_cta=[1, 1], order=[1, 0])
    values = gl.DistributedLinearLayout(
        reg_bases=[[0, 1 << i] for i in range(vb.bit_length() - 1)] + [[1, 0], [8, 0]],
        lane_bases=[[2, 0], [4, 0], [0, vb], [0, 2 * vb], [0, 4 * vb]], warp_bases=[], block_bases=[], shape=[16, nb])
    return keys, values


@gluon.jit
def _norms(raw, range_ptr, h, Hkv, N8: gl.constexpr):
    """Stored norms -> float32 (fp16 as they are, or 8-bit log codes: 2^(low_h + (code - 1) step_h), 0 for code 0).
    The Gluon twin of triton_kernels._norms (a Gluon kernel calls Gluon functions only)."""
    if N8:
        code = raw.to(gl.float32)
        low = gl.load(range_ptr + h)
        step = gl.load(range_ptr + Hkv + h)
        return gl.where(code > 0, gl.exp2(low + (code - 1.0) * step), 0.0)
    else:
        return raw.to(gl.float32)


@gluon.jit
def _tq_decode_warp_kernel(
    qk_ptr, sqk,                          # rotated queries in key-kernel channel order [B*Hq, D] fp32
    kc_ptr, skcb, skch, skct,             # key codes [B, Hkv, *, D/2] uint8 (4-bit, natural order)
    kn_ptr, sknb, sknh, sknt,             # key norms [B, Hkv, *] fp16, or uint8 log codes (KN8)
    kcent_ptr,                            # key centroids [16] fp16, or (PAIRS) [256] int32: byte v -> fp16 pair (c[v & 15], c[v >> 4])
    vc_ptr, svcb, svch, svct,             # value codes and norms, the same
    vn_ptr, svnb, svnh, svnt,
    vcent_ptr,
    krange_ptr, vrange_ptr,               # KN8/VN8: [2, Hkv] fp32 (low, step)
    mask_ptr, smb, mask_off,              # valid flags uint8 [B, *]: compressed token j -> column mask_off + j
    m_ptr, l_ptr, acc_ptr,                # partials [B*Hkv, S, G], [B*Hkv, S, G], [B*Hkv, S, G, D] fp32 (value columns in kernel order)
    Hkv, L, per_split, scale_log2,
    G: gl.constexpr, D: gl.constexpr, HAS_MASK: gl.constexpr, KN8: gl.constexpr, VN8: gl.constexpr, PAIRS: gl.constexpr,
    kbytes: gl.constexpr, vbytes: gl.constexpr,  # the code-byte tiles' layouts (`byte_layouts`)
):
    GP: gl.constexpr = 16  # query rows of an mma tile (G real ones)
    BT: gl.constexpr = 16  # tokens per step: the scores' N and the values' K
    NB: gl.constexpr = D // 2  # code bytes per token
    KB: gl.constexpr = D // 8  # key bytes per lane and token
    VB: gl.constexpr = D // 16  # value bytes per lane and token
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    op_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    op_b: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    rows: gl.constexpr = gl.SliceLayout(1, mma)  # per query row
    toks: gl.constexpr = gl.SliceLayout(0, mma)  # per token of a score tile

    pid_bh = gl.program_id(0)
    pid_s = gl.program_id(1)
    n_split = gl.num_programs(1)
    b = (pid_bh // Hkv).to(gl.int64)
    h = (pid_bh % Hkv).to(gl.int64)
    # queries: A operand [GP, D], rows past G read 0
    qg = gl.arange(0, GP, layout=gl.SliceLayout(1, op_a))
    qc = gl.arange(0, D, layout=gl.SliceLayout(0, op_a))
    qrow = (b * Hkv * G + h * G + qg) * sqk
    q = gl.load(qk_ptr + qrow[:, None] + qc[None, :], mask=(qg < G)[:, None], other=0.0).to(gl.float16)

    kt = gl.arange(0, BT, layout=gl.SliceLayout(1, kbytes))
    kcol = gl.arange(0, NB, layout=gl.SliceLayout(0, kbytes))
    vt = gl.arange(0, BT, layout=gl.SliceLayout(1, vbytes))
    vcol = gl.arange(0, NB, layout=gl.SliceLayout(0, vbytes))
    tt = gl.arange(0, BT, layout=toks)
    kbase = kc_ptr + b * skcb + h * skch
    vbase = vc_ptr + b * svcb + h * svch
    m_i = gl.full([GP], NEG, gl.float32, layout=rows)
    l_i = gl.zeros([GP], gl.float32, layout=rows)
    acc = gl.zeros([GP, D], gl.float32, layout=mma)
    start = pid_s * per_split
    end = gl.minimum(L, start + per_split)
    # the code bytes and norms of a step are loaded one step ahead (registers), so HBM latency overlaps the step before
    kb_next = gl.load(kbase + ((start + kt).to(gl.int64) * skct)[:, None] + kcol[None, :], mask=((start + kt) < end)[:, None], other=0)
    vb_next = gl.load(vbase + ((start + vt).to(gl.int64) * svct)[:, None] + vcol[None, :], mask=((start + vt) < end)[:, None], other=0)
    kn_next = gl.load(kn_ptr + b * sknb + h * sknh + (start + tt).to(gl.int64) * sknt, mask=(start + tt) < end, other=0)
    vn_next = gl.load(vn_ptr + b * svnb + h * svnh + (start + tt).to(gl.int64) * svnt, mask=(start + tt) < end, other=0)
    for t0 in range(start, end, BT):
        kb = kb_next.to(gl.int32)
        vb = vb_next.to(gl.int32)
        kn_raw = kn_next
        vn_raw = vn_next
        t1 = t0 + BT
        kb_next = gl.load(kbase + ((t1 + kt).to(gl.int64) * skct)[:, None] + kcol[None, :], mask=((t1 + kt) < end)[:, None], other=0)
        vb_next = gl.load(vbase + ((t1 + vt).to(gl.int64) * svct)[:, None] + vcol[None, :], mask=((t1 + vt) < end)[:, None], other=0)
        kn_next = gl.load(kn_ptr + b * sknb + h * sknh + (t1 + tt).to(gl.int64) * sknt, mask=(t1 + tt) < end, other=0)
        vn_next = gl.load(vn_ptr + b * svnb + h * svnh + (t1 + tt).to(gl.int64) * svnt, mask=(t1 + tt) < end, other=0)
        # keys: bytes -> centroids of both nibbles -> operand B [D, BT] in kernel channel order
        if PAIRS:  # one gather per byte: both centroids as one 32-bit word
            pair = gl.load(kcent_ptr + kb)
            klo = (pair & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True)
            khi = (pair >> 16).to(gl.int16).to(gl.float16, bitcast=True)
        else:
            klo = gl.load(kcent_ptr + (kb & 15))
            khi = gl.load(kcent_ptr + (kb >> 4))
        kv = gl.join(klo, khi)  # [BT, NB, 2]: (token, byte 16m + j, e)
        kv = gl.reshape(kv, [BT, 4, KB, 2])  # (n, m, j, e)
        kv = gl.permute(kv, [2, 1, 3, 0])  # (j, m, e, n)
        kv = gl.convert_layout(gl.reshape(kv, [D, BT]), op_b, assert_trivial=True)
        s = mma_v2(q, kv, gl.zeros([GP, BT], gl.float32, layout=mma))
        offs = t0 + tt
        tmask = offs < end
        kn = _norms(kn_raw, krange_ptr, h, Hkv, KN8)
        s = s * (kn * scale_log2)[None, :]
        valid = tmask
        if HAS_MASK:
            valid = valid & (gl.load(mask_ptr + b * smb + mask_off + offs, mask=tmask, other=0) != 0)
        s = gl.where(valid[None, :], s, NEG)
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.where(valid[None, :], gl.exp2(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        vn = _norms(vn_raw, vrange_ptr, h, Hkv, VN8)
        pv = gl.convert_layout((p * vn[None, :]).to(gl.float16), op_a, assert_trivial=True)  # scores' C = values' A
        # values: bytes -> centroids -> operand B [BT, D] in kernel column order 8c + r
        vlo = gl.load(vcent_ptr + (vb & 15))
        vhi = gl.load(vcent_ptr + (vb >> 4))
        vv = gl.join(vlo, vhi)  # [BT, NB, 2]: (token, byte VB·r + i, e), stored channel (D/8) r + 2i + e
        vv = gl.reshape(vv, [BT, 8, VB * 2])  # (t, r, c)
        vv = gl.permute(vv, [0, 2, 1])  # (t, c, r)
        vv = gl.convert_layout(gl.reshape(vv, [BT, D]), op_b, assert_trivial=True)
        acc = mma_v2(pv, vv, acc * alpha[:, None])
    out = pid_bh * n_split + pid_s
    g = gl.arange(0, GP, layout=rows)
    gmask = g < G
    gl.store(m_ptr + out * G + g, m_i, mask=gmask)
    gl.store(l_ptr + out * G + g, l_i, mask=gmask)
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, mma))
    gl.store(acc_ptr + ((out * G + g) * D)[:, None] + cols[None, :], acc, mask=gmask[:, None])

"""Gluon kernels (Triton with explicit layouts; private: launched by `tqpatch.kernels`).

_tq_decode_warp_kernel   the flash-decoding split kernel for one 4-bit code group per side, one warp per program
_tq_decode_lut_kernel    the same (at most 8 query heads per KV head) with centroids decoded in registers by byte
                         permutes (PTX from `groups.lut_asm`) and the value product transposed: the default for k4v4;
                         KI8: the key product on int8 operands (`groups.lut_asm_i8`: 7-bit centroids, int8 queries)

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

from .groups import I8_OFFSET as _I8_OFFSET, KEY_LUT_ASM as _KEY_LUT_ASM, KEY_LUT_ASM_I8 as _KEY_LUT_ASM_I8
from .groups import KEY_LUT_ASM_SYMMETRIC as _KEY_LUT_ASM_SYMMETRIC
from .groups import VALUE_LUT_ASM as _VALUE_LUT_ASM, VALUE_LUT_ASM_SYMMETRIC as _VALUE_LUT_ASM_SYMMETRIC
from .groups import FP16_MAGIC as _FP16_MAGIC, VALUE_LUT_ASM_I8 as _VALUE_LUT_ASM_I8
from .groups import key_channels, pair_table, value_columns  # noqa: F401  (the launcher's side of the layouts)

NEG = gl.constexpr(-1.0e30)  # finite "minus infinity" (as in triton_kernels.NEG)


def code_layouts(d: int, unit: int = 1, tokens: int = 16) -> tuple:
    """(key, value) layouts of the [tokens, d/(2·unit)] code tiles of the warp kernels, `unit` bytes an element
    (1: bytes, `_tq_decode_warp_kernel`; 4: int32 words, `_tq_decode_lut_kernel`), tokens 16 or 32 per step:
    keys: lane 4r + m holds elements (d/(8·unit)) m .. of tokens r + 8k; values: lane 4r + m holds elements
    (d/(16·unit)) r .. of tokens 2m, 2m + 1 (+ 8k)."""
    kb, vb, nb = d // (8 * unit), d // (16 * unit), d // (2 * unit)
    keys = gl.BlockedLayout(size_per_thread=[1, kb], threads_per_warp=[8, 4], warps_per_cta=[1, 1], order=[1, 0])
    values = gl.DistributedLinearLayout(
        reg_bases=[[0, 1 << i] for i in range(vb.bit_length() - 1)] + [[1, 0]] + [[8 << i, 0] for i in range(tokens.bit_length() - 4)],
        lane_bases=[[2, 0], [4, 0], [0, vb], [0, 2 * vb], [0, 4 * vb]], warp_bases=[], block_bases=[], shape=[tokens, nb])
    return keys, values


def byte_layouts(d: int) -> tuple:
    """The gather kernel's [16 tokens, d/2 bytes] code tiles (`code_layouts`)."""
    return code_layouts(d, 1, 16)


def word_layouts(d: int, tokens: int = 16) -> tuple:
    """The LUT kernel's [tokens, d/8 words] code tiles (`code_layouts`)."""
    return code_layouts(d, 4, tokens)


# One warp's mma.sync m16n8k16 tile and its operand layouts: what both decode kernels compute in.
MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]))
OP_A = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2))
OP_B = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2))
OP_A8 = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=4))  # int8 operands: mma m16n8k32
OP_B8 = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=4))


@gluon.jit
def _split_program(Hkv):
    """This program's place in the (B·Hkv, splits) grid: (pid_bh, batch b, KV head h (int64), split, number of splits)."""
    pid_bh = gl.program_id(0)
    return pid_bh, (pid_bh // Hkv).to(gl.int64), (pid_bh % Hkv).to(gl.int64), gl.program_id(1), gl.num_programs(1)


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
def _step_loads(kbase, skct, kt, kcol, vbase, svct, vt, vcol, knbase, sknt, vnbase, svnt, tt, t, end):
    """The code tiles (key and value layouts of kt/kcol, vt/vcol) and norms of the tokens t .. t + BT - 1, those at
    or past `end` read as token end - 1 (no masks, no zero fills: the caller drops them from the softmax; start < end).
    Offsets within one (batch, head) are int32 (the bases are int64): a head's codes stay below 2^31 elements."""
    last = end - 1
    kb = gl.load(kbase + (gl.minimum(t + kt, last) * gl.to_tensor(skct).to(gl.int32))[:, None] + kcol[None, :])
    vb = gl.load(vbase + (gl.minimum(t + vt, last) * gl.to_tensor(svct).to(gl.int32))[:, None] + vcol[None, :])
    kn = gl.load(knbase + gl.minimum(t + tt, last) * gl.to_tensor(sknt).to(gl.int32))
    vn = gl.load(vnbase + gl.minimum(t + tt, last) * gl.to_tensor(svnt).to(gl.int32))
    return kb, vb, kn, vn


@gluon.jit
def _bias_tile(brow, qcol, tt, t, end, G: gl.constexpr):
    """The dense score bias of tokens t .. t + BT - 1 (tt: offsets in the score tile's token layout) for the query
    columns qcol whose rows start at brow [8]: [BT, 8] fp32, 0 at or past `end` and in padding columns."""
    return gl.load(brow[None, :] + (t + tt)[:, None], mask=((t + tt) < end)[:, None] & (qcol < G)[None, :], other=0.0)


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
    GP: gl.constexpr = 16  # query rows of an MMA tile (G real ones)
    BT: gl.constexpr = 16  # tokens per step: the scores' N and the values' K
    NB: gl.constexpr = D // 2  # code bytes per token
    KB: gl.constexpr = D // 8  # key bytes per lane and token
    VB: gl.constexpr = D // 16  # value bytes per lane and token
    rows: gl.constexpr = gl.SliceLayout(1, MMA)  # per query row
    toks: gl.constexpr = gl.SliceLayout(0, MMA)  # per token of a score tile

    pid_bh, b, h, pid_s, n_split = _split_program(Hkv)
    # queries: A operand [GP, D], rows past G read 0
    qg = gl.arange(0, GP, layout=gl.SliceLayout(1, OP_A))
    qc = gl.arange(0, D, layout=gl.SliceLayout(0, OP_A))
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
    acc = gl.zeros([GP, D], gl.float32, layout=MMA)
    start = pid_s * per_split
    end = gl.minimum(L, start + per_split)
    # the code bytes and norms of a step are loaded one step ahead (registers), so HBM latency overlaps the step before
    knbase = kn_ptr + b * sknb + h * sknh
    vnbase = vn_ptr + b * svnb + h * svnh
    kb_next, vb_next, kn_next, vn_next = _step_loads(kbase, skct, kt, kcol, vbase, svct, vt, vcol, knbase, sknt, vnbase, svnt, tt, start, end)
    for t0 in range(start, end, BT):
        kb = kb_next.to(gl.int32)
        vb = vb_next.to(gl.int32)
        kn_raw = kn_next
        vn_raw = vn_next
        t1 = t0 + BT
        kb_next, vb_next, kn_next, vn_next = _step_loads(kbase, skct, kt, kcol, vbase, svct, vt, vcol, knbase, sknt, vnbase, svnt, tt, t1, end)
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
        kv = gl.convert_layout(gl.reshape(kv, [D, BT]), OP_B, assert_trivial=True)
        s = mma_v2(q, kv, gl.zeros([GP, BT], gl.float32, layout=MMA))
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
        pv = gl.convert_layout((p * vn[None, :]).to(gl.float16), OP_A, assert_trivial=True)  # scores' C = values' A
        # values: bytes -> centroids -> operand B [BT, D] in kernel column order 8c + r
        vlo = gl.load(vcent_ptr + (vb & 15))
        vhi = gl.load(vcent_ptr + (vb >> 4))
        vv = gl.join(vlo, vhi)  # [BT, NB, 2]: (token, byte VB·r + i, e), stored channel (D/8) r + 2i + e
        vv = gl.reshape(vv, [BT, 8, VB * 2])  # (t, r, c)
        vv = gl.permute(vv, [0, 2, 1])  # (t, c, r)
        vv = gl.convert_layout(gl.reshape(vv, [BT, D]), OP_B, assert_trivial=True)
        acc = mma_v2(pv, vv, acc * alpha[:, None])
    out = pid_bh * n_split + pid_s
    g = gl.arange(0, GP, layout=rows)
    gmask = g < G
    gl.store(m_ptr + out * G + g, m_i, mask=gmask)
    gl.store(l_ptr + out * G + g, l_i, mask=gmask)
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, MMA))
    gl.store(acc_ptr + ((out * G + g) * D)[:, None] + cols[None, :], acc, mask=gmask[:, None])


# -- the register-table kernel: codes decoded by byte permutes (PRMT) from a centroid table held in registers ------------
KEY_LUT_ASM = gl.constexpr(_KEY_LUT_ASM)  # groups.lut_asm: one code word -> 4 fp16 pairs; tables $5..$12
KEY_LUT_ASM_SYMMETRIC = gl.constexpr(_KEY_LUT_ASM_SYMMETRIC)  # the same for a symmetric codebook (fewer instructions)
KEY_LUT_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 4 + ["r"] * 9))
VALUE_LUT_ASM = gl.constexpr(_VALUE_LUT_ASM)  # the same word of two tokens -> 8 (token, token + 1) pairs; tables $10..$17
VALUE_LUT_ASM_SYMMETRIC = gl.constexpr(_VALUE_LUT_ASM_SYMMETRIC)
VALUE_LUT_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 8 + ["r"] * 10))
KEY_LUT_ASM_I8 = gl.constexpr(_KEY_LUT_ASM_I8)  # groups.lut_asm_i8: one code word -> 2 registers of 4 int8 bytes; tables $3..$6
KEY_LUT_I8_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 2 + ["r"] * 5))
I8_OFFSET = gl.constexpr(_I8_OFFSET)
VALUE_LUT_ASM_I8 = gl.constexpr(_VALUE_LUT_ASM_I8)  # groups.value_lut_asm_i8: two tokens' words -> 8 fp16 pairs 1024 + u; tables $10..$13
VALUE_LUT_I8_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 8 + ["r"] * 6))
FP16_MAGIC = gl.constexpr(_FP16_MAGIC)


@gluon.jit
def _bytes4(b0, b1, b2, b3):
    """Four int32 tensors [X, Y] (bytes 0..3 of each word) -> [X, 4Y] in byte order."""
    x = gl.join(gl.join(b0, b1), gl.join(b2, b3))  # [X, Y, 2 (i), 2 (j)]: byte 2j + i
    return gl.reshape(gl.permute(x, [0, 1, 3, 2]), [x.shape[0], 4 * x.shape[1]])


@gluon.jit
def _table_word(ptr):
    """Word j of a centroid table replicated per lane ([32, 8] int32, `lut_table`): lane l reads row l. The values
    are the same in every lane, but ptxas cannot know, so it keeps them in ordinary registers; a warp-uniform load
    lands in uniform registers, which PRMT cannot read, and every use would copy it back."""
    return gl.inline_asm_elementwise(
        "{\n.reg .b32 %l;\n.reg .b64 %a;\nmov.u32 %l, %laneid;\nmul.wide.u32 %a, %l, 32;\nadd.s64 %a, %a, $1;\n"
        "ld.global.nc.b32 $0, [%a];\n}", "=r,l", [ptr], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _lut_keys(words, t0, t1, t2, t3, t4, t5, t6, t7, SYM: gl.constexpr):
    """Code words [X, Y] int32 -> int32 [X, 4Y]: byte v -> the fp16 pair (c[v & 15], c[v >> 4]) of the centroid
    table t0..t7 (`lut_table`'s 8 words, loaded once per program; SYM: a symmetric codebook)."""
    p0, p1, p2, p3 = gl.inline_asm_elementwise(
        KEY_LUT_ASM_SYMMETRIC if SYM else KEY_LUT_ASM, KEY_LUT_CONSTRAINTS, [words, t0, t1, t2, t3, t4, t5, t6, t7],
        dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)
    return _bytes4(p0, p1, p2, p3)


@gluon.jit
def _int8_bytes(r):
    """int32 [X, Y] -> int8 [X, Y, 4]: its bytes, byte i at index i (ptxas sees the bytes repacked into the mma
    operand register they came from)."""
    b0 = (r & 0xFF).to(gl.int8)
    b1 = ((r >> 8) & 0xFF).to(gl.int8)
    b2 = ((r >> 16) & 0xFF).to(gl.int8)
    b3 = ((r >> 24) & 0xFF).to(gl.int8)
    return gl.reshape(gl.join(gl.join(b0, b2), gl.join(b1, b3)), [r.shape[0], r.shape[1], 4])  # [.., q, p] = b_{2p+q}: flat 2q + p


@gluon.jit
def _lut_keys_i8(words, t0, t1, t2, t3, D: gl.constexpr):
    """Code words [BT, D/8] int32 (lane t holds words D/32 · t ..) -> the int8 key operand [BT, D] (OP_A8): kernel
    channel 32j + 16h + 4t + i is u(code) of stored channel 8(D/32 · t + j) + 4h + i (`groups.key_channels_i8`)."""
    lo, hi = gl.inline_asm_elementwise(KEY_LUT_ASM_I8, KEY_LUT_I8_CONSTRAINTS, [words, t0, t1, t2, t3],
                                       dtype=(gl.int32, gl.int32), is_pure=True, pack=1)
    x = gl.permute(gl.join(_int8_bytes(lo), _int8_bytes(hi)), [0, 1, 3, 2])  # [BT, D/8 (w), 2 (h), 4 (i)]
    x = gl.reshape(x, [x.shape[0], 4, D // 32, 2, 4])  # (n, t, j, h, i)
    x = gl.permute(x, [0, 2, 3, 1, 4])  # (n, j, h, t, i)
    return gl.convert_layout(gl.reshape(x, [x.shape[0], D]), OP_A8, assert_trivial=True)


@gluon.jit
def _lut_values(even, odd, t0, t1, t2, t3, t4, t5, t6, t7, SYM: gl.constexpr):
    """Code words of tokens 2p and 2p + 1 [X, Y] int32 -> (low, high) int32 [X, 4Y]: byte i's low-nibble centroids
    of both tokens as an fp16 pair (token 2p in the low half), and its high-nibble ones."""
    l0, l1, l2, l3, h0, h1, h2, h3 = gl.inline_asm_elementwise(
        VALUE_LUT_ASM_SYMMETRIC if SYM else VALUE_LUT_ASM, VALUE_LUT_CONSTRAINTS, [even, odd, t0, t1, t2, t3, t4, t5, t6, t7],
        dtype=(gl.int32,) * 8, is_pure=True, pack=1)
    return _bytes4(l0, l1, l2, l3), _bytes4(h0, h1, h2, h3)


@gluon.jit
def _lut_values_i8(even, odd, t0, t1, t2, t3):
    """As `_lut_values`, from the 7-bit table (`lut_table_i8`): every half is the fp16 number 1024 + u(code)."""
    l0, l1, l2, l3, h0, h1, h2, h3 = gl.inline_asm_elementwise(
        VALUE_LUT_ASM_I8, VALUE_LUT_I8_CONSTRAINTS, [even, odd, t0, t1, t2, t3], dtype=(gl.int32,) * 8, is_pure=True, pack=1)
    return _bytes4(l0, l1, l2, l3), _bytes4(h0, h1, h2, h3)


@gluon.jit
def _fp16_halves(x):
    """int32 -> its (low, high) halves as float16 (a bit cast: no instructions once the MMA takes the register)."""
    return (x & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True), (x >> 16).to(gl.int16).to(gl.float16, bitcast=True)


@gluon.jit
def _tq_decode_lut_kernel(
    qk_ptr, sqk,                          # rotated queries in key-kernel channel order [B*Hq, D] fp32
    kc_ptr, skcb, skch, skct,             # key codes as int32 words [B, Hkv, *, D/8] (4-bit, natural order; strides in words)
    kn_ptr, sknb, sknh, sknt,             # key norms [B, Hkv, *] fp16, or uint8 log codes (KN8)
    ktab_ptr,                             # key centroid table [32, 8] int32 (`lut_table`; KI8: `lut_table_i8`)
    vc_ptr, svcb, svch, svct,             # value codes and norms, the same
    vn_ptr, svnb, svnh, svnt,
    vtab_ptr,                             # value centroid table [32, 8] int32
    krange_ptr, vrange_ptr,               # KN8/VN8: [2, Hkv] fp32 (low, step)
    mask_ptr, smb, mask_off,              # valid flags uint8 [B, *]: compressed token j -> column mask_off + j
    kbias_ptr, skb,                       # HAS_BIAS: score bias [B*Hq, L] fp32 added to ⟨q, k̃⟩ (centered keys' ⟨q, R_p μ⟩)
    nb_ptr,                               # HAS_NORM_BIAS: [B*Hq] fp32, nb n² added to ⟨q, k̃⟩ (the score variance)
    m_ptr, l_ptr, acc_ptr,                # partials [B*Hkv, S, G], [B*Hkv, S, G], [B*Hkv, S, G, D] fp32 (value columns in `value_rows` order)
    Hkv, L, per_split, scale_log2, ktab_scale, vtab_scale,  # KI8's / VI8's table scale s (u = round(s c) + 64)
    G: gl.constexpr, D: gl.constexpr, HAS_MASK: gl.constexpr, KN8: gl.constexpr, VN8: gl.constexpr,
    HAS_BIAS: gl.constexpr, HAS_NORM_BIAS: gl.constexpr,
    BIAS_AHEAD: gl.constexpr,             # HAS_BIAS: load a step's bias tile one step ahead (as the codes), else at the step's start
    KI8: gl.constexpr,                    # keys scored by int8 mmas (queries in `key_channels_i8` order): 0 no, 1 q8, 2 q8 + q8lo/128
    VI8: gl.constexpr,                    # values from the 7-bit table as fp16 1024 + u (`groups.value_lut_asm_i8`), corrected at the end
    TAU: gl.constexpr,                    # > 0: rescale only when a column's max grows by more than TAU (log2 units; p <= 2^TAU, so
                                          # the value product takes p |v| 2^-TAU: any fp16 norm fits), 0: every step
    BT: gl.constexpr,                     # tokens per step: 16 or 32 (fewer per-token softmax and rescale instructions, more registers)
    KSYM: gl.constexpr, VSYM: gl.constexpr,  # the key / value codebook is symmetric (`groups.is_symmetric`): the shorter PTX
    kwords: gl.constexpr, vwords: gl.constexpr,  # the code-word tiles' layouts (`word_layouts(D, BT)`)
):
    """The warp kernel with centroids from registers (`_lut_keys`, `_lut_values`) and both products transposed
    (G <= 8 query heads per KV head, padded to 8 columns):
        Sᵀ [BT, 8] = K [BT, D] · Qᵀ [D, 8]          accᵀ [D, 8] += Vᵀ [D, BT] · Pᵀ [BT, 8]
    so no MMA carries padding rows (half the score mmas of S = Q Kᵀ at M = 16), the accumulator is [D, 8] (the
    rescale by α takes D/4 multiplies per lane), and the softmax statistics are per column, where accᵀ needs them.
    Pᵀ goes from the C fragment (token lane / 4) to the B fragment (query lane / 4) by warp shuffles. The key A
    fragment holds what a key B fragment Kᵀ [D, BT] would: tokens lane / 4 (+ 8), channels 2t + e (+ 8) (`key_channels`).
    A lane's value A fragment holds kernel rows ρ = 16i + 8h + g (g = lane / 4) of tokens 2t, 2t + 1 (+ 8); kernel row ρ is stored
    channel (D/8) g + 2i + h (`value_rows`), so a lane reads D/16 contiguous bytes per token. (Gathering either side
    from the 256-entry pair table in memory instead was measured slower: bench/RESULTS.md, runs 39-40.)"""
    NB: gl.constexpr = D // 2
    KB: gl.constexpr = D // 8
    VB: gl.constexpr = D // 16
    toks: gl.constexpr = gl.SliceLayout(1, MMA)  # per token (row) of the transposed score tile Sᵀ [BT, 8]
    cols: gl.constexpr = gl.SliceLayout(0, MMA)  # per query column of Sᵀ and of accᵀ

    pid_bh, b, h, pid_s, n_split = _split_program(Hkv)
    if KI8 > 0:  # Qᵀ [D, 8] rounded per column: q8 = round(127 q / max|q|); scores w (q8 · u − 64 Σ q8), w = max|q| / (127 s)
        qc = gl.arange(0, D, layout=gl.SliceLayout(1, MMA))
        qg = gl.arange(0, 8, layout=cols)
        qrow = (b * Hkv * G + h * G + qg) * sqk
        qf = gl.load(qk_ptr + qrow[None, :] + qc[:, None], mask=(qg < G)[None, :], other=0.0)
        qmax = gl.maximum(gl.max(gl.abs(qf), axis=0), 1e-30)
        qx = qf * (127.0 / qmax)[None, :]
        q8 = gl.floor(qx + 0.5)
        kw = qmax / (127.0 * ktab_scale)
        qsum = gl.sum(q8, axis=0)
        q = gl.convert_layout(q8.to(gl.int8), OP_B8)  # once per program (through shared memory)
        if KI8 == 2:  # and the rounding's remainder in 1/128 steps (|.| <= 64): q ≈ q8 + q8lo / 128, a second mma
            q8lo = gl.floor((qx - q8) * 128.0 + 0.5)
            qsum = qsum + gl.sum(q8lo, axis=0) / 128.0
            qlo = gl.convert_layout(q8lo.to(gl.int8), OP_B8)
        kcorr = I8_OFFSET * qsum * kw
    else:
        qc = gl.arange(0, D, layout=gl.SliceLayout(1, OP_B))
        qg = gl.arange(0, 8, layout=gl.SliceLayout(0, OP_B))
        qrow = (b * Hkv * G + h * G + qg) * sqk
        q = gl.load(qk_ptr + qrow[None, :] + qc[:, None], mask=(qg < G)[None, :], other=0.0).to(gl.float16)  # Qᵀ [D, 8]

    kt = gl.arange(0, BT, layout=gl.SliceLayout(1, kwords))
    kcol = gl.arange(0, NB // 4, layout=gl.SliceLayout(0, kwords))
    vt = gl.arange(0, BT, layout=gl.SliceLayout(1, vwords))
    vcol = gl.arange(0, NB // 4, layout=gl.SliceLayout(0, vwords))
    tt = gl.arange(0, BT, layout=toks)
    kbase = kc_ptr + b * skcb + h * skch
    vbase = vc_ptr + b * svcb + h * svch
    m_i = gl.full([8], NEG, gl.float32, layout=cols)
    l_i = gl.zeros([8], gl.float32, layout=cols)
    acc = gl.zeros([D, 8], gl.float32, layout=MMA)  # accᵀ
    start = pid_s * per_split
    end = gl.minimum(L, start + per_split)
    k0, k1, k2, k3 = _table_word(ktab_ptr), _table_word(ktab_ptr + 1), _table_word(ktab_ptr + 2), _table_word(ktab_ptr + 3)
    if KI8 == 0:  # the int8 table has 4 words
        k4, k5, k6, k7 = _table_word(ktab_ptr + 4), _table_word(ktab_ptr + 5), _table_word(ktab_ptr + 6), _table_word(ktab_ptr + 7)
    v0, v1, v2, v3 = _table_word(vtab_ptr), _table_word(vtab_ptr + 1), _table_word(vtab_ptr + 2), _table_word(vtab_ptr + 3)
    if VI8 == 0:  # the int8 table has 4 words
        v4, v5, v6, v7 = _table_word(vtab_ptr + 4), _table_word(vtab_ptr + 5), _table_word(vtab_ptr + 6), _table_word(vtab_ptr + 7)
    else:  # Σ_t P̂_t per column, for the 1024 + 64 that every int8 value half carries: one mma against ones per step
        ones = gl.full([16, BT], 1.0, gl.float16, layout=OP_A)
        psum = gl.zeros([16, 8], gl.float32, layout=MMA)  # 16 equal rows
    knbase = kn_ptr + b * sknb + h * sknh
    vnbase = vn_ptr + b * svnb + h * svnh
    qcol = gl.arange(0, 8, layout=cols)
    if HAS_BIAS:  # rows of the dense bias, one per query column
        brow = kbias_ptr + (b * Hkv * G + h * G + qcol) * skb
        if BIAS_AHEAD:
            bias_next = _bias_tile(brow, qcol, tt, start, end, G)
    if HAS_NORM_BIAS:  # in log2 units: s += nb n²
        nbc = gl.load(nb_ptr + b * Hkv * G + h * G + qcol, mask=qcol < G, other=0.0) * scale_log2
    kb_next, vb_next, kn_next, vn_next = _step_loads(kbase, skct, kt, kcol, vbase, svct, vt, vcol, knbase, sknt, vnbase, svnt, tt, start, end)
    for t0 in range(start, end, BT):
        if HAS_BIAS:
            if BIAS_AHEAD:
                bias = bias_next
                bias_next = _bias_tile(brow, qcol, tt, t0 + BT, end, G)
            else:  # issued first: its latency hides behind the key product
                bias = _bias_tile(brow, qcol, tt, t0, end, G)
        kb = kb_next
        vb = vb_next
        kn_raw = kn_next
        vn_raw = vn_next
        t1 = t0 + BT
        kb_next, vb_next, kn_next, vn_next = _step_loads(kbase, skct, kt, kcol, vbase, svct, vt, vcol, knbase, sknt, vnbase, svnt, tt, t1, end)
        # keys: code words -> int8 bytes or fp16 pairs from the register table -> operand A [BT, D] in kernel channel order
        if KI8 > 0:  # keys as 7-bit int8 (`groups.lut_asm_i8`), one int8 mma per 32 channels (two: KI8 == 2)
            ka = _lut_keys_i8(kb, k0, k1, k2, k3, D)
            s = mma_v2(ka, q, gl.zeros([BT, 8], gl.int32, layout=MMA)).to(gl.float32)
            if KI8 == 2:
                s = s + mma_v2(ka, qlo, gl.zeros([BT, 8], gl.int32, layout=MMA)).to(gl.float32) * (1.0 / 128.0)
            s = s * kw[None, :] - kcorr[None, :]
        else:
            klo, khi = _fp16_halves(_lut_keys(kb, k0, k1, k2, k3, k4, k5, k6, k7, KSYM))
            kv = gl.join(klo, khi)  # [BT, NB, 2]: (token, byte 16m + j, e)
            kv = gl.reshape(kv, [BT, 4, KB, 2])  # (n, m, j, e)
            kv = gl.permute(kv, [0, 2, 1, 3])  # (n, j, m, e)
            kv = gl.convert_layout(gl.reshape(kv, [BT, D]), OP_A, assert_trivial=True)
            s = mma_v2(kv, q, gl.zeros([BT, 8], gl.float32, layout=MMA))  # Sᵀ [BT, 8]
        offs = t0 + tt
        tmask = offs < end
        kn = _norms(kn_raw, krange_ptr, h, Hkv, KN8)
        valid = tmask
        if HAS_MASK:
            valid = valid & (gl.load(mask_ptr + b * smb + mask_off + offs, mask=tmask, other=0) != 0)
        # masked tokens (and the step's clamped reads past `end`) get 2 NEG added: one FFMA with the norm instead of two
        # selects per score; the running max starts at NEG, so their weights exp2(s - m) <= exp2(NEG) are 0 even before a valid token
        s = s * (kn * scale_log2)[:, None] + gl.where(valid, 0.0, 2.0 * NEG)[:, None]
        if HAS_NORM_BIAS:
            s = s + (kn * kn)[:, None] * nbc[None, :]
        if HAS_BIAS:
            s = s + bias * scale_log2
        m_new = gl.maximum(m_i, gl.max(s, axis=0))
        if TAU > 0:  # lazy rescaling: keep a stale max while no column's max grew by more than TAU (p <= 2^TAU)
            if gl.max(m_new - m_i, axis=0) > TAU:
                alpha = gl.exp2(m_i - m_new)
                l_i = l_i * alpha
                acc = acc * alpha[None, :]
                if VI8 > 0:
                    psum = psum * alpha[None, :]
                m_i = m_new
            p = gl.exp2(s - m_i[None, :])
        else:
            alpha = gl.exp2(m_i - m_new)  # per query column: the layout of accᵀ's columns
            p = gl.exp2(s - m_new[None, :])
            l_i = l_i * alpha
            m_i = m_new
            acc = acc * alpha[None, :]
            if VI8 > 0:
                psum = psum * alpha[None, :]
        l_i = l_i + gl.sum(p, axis=0)
        vn = _norms(vn_raw, vrange_ptr, h, Hkv, VN8)
        if TAU > 0:  # p <= 2^TAU: p |v| 2^-TAU stays within fp16 for every norm fp16 can store; undone at the end
            vn = vn * (1.0 / (1 << TAU))
        # Pᵀ [BT, 8] as the value product's B operand: a C fragment holds token lane / 4, a B fragment query lane / 4
        pv_t = gl.convert_layout((p * vn[:, None]).to(gl.float16), OP_B)
        # values: bytes of token pairs -> fp16 pairs (token 2p, 2p + 1) -> operand A [D, BT] in kernel row order
        v_even, v_odd = gl.split(gl.permute(gl.reshape(vb, [BT // 2, 2, NB // 4]), [0, 2, 1]))  # [BT/2, NB/4] words each
        if VI8 > 0:
            vlo, vhi = _lut_values_i8(v_even, v_odd, v0, v1, v2, v3)
            psum = mma_v2(ones, pv_t, psum)
        else:
            vlo, vhi = _lut_values(v_even, v_odd, v0, v1, v2, v3, v4, v5, v6, v7, VSYM)  # (p, byte VB·g + i): channel 2i (lo) / 2i + 1 (hi) of byte group g
        lo0, lo1 = _fp16_halves(vlo)
        hi0, hi1 = _fp16_halves(vhi)
        vv = gl.join(gl.join(lo0, lo1), gl.join(hi0, hi1))  # [BT/2, NB, 2 (s), 2 (h)]
        vv = gl.reshape(vv, [BT // 2, 8, VB, 2, 2])  # (p, g, i, s, h)
        vv = gl.permute(vv, [2, 4, 1, 0, 3])  # (i, h, g, p, s): row 16i + 8h + g, token 2p + s
        vv = gl.convert_layout(gl.reshape(vv, [D, BT]), OP_A, assert_trivial=True)
        acc = mma_v2(vv, pv_t, acc)
    if VI8 > 0:  # accᵀ holds Σ P̂ (1024 + u) = Σ P̂ (u − 64) + 1088 Σ P̂; the centroid is (u − 64) / s
        acc = (acc - (FP16_MAGIC + I8_OFFSET) * gl.max(psum, axis=0)[None, :]) * (1.0 / vtab_scale)
    if TAU > 0:
        acc = acc * (1 << TAU)
    out = pid_bh * n_split + pid_s
    g = gl.arange(0, 8, layout=cols)
    gmask = g < G
    gl.store(m_ptr + out * G + g, m_i, mask=gmask)
    gl.store(l_ptr + out * G + g, l_i, mask=gmask)
    rho = gl.arange(0, D, layout=gl.SliceLayout(1, MMA))
    col = gl.arange(0, 8, layout=cols)
    gl.store(acc_ptr + ((out * G + col) * D)[None, :] + rho[:, None], acc, mask=(col < G)[None, :])

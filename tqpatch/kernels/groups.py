"""How the kernels see a codec: one or two code groups per vector.

A `TurboQuantCodec` stores each vector [d] as one group: the codes of all d
channels under one rotation Π [d, d], one norm. A `SplitCodec` stores two (one
when its low group is dropped): per KV head a channel subset index_g [H, w_g],
each with its own TurboQuant_mse quantizer (bits, rotation Π_g [w_g, w_g],
codebook) and its own norm n_g. With x_g = x[index_g]:

    ⟨q, x̃⟩ = Σ_g n_g ⟨Π_g q_g, c_g⟩            x̃[index_g] = n_g Π_gᵀ c_g

so the decode kernel scores each group against its rotated query slice and
sums its values in the same rotated space, whatever channels it came from.
Two matrices per head carry the bookkeeping (made once per codec and device):

    Q [H, d, QW]  rotated queries  qr = q @ Q: group g in columns offset_g ..
                  offset_g + W_g (plane order within a group read as planes,
                  zero columns where W_g pads w_g to a power of two)
    U [H, AW, d]  value output    x = (value sums) @ U, i.e. U = Qᵀ

The store kernel writes group g as a TurboQuantCodec of width w_g would,
from x gathered to x_g (`CodeGroup` quacks like that codec).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from ..codec import SplitCodec, TurboQuantCodec
from ..norms import LogNormQuantizer
from ..quantizer import TurboQuantMSE, TurboQuantProd

KERNEL_BITS = (1, 2, 3, 4, 5, 6, 7, 8)  # mse bits the kernels read per code group (the fused register-table kernel: 4)
CENTROID_SLOTS = 16  # entries of a 4-bit centroid table: what the register-table (LUT) kernels read


@dataclass(eq=False)
class CodeGroup:
    """One group of a vector's codes: its quantizer, its 8-bit norm codes (or None: float16 norms), its
    channels index [H, w] (None: all channels, natural order) and the names of its parts."""

    quantizer: TurboQuantMSE | TurboQuantProd
    norm_codes: LogNormQuantizer | None
    index: torch.Tensor | None
    codes: str = "codes"
    norms: str = "norms"

    @property
    def head_dim(self) -> int:  # the width w of the group: what the store kernel calls D
        return self.quantizer.head_dim

    @property
    def mse(self) -> TurboQuantMSE | None:
        """The TurboQuant_mse quantizer whose codes the kernels read."""
        q = self.quantizer
        return q.mse if isinstance(q, TurboQuantProd) else q

    @property
    def state_bits(self) -> int:
        """S of the group's trellis codes (`tqpatch.trellis`), or 0 for Lloyd-Max codes."""
        return 0 if self.mse.trellis is None else self.mse.trellis.state_bits

    @property
    def code_bytes(self) -> int:
        return self.mse.code_nbytes  # ceil(w b / 8): the stream's last byte may hold padding bits

    def prepare(self, x: torch.Tensor) -> None:
        """x_g [B, H, T, w] of the first chunk: fixes the 8-bit norms' ranges (as `TurboQuantCodec.prepare`)."""
        if self.norm_codes is not None and not self.norm_codes.calibrated:
            self.norm_codes.calibrate(torch.linalg.vector_norm(x.float(), dim=-1).half())

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, d] -> x_g [B, H, T, w] (contiguous)."""
        if self.index is None:
            return x
        b, h, t, _ = x.shape
        return torch.gather(x, -1, self.index.to(x.device, torch.int64)[None, :, None, :].expand(b, h, t, -1))


def code_groups(codec) -> list[CodeGroup] | None:
    """The kernels' view of `codec`, or None where they cannot read it: TurboQuantCodec (mse 1..8 bits, or prod
    keys with such an mse part), or a SplitCodec once calibrated whose groups have mse 1..8 bits (any widths:
    the kernel pads them). Groups of trellis codes (`tqpatch.trellis`) are read by the split decode kernel only
    (`state_bits` > 0: not the store kernel, not the warp kernels)."""
    if isinstance(codec, TurboQuantCodec):
        groups = [CodeGroup(codec.quantizer, codec.norm_codes, None)]
    elif isinstance(codec, SplitCodec) and codec.calibrated:
        norm = codec.norm_codes or {}
        groups = [CodeGroup(codec.outlier, norm.get("hi"), codec.outlier_index, "hi_codes", "hi_norms")]
        if codec.regular is not None:
            groups.append(CodeGroup(codec.regular, norm.get("lo"), codec.regular_index, "lo_codes", "lo_norms"))
    else:
        return None
    readable = all(g.mse is not None and g.mse.bits in KERNEL_BITS for g in groups)
    return groups if readable else None


def planes(width: int, bits: int, min_width: int = 16) -> int:
    """Codes per byte P if the decode kernel reads a group of this (padded) width as P planes of width/P channels,
    else 1 (codes unpacked to natural order). Planes need 2 or 4 codes per byte (1-bit would need 8 accumulators;
    3-bit codes straddle bytes) and at least `min_width` channels per plane (16 is tl.dot's smallest inner size;
    narrower planes cost registers: `kernels.DECODE_TUNING["min_plane_width"]`)."""
    p = 8 // bits if bits in (2, 4) else 1
    return p if width // p >= max(16, min_width) else 1


def padded_width(width: int) -> int:
    """A group's width in the kernel: the next power of two, at least 16 (tl.arange and tl.dot sizes)."""
    return max(16, 1 << (width - 1).bit_length())


def kernel_columns(width: int, padded: int, planes: int) -> torch.Tensor:
    """Where the decode kernel keeps rotated coordinate i < width of a group padded to `padded` and read as
    `planes` planes: plane order puts coordinate P·k + j at column j·W/P + k (natural order for P = 1)."""
    i = torch.arange(width)
    return (i % planes) * (padded // planes) + i // planes


@dataclass(eq=False)
class GroupLayout:
    """Where each group sits in the decode kernel, on one device: padded widths W_g, planes P_g, the query matrix
    Q [H or 1, d, QW] (+ S for prod keys: columns W_0 .. W_0 + d), the value matrix U [H or 1, AW, d] (AW = Σ W_g,
    padded to a power of two), the centroids [groups, max(16, 2^max bits)] fp16 (a trellis group's table of
    2^(S+b) windows, as its quantizer decodes them: lut · gain / √w; the row as long as the longest) and the 8-bit
    norms' (low, step) [groups, 2, H] fp32 (None for float16 norms)."""

    widths: list[int]
    planes: list[int]
    query: torch.Tensor
    unrotate: torch.Tensor
    centroids: torch.Tensor
    norm_ranges: torch.Tensor | None

    @property
    def accumulator_width(self) -> int:
        return self.unrotate.shape[1]


_LAYOUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def layout(codec, groups: list[CodeGroup], head_dim: int, device: torch.device, min_plane_width: int = 16) -> GroupLayout:
    """The codec's GroupLayout on `device` (made once per plane rule; a refit makes a new codec and so a new layout)."""
    per_device = _LAYOUTS.setdefault(codec, {})
    key = (torch.device(device), min_plane_width)
    if key not in per_device:
        per_device[key] = _make_layout(groups, head_dim, torch.device(device), min_plane_width)
    return per_device[key]


def _make_layout(groups: list[CodeGroup], d: int, device: torch.device, min_plane_width: int) -> GroupLayout:
    widths = [padded_width(g.head_dim) for g in groups]
    plane_counts = [1 if g.state_bits else planes(w, g.mse.bits, min_plane_width) for w, g in zip(widths, groups)]
    total = sum(widths)
    heads = 1 if all(g.index is None for g in groups) else groups[0].index.shape[0]
    aw = padded_width(total)
    prod = isinstance(groups[0].quantizer, TurboQuantProd)
    query = torch.zeros(heads, d, total + (d if prod else 0), dtype=torch.float32)
    offset = 0
    for g, width, p in zip(groups, widths, plane_counts):
        rot = g.mse.rotation("cpu").float()  # Π_g [w, w]: rotated coordinate i = Σ_j Π_g[i, j] x_g[j]
        w = g.head_dim
        column = offset + kernel_columns(w, width, p)
        index = torch.arange(d).expand(heads, d) if g.index is None else g.index.long()
        for h in range(heads):
            query[h, index[h][:, None], column[None, :]] = rot.T  # Q[h][index_g[j], col(i)] = Π_g[i, j]
        offset += width
    if prod:
        query[:, :, total:] = groups[0].quantizer.qjl("cpu").float().T  # S q
    unrotate = torch.zeros(heads, aw, d, dtype=torch.float32)
    unrotate[:, :total] = query[:, :, :total].transpose(1, 2)
    tables = [_decode_table(g) for g in groups]
    centroids = torch.zeros(len(groups), max(CENTROID_SLOTS, *(t.numel() for t in tables)), dtype=torch.float16)
    for i, table in enumerate(tables):
        centroids[i, : table.numel()] = table.half()
    ranges = None
    if groups[0].norm_codes is not None:
        ranges = torch.stack([g.norm_codes.ranges("cpu") for g in groups]).to(device).contiguous()
    return GroupLayout(widths, plane_counts, query.to(device).contiguous(), unrotate.to(device).contiguous(), centroids.to(device), ranges)


def _decode_table(group: CodeGroup) -> torch.Tensor:
    """What a group's codes decode to on the CPU: its centroids [2^b], or for trellis codes the value of each window
    [2^(S+b)] (`TurboQuantMSE.lookup`: lut[w] · gain / √w)."""
    mse = group.mse
    if mse.trellis is None:
        return mse.centroids("cpu")
    return mse.trellis.tables(torch.device("cpu"))[0] * (mse.decode_gain / math.sqrt(mse.head_dim))


# -- the Gluon warp decode kernel's channel orders (gluon_kernels.py; pure torch, so CPU tests can check them) --
def key_channels(d: int) -> torch.Tensor:
    """Stored channel of each kernel channel k = 8j + 2m + e of the keys: 2(d/8 · m + j) + e  [d] int64."""
    k = torch.arange(d)
    j, m, e = k // 8, (k % 8) // 2, k % 2
    return 2 * (d // 8 * m + j) + e


def value_columns(d: int) -> torch.Tensor:
    """Stored channel of each kernel value column n = 8c + r: (d/8) r + c  [d] int64."""
    n = torch.arange(d)
    return d // 8 * (n % 8) + n // 8


def pair_table(centroids: torch.Tensor) -> torch.Tensor:
    """[256] int32: byte v -> the fp16 bits of centroids[v & 15] (low half) and centroids[v >> 4] (high half)."""
    bits = centroids.half().view(torch.int16).int() & 0xFFFF  # [16]
    v = torch.arange(256, device=centroids.device)
    return (bits[v & 15] | (bits[v >> 4] << 16)).int().contiguous()


# -- the register-table (PRMT) variant of the warp kernel: `_tq_decode_lut_kernel` --------------------------------------
def value_rows(d: int) -> torch.Tensor:
    """Stored channel of each kernel row ρ = 16i + 8h + g of the transposed value product accᵀ [d, 8]:
    (d/8) g + 2i + h, so lane g reads the d/16 contiguous bytes (d/16) g .. of a token  [d] int64."""
    r = torch.arange(d)
    i, h, g = r // 16, (r % 16) // 8, r % 8
    return d // 8 * g + 2 * i + h


def lut_table(centroids: torch.Tensor, lanes: int = 32) -> torch.Tensor:
    """[lanes, 8] int32, the same row for every lane: words 0..3 hold the low bytes of the fp16 centroids
    4j .. 4j + 3 (entry 4j in the lowest byte), words 4..7 their high bytes (the operands of `lut_asm`)."""
    bits = (centroids.half().view(torch.int16).to(torch.int64) & 0xFFFF).reshape(4, 4)
    shifts = torch.tensor([0, 8, 16, 24], device=centroids.device)
    words = torch.cat([((bits & 0xFF) << shifts).sum(1), ((bits >> 8) << shifts).sum(1)])
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits as int32
    return words.to(torch.int32).expand(lanes, 8).contiguous()


def lut_asm(words: list[str], outs: list[list[str]], table: int, symmetric: bool = False) -> str:
    """PTX that decodes the 8 4-bit codes of each 32-bit word in `words` into 4 fp16 pairs `outs` (one per byte:
    the low nibble's centroid in the low half) with no memory access. Table operand $table + j (j = 0..3) holds the
    low bytes of centroids 4j .. 4j + 3, $table + 4 + j their high bytes (`lut_table`). Per 4 codes: PRMT looks up
    the low bytes of entries 0..7 and of 8..15 by the codes' low 3 bits, a LOP3 picks one by bit 3 (a byte mask
    made by PRMT's sign-replicating mode), the same for the high bytes, and two PRMTs interleave them into fp16
    pairs: 21 instructions per 8 codes.

    symmetric (c[15 - i] = -c[i], as Lloyd-Max codebooks of a symmetric density are): one look-up per byte half in
    the 8 magnitudes c[8..15] (table words 2, 3, 6, 7) by |index| = c & 7 for c >= 8, 7 - (c & 7) below (bit 3 of
    each nibble, times 7/8 by one multiply-high, says where), and the sign bit flipped where bit 3 is clear: 17 per 8
    codes. (Writing the shifts as multiplies, which ptxas issues as IMADs on the FMA pipe instead of SHFs on the
    integer pipe, left the kernel's time unchanged in run 65: it is not bound by that pipe's throughput.)"""
    t = [f"${table + j}" for j in range(8)]
    lines = ["{", ".reg .b32 %w4, %s, %sh, %m0, %m1, %a, %b, %lo, %hi, %f;"]
    for word, out in zip(words, outs):
        if symmetric:  # s = the magnitude index of every nibble: c & 7 where bit 3 is set, 7 - (c & 7) = ~c & 7 where not
            lines += [f"and.b32 %f, {word}, 0x88888888;",
                      "mul.hi.u32 %f, %f, 0xE0000000;",  # f · 7/8, exact: 7 in each nibble whose bit 3 is set (an IMAD)
                      f"lop3.b32 %s, {word}, %f, 0x77777777, 0x82;"]  # ~(w ^ f) & 0x77777777
        else:
            lines += [f"and.b32 %s, {word}, 0x77777777;"]
        lines += [f"shl.b32 %w4, {word}, 4;", "shr.b32 %sh, %s, 16;",
                  f"prmt.b32 %m0, {word}, %w4, 0x9D8C;",  # byte i: 0xFF where code i (0..3) has bit 3 set
                  f"prmt.b32 %m1, {word}, %w4, 0xBFAE;"]  # the same for codes 4..7
        for sel, mask, pair in (("%s", "%m0", out[:2]), ("%sh", "%m1", out[2:])):
            if symmetric:
                lines += [f"prmt.b32 %lo, {t[2]}, {t[3]}, {sel};", f"prmt.b32 %hi, {t[6]}, {t[7]}, {sel};",
                          f"lop3.b32 %hi, %hi, {mask}, 0x80808080, 0xD2;"]  # hi ^ (~mask & 0x80): negative where bit 3 is clear
            else:
                lines += [f"prmt.b32 %a, {t[0]}, {t[1]}, {sel};", f"prmt.b32 %b, {t[2]}, {t[3]}, {sel};", f"lop3.b32 %lo, %a, %b, {mask}, 0xD8;",
                          f"prmt.b32 %a, {t[4]}, {t[5]}, {sel};", f"prmt.b32 %b, {t[6]}, {t[7]}, {sel};", f"lop3.b32 %hi, %a, %b, {mask}, 0xD8;"]
            lines += [f"prmt.b32 {pair[0]}, %lo, %hi, 0x5140;", f"prmt.b32 {pair[1]}, %lo, %hi, 0x7362;"]
    return "\n".join(lines + ["}"])


def is_symmetric(centroids: torch.Tensor) -> bool:
    """Whether a 16-entry codebook is exactly c[15 - i] = -c[i] in fp16 (the symmetric PTX of `lut_asm` reads it)."""
    h = centroids.half().flatten()
    return h.numel() == 16 and torch.equal(h, -h.flip(0))


_VALUE_PRELUDE = ("{\n.reg .b32 %x, %y, %u4, %t4;\nshl.b32 %u4, $9, 4;\nlop3.b32 %x, $8, %u4, 0x0F0F0F0F, 0xE4;\n"
                  "shr.b32 %t4, $8, 4;\nlop3.b32 %y, %t4, $9, 0x0F0F0F0F, 0xE4;\n")
# keys: one word of codes ($4) -> 4 fp16 pairs $0..$3 (one per byte); tables $5..$12
KEY_LUT_ASM = lut_asm(["$4"], [["$0", "$1", "$2", "$3"]], 5)
KEY_LUT_ASM_SYMMETRIC = lut_asm(["$4"], [["$0", "$1", "$2", "$3"]], 5, symmetric=True)
# values: the same word of tokens t ($8) and t + 1 ($9). Their nibbles are interleaved first: x byte i = (t's low
# nibble, t+1's low nibble), y byte i = (t's high nibble, t+1's high nibble), so each pair comes out as (token t,
# token t + 1) of one channel, an mma A operand whose K is tokens. $0..$3 from x (byte i's low-nibble channel),
# $4..$7 from y (its high-nibble channel); tables $10..$17.
VALUE_LUT_ASM = lut_asm(["%x", "%y"], [["$0", "$1", "$2", "$3"], ["$4", "$5", "$6", "$7"]], 10).replace("{\n", _VALUE_PRELUDE, 1)
VALUE_LUT_ASM_SYMMETRIC = lut_asm(["%x", "%y"], [["$0", "$1", "$2", "$3"], ["$4", "$5", "$6", "$7"]], 10, symmetric=True).replace(
    "{\n", _VALUE_PRELUDE, 1)


# -- int8 keys for the LUT kernel: 7-bit centroids, an integer mma (m16n8k32) for the scores ---------------------------
# The key product Sᵀ = K · Qᵀ runs on int8 operands: the query rounded per column, q8 = round(127 q / max|q|), and each
# key centroid c as the 7-bit unsigned u = round(s c) + 64 in [0, 127]. With w = max|q| / (127 s) per query column,
#     Σ_i q_i c_i ≈ w (Σ_i q8_i u_i − 64 Σ_i q8_i),
# one int32 dot product per score, corrected once per column. Why 7 bits: every table byte then has its top bit clear,
# so PRMT's sign-replicating mode (selector bit 3) reads 0 from it, and the two 8-entry half tables combine by one OR
# (`lut_asm_i8`): 9 integer instructions per 8 codes where the fp16 look-up takes 17, and one mma per 32 channels
# instead of two. The roundings cost ~1e-2 relative score error (the table's ~0.8% dominates; the CPU emulation in
# tests/test_kernel_groups.py), 1.5-2.6e-2 on the attention output (bench/RESULTS.md, run 73).
I8_OFFSET = 64  # u = round(s c) + I8_OFFSET


def key_channels_i8(d: int) -> torch.Tensor:
    """Stored channel of each kernel channel k = 32j + 16h + 4t + i of the int8 key product [d] int64. An m16n8k32 A
    fragment gives lane t (= lane % 4) the channels 4t .. 4t + 3 and 16 + 4t .. 16 + 4t + 3 of each 32-channel chunk j;
    lane t loads the d/32 words d/32 · t .. of its token (`word_layouts`), word w holding stored channels 8w .. 8w + 7,
    and `lut_asm_i8` turns its low and high half (h) into those two registers."""
    k = torch.arange(d)
    j, h, t, i = k // 32, (k % 32) // 16, (k % 16) // 4, k % 4
    return 8 * (d // 32 * t + j) + 4 * h + i


def int8_centroid_scale(centroids: torch.Tensor, candidates: int = 512) -> float:
    """The scale s of the 7-bit key table u = round(s c) + 64: among s ≤ 63 / max|c| (|round(s c)| ≤ 63), the one
    whose rounded table round(s c) / s is closest to c in squared error."""
    c = centroids.detach().cpu().double().flatten()
    s = 63.0 / c.abs().max().item() * torch.linspace(0.5, 1.0, candidates, dtype=torch.float64)
    err = ((torch.round(c[None] * s[:, None]) / s[:, None] - c[None]) ** 2).sum(1)
    return float(s[err.argmin()])


def int8_table_values(centroids: torch.Tensor, scale: float) -> torch.Tensor:
    """The 7-bit table u = round(scale · c) + 64 of a codebook [n] -> [n] int64 on CPU (the kernel's key centroid
    c is (u - 64) / scale)."""
    return torch.round(centroids.detach().cpu().double().flatten() * scale).long() + I8_OFFSET


def lut_table_i8(centroids: torch.Tensor, scale: float, lanes: int = 32) -> torch.Tensor:
    """[lanes, 8] int32, the same row for every lane: the 16 bytes u = round(scale · c) + 64 of a 16-entry codebook,
    entry 4j + i in byte i of word j (words 0, 1: entries 0..7; words 2, 3: entries 8..15; `lut_asm_i8`'s operands),
    words 4..7 zero: rows of 32 bytes, as the kernel's per-lane table load (`_table_word`) reads `lut_table`'s."""
    u = int8_table_values(centroids, scale)
    if u.numel() != CENTROID_SLOTS or u.min() < 0 or u.max() > 127:
        raise ValueError(f"lut_table_i8: needs {CENTROID_SLOTS} centroids whose scaled values fit 7 bits, got {u.tolist()}")
    words = torch.cat([(u.reshape(4, 4) << torch.tensor([0, 8, 16, 24])).sum(1), torch.zeros(4, dtype=torch.long)])
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).to(centroids.device).expand(lanes, 8).contiguous()


def lut_asm_i8(word: str, outs: list[str], table: int) -> str:
    """PTX: the 8 4-bit codes of `word` -> two registers of 4 int8 bytes u(code): outs[0] the codes of nibbles 0..3,
    outs[1] of nibbles 4..7 (byte i = nibble i's). Table operands $table .. $table + 3 (`lut_table_i8`). A PRMT
    selector nibble with bit 3 clear picks a table byte, with bit 3 set it replicates that byte's top bit (0 here):
    so a PRMT on the low table by the code picks u(c) for c < 8 and 0 above, a PRMT on the high table by c ^ 8 picks
    u(c) for c ≥ 8 and 0 below, and their OR is u(c). PRMT reads its selector's low 16 bits: 9 instructions per word."""
    t = [f"${table + j}" for j in range(4)]
    return "\n".join([
        "{", ".reg .b32 %xs, %wh, %xh, %a, %c;",  # local names apart from `value_lut_asm_i8`'s words %x, %y
        f"xor.b32 %xs, {word}, 0x88888888;", f"shr.b32 %wh, {word}, 16;", "shr.b32 %xh, %xs, 16;",
        f"prmt.b32 %a, {t[0]}, {t[1]}, {word};", f"prmt.b32 %c, {t[2]}, {t[3]}, %xs;", f"or.b32 {outs[0]}, %a, %c;",
        f"prmt.b32 %a, {t[0]}, {t[1]}, %wh;", f"prmt.b32 %c, {t[2]}, {t[3]}, %xh;", f"or.b32 {outs[1]}, %a, %c;",
        "}"])


# keys as int8: one word of codes ($2) -> two registers of 4 bytes $0, $1; tables $3..$6
KEY_LUT_ASM_I8 = lut_asm_i8("$2", ["$0", "$1"], 3)


# -- int8 values for the LUT kernel: the same 7-bit table, read as fp16 1024 + u ------------------------------------------
# A byte u in the low half of an fp16 whose high byte is 0x64 is the number 1024 + u exactly (exponent 10: one unit per
# mantissa step). So the value product can take the 7-bit table's bytes as fp16 operands after one PRMT per pair, with
# no arithmetic: accᵀ = Σ_t p_t (1024 + u_t) = Σ_t p_t (u_t − 64) + 1088 Σ_t p_t, and the kernel subtracts 1088 Σ_t p_t
# (the same fp16 p_t, summed by one more mma against ones) and divides by s once at the end. Per 8 codes: 9 integer
# instructions for the bytes (`lut_asm_i8`), 4 PRMTs to make them fp16 pairs, against 17 for the fp16 look-up.
FP16_MAGIC = 1024  # 0x6400: the fp16 1024 + u for a byte u in its low half
FP16_MAGIC_BYTES = 0x64646464


def value_lut_asm_i8(table: int) -> str:
    """PTX: the same code word of tokens t ($8) and t + 1 ($9) -> 8 fp16 pairs (token t in the low half), each half
    1024 + u(code) of the 7-bit table (`lut_table_i8`, operands $table .. $table + 3). Outputs as `VALUE_LUT_ASM`'s:
    $0..$3 the low-nibble channel of bytes 0..3, $4..$7 the high-nibble one. The nibbles of both tokens are
    interleaved first (`_VALUE_PRELUDE`, as there), so byte i of %x holds (t, t + 1) of byte i's low-nibble channel;
    `lut_asm_i8` turns each interleaved word into 8 bytes and a PRMT puts 0x64 above each: 30 instructions per 16
    codes (38 in fp16)."""
    lines = [_VALUE_PRELUDE + ".reg .b32 %m, %b0, %b1;", f"mov.b32 %m, {FP16_MAGIC_BYTES:#x};"]
    for word, out in (("%x", ["$0", "$1", "$2", "$3"]), ("%y", ["$4", "$5", "$6", "$7"])):
        lines += [lut_asm_i8(word, ["%b0", "%b1"], table),
                  f"prmt.b32 {out[0]}, %b0, %m, 0x4140;", f"prmt.b32 {out[1]}, %b0, %m, 0x4342;",  # (byte 0, 0x64, byte 1, 0x64)
                  f"prmt.b32 {out[2]}, %b1, %m, 0x4140;", f"prmt.b32 {out[3]}, %b1, %m, 0x4342;"]
    return "\n".join(lines + ["}"])


# values as int8: the same word of tokens t ($8) and t + 1 ($9) -> 8 fp16 pairs $0..$7; tables $10..$13
VALUE_LUT_ASM_I8 = value_lut_asm_i8(10)

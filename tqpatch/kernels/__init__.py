"""Fused GPU kernels for the compressed store, behind checked launchers.

    encode(codec, x)                 store kernel: x [B, H, T, d] -> the codec's parts (codes, norms, ...)
    encode_into(codec, x, out)       the same, written into preallocated part views (the store's buffer)
    decode_attention(q, ...)         one query token against compressed + full-precision K/V

Each launcher checks its inputs, runs the Triton kernel when the tensors are
on CUDA and Triton is importable, and otherwise runs the PyTorch reference
(`tqpatch.kernels.reference`), which is also the oracle of the kernel tests.
Triton is imported lazily: CPU installs never need it.

Supported by the kernels: TurboQuantCodec (whole vectors) with mse bits 1..4
(keys and values) or prod keys with 2..5 bits (mse part 1..4 bits + QJL signs),
head_dim a power of two in 16..256, float16 or 8-bit log norms. Everything else (SplitCodec's
fractional bits, more bits) uses the reference path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref

import torch

from ..codec import Parts, TurboQuantCodec
from ..quantizer import TurboQuantMSE, TurboQuantProd
from .reference import decode_attention_reference, encode_reference

HEAD_DIMS = (16, 32, 64, 128, 256)
MSE_BITS = (1, 2, 3, 4)
LOG2E = 1.4426950408889634
# Decode-kernel launch settings (bench/RESULTS.md says how they were chosen): tokens per tile, warps,
# software-pipelining stages, centroid lookup (0 gather, 1 select chain), and the flash-decoding split
# count, chosen so that B*Hkv*splits ≈ programs_per_sm programs per SM. The best of the H200 sweep.
DECODE_TUNING = {"block_t": 32, "num_warps": 4, "num_stages": 3, "lut": 0, "programs_per_sm": 16}

__all__ = [
    "HEAD_DIMS",
    "MSE_BITS",
    "decode_attention",
    "decode_attention_reference",
    "encode",
    "encode_into",
    "encode_reference",
    "supports",
    "triton_available",
]


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Triton importable and not disabled by TQPATCH_DISABLE_TRITON=1."""
    if os.environ.get("TQPATCH_DISABLE_TRITON", "") == "1":
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _tk():
    from . import triton_kernels

    return triton_kernels


def interpreting() -> bool:
    """TRITON_INTERPRET=1: the kernels run on CPU tensors in Triton's interpreter (tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def kernel_device(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run on tensors like t."""
    return (t.is_cuda or interpreting()) and triton_available()


_use_triton = kernel_device


def _device_ctx(device: torch.device):
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _mse_part(codec) -> TurboQuantMSE | None:
    """The TurboQuant_mse quantizer whose codes the kernels read, or None if the codec is unsupported."""
    if not isinstance(codec, TurboQuantCodec) or codec.head_dim not in HEAD_DIMS:
        return None
    q = codec.quantizer
    if isinstance(q, TurboQuantProd):
        q = q.mse
    if not isinstance(q, TurboQuantMSE) or q.bits not in MSE_BITS:
        return None
    return q


def supports(codec) -> bool:
    """Whether the kernels handle this codec (else the reference path is used)."""
    return _mse_part(codec) is not None


# -- per-quantizer constants on each device (float32, contiguous) ---------------------------------------
_CONSTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _consts(codec, device: torch.device) -> dict[str, torch.Tensor]:
    per_device = _CONSTS.setdefault(codec.quantizer, {})
    if device not in per_device:
        mse = _mse_part(codec)
        rot = mse.rotation(device).contiguous()  # Π [d, d]
        c = {
            "rot": rot,
            "rotT": rot.T.contiguous(),
            "centroids": mse.centroids(device).contiguous(),
            "boundaries": mse._constants(device)[2].contiguous(),
            "qmatT": rot.T.contiguous(),  # queries: [Π q] = q @ Πᵀ
        }
        if isinstance(codec.quantizer, TurboQuantProd):
            s = codec.quantizer.qjl(device)
            c["projT"] = (rot @ s.T).contiguous()  # S Πᵀ r_rot as a row vector: r_rot @ Π Sᵀ
            c["qmatT"] = torch.cat([rot.T, s.T], dim=1).contiguous()  # [Π q | S q]
        c["cent16"] = c["centroids"].half().contiguous()
        if mse.bits == 4:  # the decode kernel's LUT=3 lookup, built once per codebook
            c["nibble_asm"] = nibble_lut_asm(c["cent16"])
        rot_hi = c["rotT"].half()  # the store kernel's fp16x3 rotation: 4096 Πᵀ = hi + lo
        c["rotT_hi"], c["rotT_lo"] = (rot_hi * 4096).contiguous(), ((c["rotT"] - rot_hi.float()) * 4096).half().contiguous()
        planes = decode_planes(codec.head_dim, mse.bits)
        if planes:  # the decode kernel's plane order: position j*d/P + k holds channel P*k + j
            d = codec.head_dim
            perm = torch.arange(d, device=device).view(d // planes, planes).T.reshape(-1)
            qmat = c["qmatT"].clone()
            qmat[:, :d] = c["qmatT"][:, :d][:, perm]
            c["qmatT_planes"] = qmat.contiguous()  # [Π q in plane order (| S q)]
            c["rot_planes"] = rot[perm].contiguous()  # value sums in plane order @ this = x
        per_device[device] = c
    return per_device[device]


def nibble_lut_asm(cent16: torch.Tensor) -> str:
    """PTX for the decode kernel's LUT=3: 4 code bytes in $4 -> the fp16 centroids of their low nibbles in $0, $1 and
    of their high nibbles in $2, $3, looked up in registers. The 16 fp16 centroids are split into low and high bytes,
    8 words of immediates; prmt picks a byte of 8 by the index's bits 0-2 (entries 0-7 and 8-15 separately), and bit
    3 chooses between the two (a byte mask from prmt's sign-replicate mode and one lop3)."""
    bits = cent16.detach().cpu().contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    lo_bytes, hi_bytes = [int(v) & 0xFF for v in bits], [int(v) >> 8 for v in bits]
    word = lambda b, k: b[4 * k] | b[4 * k + 1] << 8 | b[4 * k + 2] << 16 | b[4 * k + 3] << 24  # noqa: E731
    lines = ["{", ".reg .b32 tl0, tl1, tl2, tl3, th0, th1, th2, th3, i, t, u, sel, m, la, lb, ha, hb, lo, hi;"]
    lines += [f"mov.b32 tl{k}, {word(lo_bytes, k):#010x};" for k in range(4)]
    lines += [f"mov.b32 th{k}, {word(hi_bytes, k):#010x};" for k in range(4)]
    for first, (shift, out0, out1) in enumerate(((0, "$0", "$1"), (4, "$2", "$3"))):
        lines.append(f"shr.b32 i, $4, {shift};" if shift else "mov.b32 i, $4;")
        lines += [
            "and.b32 i, i, 0x0F0F0F0F;",  # one 4-bit index per byte
            "and.b32 t, i, 0x07070707;",
            "shr.b32 u, t, 4;",
            "or.b32 t, t, u;",
            "prmt.b32 sel, t, t, 0x0020;",  # the four 3-bit indices as prmt selector nibbles
            "shl.b32 u, i, 4;",
            "prmt.b32 m, u, u, 0xBA98;",  # 0xFF in the bytes whose index has bit 3 set
            "prmt.b32 la, tl0, tl1, sel;",
            "prmt.b32 lb, tl2, tl3, sel;",
            "lop3.b32 lo, la, lb, m, 0xD8;",  # (la & ~m) | (lb & m)
            "prmt.b32 ha, th0, th1, sel;",
            "prmt.b32 hb, th2, th3, sel;",
            "lop3.b32 hi, ha, hb, m, 0xD8;",
            f"prmt.b32 {out0}, lo, hi, 0x5140;",  # fp16 values of codes 0, 1
            f"prmt.b32 {out1}, lo, hi, 0x7362;",  # and 2, 3
        ]
    lines.append("}")
    return "\n".join(lines)


def decode_planes(head_dim: int, bits: int) -> int:
    """Codes per byte P if the decode kernel reads these codes as P planes of head_dim/P channels, else 0.

    Planes need 2 or 4 codes per byte (1-bit would need 8 accumulators; 3-bit codes straddle bytes)
    and at least 16 channels per plane (tl.dot's smallest inner size).
    """
    planes = 8 // bits if bits in (2, 4) else 0
    return planes if planes and head_dim // planes >= 16 else 0


def _check_x(codec, x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] != codec.head_dim:
        raise ValueError(f"expected x [B, H, T, {codec.head_dim}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating tensor, got {x.dtype}")


def _norm_dtype(codec) -> torch.dtype:
    """How the codec stores norms: float16, or uint8 log codes (norm_bits=8)."""
    return torch.uint8 if codec.norm_bits == 8 else torch.float16


def _empty_parts(codec, x: torch.Tensor) -> Parts:
    b, h, t, d = x.shape
    mse = _mse_part(codec)
    parts = {
        "codes": torch.empty(b, h, t, d * mse.bits // 8, dtype=torch.uint8, device=x.device),
        "norms": torch.empty(b, h, t, dtype=_norm_dtype(codec), device=x.device),
    }
    if isinstance(codec.quantizer, TurboQuantProd):
        parts["qjl_signs"] = torch.empty(b, h, t, d // 8, dtype=torch.uint8, device=x.device)
        parts["residual_norms"] = torch.empty(b, h, t, dtype=torch.float16, device=x.device)
    return parts


def encode(codec, x: torch.Tensor) -> Parts:  # x: [B, H, T, d] -> parts [B, H, T, ...]
    """The store kernel (or codec.encode where the kernel does not apply)."""
    _check_x(codec, x)
    if not (supports(codec) and _use_triton(x)) or x.shape[2] == 0:
        return encode_reference(codec, x)
    out = _empty_parts(codec, x)
    _launch_store(codec, x, out)
    return out


def encode_into(codec, x: torch.Tensor, out: Parts) -> None:
    """Encode x [B, H, T, d] into `out`'s views [B, H, T, ...] (e.g. the free slots of a store buffer)."""
    _check_x(codec, x)
    if not (supports(codec) and _use_triton(x)):
        for name, t in encode_reference(codec, x).items():
            out[name].copy_(t)
        return
    mse = _mse_part(codec)
    widths = {"codes": d_bytes(codec.head_dim, mse.bits), "norms": None}
    if isinstance(codec.quantizer, TurboQuantProd):
        widths.update(qjl_signs=codec.head_dim // 8, residual_norms=None)
    for name, width in widths.items():
        t = out.get(name)
        shape_ok = t is not None and tuple(t.shape[:3]) == tuple(x.shape[:3]) and (t.dim() == 3 if width is None else (t.dim() == 4 and t.shape[3] == width and t.stride(3) == 1))
        dtype = (_norm_dtype(codec) if name == "norms" else torch.float16) if width is None else torch.uint8
        if not shape_ok or t.dtype != dtype:
            raise ValueError(f"output part {name!r}: expected [B, H, T{'' if width is None else f', {width}'}] {dtype}, got {None if t is None else (t.dtype, tuple(t.shape))}")
    _launch_store(codec, x, out)


def d_bytes(head_dim: int, bits: int) -> int:
    return head_dim * bits // 8


# Store-kernel launch settings; None = the default for the shape. `tqpatch bench --parts store_sweep` times the
# alternatives. precision: how the rotation product is computed: "fp16x3" (three fp16 MMAs on hi/lo splits of
# both operands; mse codes only, the default for them), or a tl.dot input_precision ("tf32x3", "tf32", "ieee").
# word_store: write each group of 8 codes as one int16/int32 (2- and 4-bit codes) instead of byte by byte.
STORE_TUNING = {"block_r": None, "bn": None, "precision": None, "num_warps": None, "num_stages": 1, "word_store": True}


def _launch_store(codec, x: torch.Tensor, out: Parts) -> None:
    tk = _tk()
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, h, t, d = x.shape
    codec.prepare(x)  # a first chunk fixes what the codec calibrates (rotation choice, norm ranges) before its constants are read
    mse = _mse_part(codec)
    c = _consts(codec, x.device)
    prod = isinstance(codec.quantizer, TurboQuantProd)
    codes, norms = out["codes"], out["norms"]
    signs, rnorms = (out["qjl_signs"], out["residual_norms"]) if prod else (codes, norms)
    norm8 = codec.norm_codes is not None
    nrange = codec.norm_codes.ranges(x.device) if norm8 else c["rotT"]
    rows = b * h * t
    # Split-precision dots keep hi/lo copies of both operands in shared memory: rotation tiles of at most [D, 64]
    tune = STORE_TUNING
    block_r = tune["block_r"] or (32 if (prod or d > 128) else 64)
    # A whole [D, D] rotation tile per program where shared memory allows (D <= 128, not prod).
    bn = min(d, tune["bn"] or (64 if (prod or d > 128) else d))
    # 8 codes of MB bits are MB bytes: one int16 (MB=2) or int32 (MB=4) store where every row start is MB-aligned.
    word = mse.bits in (2, 4) and tune["word_store"] and all(v % mse.bits == 0 for v in (codes.data_ptr(), *codes.stride()[:3]))
    prec = tune["precision"] or ("tf32x3" if prod else "fp16x3")
    if prod and prec == "fp16x3":
        raise ValueError("the store kernel's fp16x3 rotation supports mse codes only; use tf32x3 for prod keys")
    if interpreting() and prec != "fp16x3":
        prec = "ieee"  # the interpreter has no tf32
    # fp16x3 at [64, D] rows: one warpgroup (4 warps) keeps all three MMAs in one accumulator layout
    # (8 warps on 64 rows made Triton convert the accumulator between them: bench/compile_check.py store)
    warps = tune["num_warps"] or (4 if prec == "fp16x3" and block_r <= 64 and d <= 128 else 8)
    blocks = triton_cdiv(rows, block_r)
    grid = min(blocks, 4 * _sm_count(x.device.index or 0)) if x.is_cuda else min(blocks, 3)
    with _device_ctx(x.device):
        tk._tq_store_kernel[(grid,)](
            x, x.stride(0), x.stride(1), x.stride(2),
            h, t, rows,
            c["rotT"], c["rotT_hi"], c["rotT_lo"], c["boundaries"], c["centroids"], c.get("projT", c["rotT"]),
            codes, codes.stride(0), codes.stride(1), codes.stride(2),
            norms, norms.stride(0), norms.stride(1), norms.stride(2),
            nrange,
            signs, signs.stride(0), signs.stride(1), signs.stride(2),
            rnorms, rnorms.stride(0), rnorms.stride(1), rnorms.stride(2),
            D=d, MB=mse.bits, PROD=prod, BLOCK_R=block_r, BN=bn, PREC=prec, WORD=word, NORM8=norm8,
            num_warps=warps, num_stages=tune["num_stages"],
        )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _as_flags(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    if mask.dtype != torch.uint8 or mask.dim() != 2 or mask.stride(1) != 1:
        mask = (mask != 0).to(torch.uint8).contiguous()
    return mask


def decode_attention(
    q: torch.Tensor,  # [B, Hq, d] one query token per row
    key_codec,
    value_codec,
    key_parts: Parts,  # [B, Hkv, L, ...]
    value_parts: Parts,  # [B, Hkv, L, ...]
    fp_keys: torch.Tensor | None,  # [B, Hkv, F, d] model dtype
    fp_values: torch.Tensor | None,  # [B, Hkv, F, d]
    scaling: float,
    valid: torch.Tensor | None = None,  # [B, L] bool/uint8 (last stride 1), None: all valid
    fp_valid: torch.Tensor | None = None,  # [B, F] bool/uint8
    out_dtype: torch.dtype | None = None,
    block_t: int | None = None,
    num_splits: int | None = None,
    key_bias: torch.Tensor | None = None,  # [B, Hq, L] float32 added to ⟨q, k̃⟩ (centered keys' ⟨q, R_p μ⟩)
    code_query: torch.Tensor | None = None,  # [B, Hq, d] scores the compressed tokens instead of q (shaped keys' A⁻¹q)
) -> torch.Tensor:
    """Attention of one query token over compressed + full-precision tokens: [B, Hq, d] in out_dtype (default q's)."""
    out_dtype = out_dtype or q.dtype
    if q.dim() != 3:
        raise ValueError(f"expected q [B, Hq, d], got {tuple(q.shape)}")
    b, hq, d = q.shape
    kn = key_parts["norms"]
    if kn.dim() != 3 or kn.shape[0] != b or hq % kn.shape[1] != 0:
        raise ValueError(f"key parts [B, Hkv, L] {tuple(kn.shape)} do not fit queries [B, Hq, d] {tuple(q.shape)}")
    if key_codec.head_dim != d or value_codec.head_dim != d:
        raise ValueError(f"codecs are for head_dim {key_codec.head_dim}/{value_codec.head_dim}, queries have {d}")
    if key_bias is not None and tuple(key_bias.shape) != (b, hq, kn.shape[2]):
        raise ValueError(f"key_bias must be [B, Hq, L] = {(b, hq, kn.shape[2])}, got {tuple(key_bias.shape)}")
    if code_query is not None and code_query.shape != q.shape:
        raise ValueError(f"code_query must have the queries' shape {tuple(q.shape)}, got {tuple(code_query.shape)}")
    if not (supports(key_codec) and supports(value_codec) and _use_triton(q)):
        return decode_attention_reference(
            q, key_codec, value_codec, key_parts, value_parts, fp_keys, fp_values, scaling, valid, fp_valid, key_bias, code_query
        ).to(out_dtype)
    return _launch_decode(
        q, key_codec, value_codec, key_parts, value_parts, fp_keys, fp_values, scaling, valid, fp_valid, out_dtype, block_t, num_splits, key_bias, code_query
    )


def _launch_decode(q, key_codec, value_codec, kp, vp, fk, fv, scaling, valid, fp_valid, out_dtype, block_t, num_splits, key_bias=None, code_query=None):
    tk = _tk()
    b, hq, d = q.shape
    hkv, length = kp["norms"].shape[1], kp["norms"].shape[2]
    g = hq // hkv
    gp = max(16, 1 << (g - 1).bit_length())  # query rows padded for tl.dot
    kc, vc = _consts(key_codec, q.device), _consts(value_codec, q.device)
    prod = isinstance(key_codec.quantizer, TurboQuantProd)
    kbits, vbits = _mse_part(key_codec).bits, _mse_part(value_codec).bits
    kpl, vpl = decode_planes(d, kbits), decode_planes(d, vbits)
    if q.stride(-1) != 1:
        q = q.contiguous()
    scoring = q if code_query is None else code_query
    qr = scoring.reshape(b * hq, d).float() @ kc["qmatT_planes" if kpl else "qmatT"]  # [B*Hq, d or 2d]: Π q (| S q)
    vrot = vc["rot_planes" if vpl else "rot"]  # rotates the value sums back from the partials' channel order
    block_t = block_t or DECODE_TUNING["block_t"]
    programs = b * hkv
    if num_splits is None:
        sms = _sm_count(q.device.index or 0) if q.is_cuda else 4
        want = triton_cdiv(DECODE_TUNING["programs_per_sm"] * sms, programs)
        num_splits = max(1, min(want, triton_cdiv(length, 4 * block_t)))
    per_split = triton_cdiv(triton_cdiv(max(length, 1), num_splits), block_t) * block_t
    splits = triton_cdiv(length, per_split) if length else 0
    m = torch.empty(programs, max(splits, 1), g, dtype=torch.float32, device=q.device)
    l_ = torch.empty_like(m)
    acc = torch.empty(programs, max(splits, 1), g, d, dtype=torch.float32, device=q.device)
    valid = _as_flags(valid)
    fp_valid = _as_flags(fp_valid)
    scale_log2 = float(scaling) * LOG2E
    qjl_scale = key_codec.quantizer.qjl_scale if prod else 0.0
    lut = DECODE_TUNING["lut"]
    kasm = kc.get("nibble_asm", "") if lut == 3 and kpl else ""
    vasm = vc.get("nibble_asm", "") if lut == 3 and vpl else ""
    kn8, vn8 = key_codec.norm_codes is not None, value_codec.norm_codes is not None
    krange = key_codec.norm_codes.ranges(q.device) if kn8 else kc["rot"]
    vrange = value_codec.norm_codes.ranges(q.device) if vn8 else vc["rot"]
    with _device_ctx(q.device):
        if splits:
            kg, kr = (kp["qjl_signs"], kp["residual_norms"]) if prod else (kp["codes"], kp["norms"])
            kcodes, knorms, vcodes, vnorms = kp["codes"], kp["norms"], vp["codes"], vp["norms"]
            mk = valid if valid is not None else kcodes
            if key_bias is not None:
                key_bias = key_bias.float().reshape(b * hq, length)
                if key_bias.stride(1) != 1:
                    key_bias = key_bias.contiguous()
            kb = key_bias if key_bias is not None else knorms
            tk._tq_decode_split_kernel[(programs, splits)](
                qr, qr.stride(0),
                kcodes, kcodes.stride(0), kcodes.stride(1), kcodes.stride(2),
                knorms, knorms.stride(0), knorms.stride(1), knorms.stride(2),
                kg, kg.stride(0), kg.stride(1), kg.stride(2),
                kr, kr.stride(0), kr.stride(1), kr.stride(2),
                kc["cent16"],
                vcodes, vcodes.stride(0), vcodes.stride(1), vcodes.stride(2),
                vnorms, vnorms.stride(0), vnorms.stride(1), vnorms.stride(2),
                vc["cent16"],
                krange, vrange,
                mk, mk.stride(0) if valid is not None else 0, 0,
                kb, kb.stride(0) if key_bias is not None else 0,
                m, l_, acc,
                hkv, length, per_split, scale_log2, qjl_scale,
                G=g, GP=gp, D=d, KB=kbits, VB=vbits, PROD=prod, HAS_MASK=valid is not None, HAS_BIAS=key_bias is not None,
                BLOCK_T=block_t, KPL=kpl, VPL=vpl, LUT=lut, KN8=kn8, VN8=vn8, KASM=kasm, VASM=vasm,
                num_warps=DECODE_TUNING["num_warps"], num_stages=DECODE_TUNING["num_stages"],
            )
        out = torch.empty(b, hq, d, dtype=out_dtype, device=q.device)
        nf = 0 if fk is None else fk.shape[2]
        if nf == 0:
            fk = fv = q.unsqueeze(2)
        if fk.stride(-1) != 1:
            fk = fk.contiguous()
        if fv.stride(-1) != 1:
            fv = fv.contiguous()
        fm = fp_valid if fp_valid is not None else q
        unrot_in_kernel = d <= 128  # a [256, 256] rotation tile does not fit in shared memory: rotate back with torch
        target = out if unrot_in_kernel else torch.empty(b, hq, d, dtype=torch.float32, device=q.device)
        tk._tq_decode_combine_kernel[(programs,)](
            m, l_, acc, splits,
            q, q.stride(0), q.stride(1),
            fk, fk.stride(0), fk.stride(1), fk.stride(2),
            fv, fv.stride(0), fv.stride(1), fv.stride(2),
            nf,
            fm, fm.stride(0) if fp_valid is not None else 0, 0,
            vrot,
            target, target.stride(0), target.stride(1),
            hkv, scale_log2,
            G=g, GP=gp, D=d, HAS_FMASK=fp_valid is not None, BLOCK_F=16, UNROT=unrot_in_kernel, num_warps=4,
        )
        if not unrot_in_kernel and splits == 0:
            out.copy_(target)
        elif not unrot_in_kernel:  # the kernel left Σ p n c / l in acc[:, 0]
            rotated = acc[:, 0].reshape(b, hq, d)
            out.copy_(torch.addmm(target.view(b * hq, d), rotated.reshape(b * hq, d), vrot).view(b, hq, d))
    return out


def decode_bytes(b: int, hkv: int, length: int, key_codec, value_codec) -> int:
    """Bytes the decode kernel must read for `length` compressed tokens (codes, norms, signs)."""
    total = 0
    for codec in (key_codec, value_codec):
        mse = _mse_part(codec)
        per = codec.head_dim * mse.bits / 8 + (1 if codec.norm_bits == 8 else 2)
        if isinstance(codec.quantizer, TurboQuantProd):
            per += codec.head_dim / 8 + 2
        total += per
    return int(b * hkv * length * total)

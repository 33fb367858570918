"""Fused GPU kernels for the compressed store, behind checked launchers.

    encode(codec, x)                 store kernel: x [B, H, T, d] -> the codec's parts (codes, norms, ...)
    encode_into(codec, x, out)       the same, written into preallocated part views (the store's buffer)
    decode_attention(q, ...)         one query token against compressed + full-precision K/V

Each launcher checks its inputs, runs the Triton kernel when the tensors are
on CUDA and Triton is importable, and otherwise runs the PyTorch reference
(`tqpatch.kernels.reference`), which is also the oracle of the kernel tests.
Triton is imported lazily: CPU installs never need it.

Supported by the kernels (`tqpatch.kernels.groups`): TurboQuantCodec with mse
bits 1..4 (keys and values) or prod keys with 2..5 bits (mse part 1..4 bits +
QJL signs), and SplitCodec (fractional bits, eigen splits) whose one or two
channel groups have 1..4 bits (any number of channels); head_dim a power
of two in 16..256, float16 or 8-bit log norms. The store kernel writes a split
group where its width is such a power of two too (else the PyTorch encode); mse
codes of bfloat16/float16 x at widths 32..128 take its x16 variant. Decode on
4-bit codes of one group per side (k4v4, d 64/128, no score bias) takes a
Gluon warp kernel (`gluon_kernels.py`) where Triton ships Gluon: the
register-table kernel at <= 8 query heads per KV head, the gather one above.
Everything else (more bits, prod in a split) uses the reference path.
Trellis codes (`tqpatch.trellis`) are decoded by the split kernel, each
coordinate by its window of the code stream, and encoded by the Triton Viterbi
search in `viterbi.py` (called from `trellis.viterbi_encode`), not the store kernel.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
import weakref

import torch

from ..codec import Parts
from ..rope import RopeBias
from ..quantizer import TurboQuantProd
from .groups import KERNEL_BITS, CodeGroup, code_groups, layout
from .ptx import store_code_constants
from .reference import decode_attention_reference, encode_reference

HEAD_DIMS = (16, 32, 64, 128, 256)
MSE_BITS = KERNEL_BITS  # mse bits of a code group the kernels read
LOG2E = 1.4426950408889634
ROPE_TABLE_MIN_ROWS = 256  # a RopeBias table covers at least the in-tile offsets of any decode tile (block_t <= 256)
# Decode-kernel launch settings (bench/RESULTS.md says how they were chosen): tokens per tile (block_t; split_block_t
# where a side has two code groups, whose kernel holds twice the state), warps, software-pipelining stages, centroid
# lookup (0 gather, 1 and 2 select chains), the narrowest plane a group is read as (min_plane_width, groups.planes),
# the flash-decoding split count, chosen so that B*Hkv*splits ≈ programs_per_sm programs per SM, and the tl.dot precision
# of the in-kernel RoPE-position bias (rope_precision "tf32": measured faster than the dense float32 bias, 3e-3 relative
# output error against 2e-3; "tf32x3" ~ float32 but slower than the dense bias: bench/RESULTS.md, run 28).
DECODE_TUNING = {"block_t": 32, "split_block_t": 32, "num_warps": 4, "num_stages": 3, "lut": 0, "min_plane_width": 32, "programs_per_sm": 16,
                 "rope_precision": "tf32", "warp_kernel": True, "warp_programs_per_sm": 128, "warp_min_split_tokens": 512, "warp_key_pairs": True,
                 "warp_lut": True, "warp_maxnreg": 160, "warp_lut_tokens": 32, "warp_lut_int8_keys": 1, "warp_lut_int8_values": 1, "warp_lut_rescale_tau": 0,
                 "combine_block_s": 64, "premerge_splits": 32, "rotate_rows_kernel": True, "warp_bias": True,
                 "warp_bias_ahead": True}
# warp_kernel: 4-bit single-group codes (k4v4) take `gluon_kernels._tq_decode_warp_kernel` (one warp per program, no
# shared memory; bench/RESULTS.md) where Gluon is importable; warp_programs_per_sm sets its flash-decoding split count,
# warp_min_split_tokens the shortest split (at B=1 and long contexts the combine kernel would otherwise merge ~500 splits),
# warp_key_pairs: key bytes looked up in a 256-entry table of centroid pairs (one gather per byte). Run 36's sweep chose
# 64 programs per SM and pairs (k4v4 0.505 vs 0.554 ms per call without pairs, same run). warp_lut: at most 8 query
# heads per KV head take `_tq_decode_lut_kernel` instead: centroids from a table in registers (PRMT), no gathers,
# and the value product transposed (accᵀ [d, 8]); warp_maxnreg: a register cap for it (ptxas; None: its own choice);
# warp_lut_tokens: its tokens per step (16 or 32). Run 42's sweep chose 128 programs per SM, 32 tokens per step at
# 168 registers (12 warps per SM, no spills): 0.147 ms against 0.156 for 16 tokens at 144 (bench/RESULTS.md).
# warp_lut_int8_keys: the LUT kernel scores keys by int8 mmas (7-bit centroids, `groups.lut_asm_i8`; 0: fp16 look-ups
# and mmas as before), the query rounded to int8 per column (1) or as int8 plus its remainder in 1/128 steps (2: a
# second mma: the table's 7 bits then dominate the score error). SASS per 32-token step: 948 (0), 820 (1), 848 (2);
# run 75 (B=8, 32k, graph replays, interleaved): 0.1455 / 0.1297 / 0.1337 ms. The output's error against the float32
# reference rises from ~1e-3 to 1.5-2.6e-2 (run 73); in perplexity, emulated on CPU (eval/experiments/int8_keys.py),
# SmolLM2 k4v4 moves by +0.007 (mean of three seeds: +0.011 / +0.025 / -0.014, within the seeds' spread), all of it
# from the query's rounding (the 7-bit table alone: +0.0001). So mode 1 is the default; 0 is the exact path.
# warp_lut_int8_values: the LUT kernel reads value centroids from their 7-bit table too, as the fp16 numbers 1024 + u
# (one PRMT per pair puts 0x64 above each byte, `groups.value_lut_asm_i8`), and removes the 1088 Σ p this adds by one
# more mma against ones: 30 integer instructions per 16 codes instead of 38 (SASS per step 820 -> 773). Run 79 (H200,
# interleaved, 7 rounds): B=8 32k 0.1295 -> 0.1247 ms, B=1 128k 0.0790 -> 0.0774; output error 7.6e-3 alone, 1.8-2.7e-2
# with int8 keys (1.5-2.6e-2 without). 0: the fp16 look-up.
# warp_lut_rescale_tau: > 0: the LUT kernel rescales its running sums only when a query column's max score grows by
# more than this (log2 units, FlashAttention-4's lazy rescaling; probabilities then reach 2^tau, so the value product
# takes p |v| 2^-tau); 0: every step. Run 78 (168 registers): tau 3 saved 1.6-1.9%; run 82 (160 registers, int8
# values): it costs 1-2% (B=8 32k 0.1232 -> 0.1244 ms, B=1 128k 0.0749 -> 0.0766), so 0 (bench/RESULTS.md).
# premerge_splits: where there are more splits than the combine kernel reads per round, `_tq_decode_merge_kernel`
# first merges groups of this many (0: never), so the B·Hq combine programs read few. Run 77, B=1 at 128k (256 splits):
# 0.0828 ms without, 0.0804 with 16, 0.0798 with 32 (bench/RESULTS.md); B=8 at 32k (64 splits) does not use it.
# rotate_rows_kernel: the decode queries' rotation by `_tq_rotate_rows_kernel` (one launch) instead of torch's cast and
# GEMM (two or three launches, ~10 µs of a 130 µs k4v4 call at B=8, 32k on an H100: run 84, bench/decode_breakdown.py).
# combine_block_s: splits the combine kernel reads per round (more: more registers, fewer rounds; run 47: 64, within 1%).
# warp_bias: scores with a bias (centered keys' RoPE bias: every `+` preset; the score variance's norm bias) take the LUT
# warp kernel too, the RoPE bias first written out dense [B*Hq, L] by `_tq_rope_bias_kernel` (False: the split kernel,
# which evaluates it per tile but runs 1.6-1.7x slower than bf16 SDPA where the warp kernel runs 0.34x: run 97; run 101:
# k4v4 + RoPE + norm bias 0.1946 ms on the warp path vs 0.5942 on the split kernel, bf16 SDPA 0.3523, B=8 32k, H100).
# The dense bias is a transient B·Hq·L·4 bytes per call (33.5 MB at B=8, Hq=32, 32k: a quarter of that layer's k4v4 key codes).
# warp_bias_ahead: the LUT kernel loads a step's bias tile one step ahead (as the codes) instead of at the step's start
# (run 102: 0.1946 -> 0.1875 ms at B=8 32k, 0.1261 -> 0.1233 at B=1 128k; same registers).

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


@functools.lru_cache(maxsize=1)
def gluon_available() -> bool:
    """Triton's Gluon (explicit layouts) importable: the warp decode kernel needs it (not under the interpreter)."""
    if not triton_available() or interpreting():
        return False
    try:
        from . import gluon_kernels  # noqa: F401
    except Exception:
        return False
    return True


def _warp_kernel_fits(kgroups, vgroups, d: int, g: int, prod: bool) -> bool:
    """Whether `_tq_decode_warp_kernel` reads these codes: one 4-bit mse group per side, d 64 or 128, at most 16 query
    heads per KV head, and Gluon present (score biases: only its LUT variant, `_lut_kernel_fits`)."""
    return (DECODE_TUNING["warp_kernel"] and len(kgroups) == 1 and len(vgroups) == 1 and not prod
            and d in (64, 128) and g <= 16
            and all(gr.index is None and gr.mse.bits == 4 and gr.head_dim == d and not gr.state_bits for gr in (*kgroups, *vgroups))
            and gluon_available())


def _token_offsets_fit_int32(kp, vp, kgroup: CodeGroup, vgroup: CodeGroup, length: int) -> bool:
    """The warp kernels address a token's codes and norms by int32 offsets from its (batch, head) base: every token
    stride × length must stay below 2^31 elements."""
    strides = [parts[name].stride(2) for parts, group in ((kp, kgroup), (vp, vgroup)) for name in (group.codes, group.norms)]
    return max(strides) * length < 2**31


def _warp_consts(group: CodeGroup, device: torch.device) -> dict[str, torch.Tensor]:
    """The warp kernel's matrices for a group's quantizer: keys' query map Πᵀ[:, key_channels] [d, d] (q @ it = the
    rotated query in the kernel's channel order; warp_query_i8: the int8 key product's order) and values' un-rotation
    Π[value_columns] [1, d, d] (the LUT kernel's: Π[value_rows]); centroids fp16, as pairs, and as the LUT kernel's
    register tables (fp16; int8 with its scale, for 16-entry codebooks)."""
    c = _consts(group, device)
    if "warp_query" not in c:
        from .groups import (CENTROID_SLOTS, int8_centroid_scale, is_symmetric, key_channels, key_channels_i8, lut_table, lut_table_i8,
                             pair_table, value_columns, value_rows)

        d = c["rotT"].shape[0]
        c["warp_query"] = c["rotT"][:, key_channels(d).to(device)].contiguous()
        c["warp_query_i8"] = c["rotT"][:, key_channels_i8(d).to(device)].contiguous()
        if c["centroids"].numel() == CENTROID_SLOTS:
            c["lut_i8_scale"] = int8_centroid_scale(c["centroids"].cpu())
            c["lut_table_i8"] = lut_table_i8(c["centroids"], c["lut_i8_scale"])
        c["warp_unrotate"] = c["rotT"].T[value_columns(d).to(device)].contiguous()[None]
        c["centroids_fp16"] = c["centroids"].half().contiguous()
        c["centroid_pairs"] = pair_table(c["centroids"])
        c["lut_table"] = lut_table(c["centroids"])
        c["lut_symmetric"] = is_symmetric(c["centroids"])
        c["lut_unrotate"] = c["rotT"].T[value_rows(d).to(device)].contiguous()[None]
    return c


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


def _groups(codec) -> list[CodeGroup] | None:
    """The codec's code groups if the decode kernel reads it (head_dim a kernel size), else None."""
    if getattr(codec, "head_dim", None) not in HEAD_DIMS:
        return None
    return code_groups(codec)


def supports(codec) -> bool:
    """Whether the decode kernel reads this codec's parts (else the reference path is used). A SplitCodec
    qualifies once calibrated (its first chunk is encoded by the reference path, which calibrates it)."""
    return _groups(codec) is not None


def _store_groups(codec, x: torch.Tensor) -> list[CodeGroup] | None:
    """The groups the store kernel writes for x [B, H, T, d], or None: use the PyTorch encode (no kernel device,
    a group whose width is not a kernel size, or a SplitCodec's first chunk, which calibrates it)."""
    if not _use_triton(x) or x.shape[2] == 0 or getattr(codec, "head_dim", None) not in HEAD_DIMS:
        return None
    if hasattr(codec, "prepare"):  # TurboQuantCodec: norm ranges (and a rotation search's choice) fixed before the constants are read
        codec.prepare(x)
    groups = code_groups(codec)
    if groups is None or not all(g.head_dim in HEAD_DIMS and not g.state_bits for g in groups):  # trellis codes: Viterbi (trellis.py)
        return None
    return groups


# -- per-quantizer constants on each device (float32, contiguous) ---------------------------------------
_CONSTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _consts(group: CodeGroup, device: torch.device) -> dict[str, torch.Tensor]:
    """The store kernel's constants of a group's quantizer on `device`, made once."""
    per_device = _CONSTS.setdefault(group.quantizer, {})
    if device not in per_device:
        mse = group.mse
        rot = mse.rotation(device).contiguous()  # Π [d, d]
        c = {
            "rotT": rot.T.contiguous(),
            "centroids": mse.centroids(device).contiguous(),
            "boundaries": mse._constants(device)[2].contiguous(),
        }
        if isinstance(group.quantizer, TurboQuantProd):
            s = group.quantizer.qjl(device)
            c["projT"] = (rot @ s.T).contiguous()  # S Πᵀ r_rot as a row vector: r_rot @ Π Sᵀ
        rot_hi = c["rotT"].half()  # the store kernel's fp16x3 rotation (and x16 on float16 x): 4096 Πᵀ = hi + lo
        c["rotT_hi"], c["rotT_lo"] = (rot_hi * 4096).contiguous(), ((c["rotT"] - rot_hi.float()) * 4096).half().contiguous()
        c["store_code_constants"] = torch.tensor(store_code_constants(c["boundaries"].tolist()), dtype=torch.int32, device=device)
        rot_bhi = c["rotT"].bfloat16()  # x16 on bfloat16 x: Πᵀ = hi + lo in bfloat16 (~16 significant bits)
        c["rotT_bhi"], c["rotT_blo"] = rot_bhi.contiguous(), (c["rotT"] - rot_bhi.float()).bfloat16().contiguous()
        per_device[device] = c
    return per_device[device]


def _check_x(codec, x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] != codec.head_dim:
        raise ValueError(f"expected x [B, H, T, {codec.head_dim}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating tensor, got {x.dtype}")


def _part_specs(group: CodeGroup) -> dict[str, tuple[str, int | None, torch.dtype]]:
    """kernel part name -> (the codec's part name, last-dim width or None for [B, H, T], dtype) of one group."""
    specs = {
        "codes": (group.codes, group.code_bytes, torch.uint8),
        "norms": (group.norms, None, torch.uint8 if group.norm_codes is not None else torch.float16),
    }
    if isinstance(group.quantizer, TurboQuantProd):
        specs.update(qjl_signs=("qjl_signs", group.head_dim // 8, torch.uint8), residual_norms=("residual_norms", None, torch.float16))
    return specs


def encode(codec, x: torch.Tensor) -> Parts:  # x: [B, H, T, d] -> parts [B, H, T, ...]
    """The store kernel (or codec.encode where the kernel does not apply)."""
    _check_x(codec, x)
    groups = _store_groups(codec, x)
    if groups is None:
        return encode_reference(codec, x)
    b, h, t, _ = x.shape
    out = {name: torch.empty(b, h, t, *(() if width is None else (width,)), dtype=dtype, device=x.device)
           for group in groups for name, width, dtype in _part_specs(group).values()}
    _write_groups(groups, x, out)
    return out


def encode_into(codec, x: torch.Tensor, out: Parts) -> None:
    """Encode x [B, H, T, d] into `out`'s views [B, H, T, ...] (e.g. the free slots of a store buffer)."""
    _check_x(codec, x)
    groups = _store_groups(codec, x)
    if groups is None:
        for name, t in encode_reference(codec, x).items():
            out[name].copy_(t)
        return
    _write_groups(groups, x, out)


def _write_groups(groups: list[CodeGroup], x: torch.Tensor, out: Parts) -> None:
    """The store kernel on each group's channels of x [B, H, T, d], into the codec's part views in `out` (checked)."""
    for group in groups:
        views = {}
        for kernel_name, (name, width, dtype) in _part_specs(group).items():
            t = out.get(name)
            shape_ok = t is not None and tuple(t.shape[:3]) == tuple(x.shape[:3]) and (t.dim() == 3 if width is None else (t.dim() == 4 and t.shape[3] == width and t.stride(3) == 1))
            if not shape_ok or t.dtype != dtype:
                raise ValueError(f"output part {name!r}: expected [B, H, T{'' if width is None else f', {width}'}] {dtype}, got {None if t is None else (t.dtype, tuple(t.shape))}")
            views[kernel_name] = t
        _launch_store(group, group.gather(x), views)


# Store-kernel launch settings; None = the default for the shape. `tqpatch bench --parts store_sweep` times the
# alternatives. precision: how the rotation product is computed: "x16-hi" (`_tq_store_x16_kernel`: x as it is, in
# bfloat16/float16, times Πᵀ rounded to that dtype, one MMA; mse codes at d 32..128, the default there. Πᵀ rounded to
# bfloat16 errs as much as x's own bfloat16 rounding: both move ~0.45% of the codes to a neighbour and add ~3e-4 to
# the distortion (run 57); in float16, scaled by 4096, ~0.05%), "x16" (hi + lo splits of Πᵀ, two MMAs: the float32
# reference's codes to within the quantizer's fp16 rounding, 1.2x the time),
# "fp16x3" (three fp16 MMAs on hi/lo splits of both operands; mse codes only, the default for the other mse cases),
# or a tl.dot input_precision ("tf32x3", "tf32", "ieee"). word_store: write each group of 8 codes as one
# int16/int32 (2- and 4-bit codes) instead of byte by byte (the x16 kernel always writes whole words).
# x16_quantizer: how the x16 kernel finds the codes: "f16x2" (inline PTX on fp16 pairs, `ptx.store_codes_asm`; codes
# move only within fp16 rounding of a boundary) or "f32" (Triton code in float32; what the CPU interpreter runs);
# x16_channel_block: columns per MMA chain (64 or 128; the rotation's d columns in d / it chains); x16_tma: load
# x tiles by TMA (tensor descriptors, Hopper+) instead of per-thread loads; x16_asm_store: write codes and norms
# from the registers that hold them (inline st.global) instead of tl.store's coalescing round trip through shared memory;
# x16_maxnreg: a register cap for ptxas (None: ptxas's choice, 96 at d 128, which interleaves ~2 quantizer pairs at a time).
# Shared memory holds 2 programs per SM at d 128 either way, so the default 168 costs no occupancy and lets ptxas
# keep more pairs in flight (run 61: 0.277 against 0.292 ms).
STORE_TUNING = {"block_r": None, "bn": None, "precision": None, "num_warps": None, "num_stages": 1, "word_store": True,
                "x16_block_r": 64, "x16_num_warps": 4, "x16_num_stages": 4, "x16_programs_per_sm": None, "x16_quantizer": "f16x2",
                "x16_channel_block": 128, "x16_tma": True, "x16_asm_store": True, "x16_maxnreg": 168}
X16_QUANTIZERS = ("f16x2", "f32")
X16_DIMS = (32, 64, 128)  # widths the x16 store kernel takes (whole words of 8 codes per thread and row; [D, D] tiles fit)


def _launch_store(group: CodeGroup, x: torch.Tensor, out: Parts) -> None:
    """The store kernel on one code group: x [B, H, T, w] (the group's channels) -> out's codes, norms (+ prod parts)."""
    tk = _tk()
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, h, t, d = x.shape
    group.prepare(x)  # a first chunk fixes the 8-bit norms' ranges before they are read
    mse = group.mse
    c = _consts(group, x.device)
    prod = isinstance(group.quantizer, TurboQuantProd)
    codes, norms = out["codes"], out["norms"]
    norm8 = group.norm_codes is not None
    nrange = group.norm_codes.ranges(x.device) if norm8 else c["rotT"]
    tune = STORE_TUNING
    # 8 codes of MB bits are MB bytes: one int16 (MB=2) or int32 (MB=4) store where every row start is MB-aligned.
    aligned = all(v % mse.bits == 0 for v in (codes.data_ptr(), *codes.stride()[:3])) if mse.bits in (2, 4) else True
    # (Triton's CPU interpreter multiplies bfloat16 tiles wrongly: there bfloat16 x takes fp16x3, float16 x still x16)
    x16_dtypes = (torch.float16,) if interpreting() else (torch.bfloat16, torch.float16)
    x16_fits = not prod and mse.bits <= 4 and d in X16_DIMS and x.dtype in x16_dtypes and aligned  # its quantizer: 1-4 bits
    prec = tune["precision"] or ("tf32x3" if prod else "x16-hi" if x16_fits else "fp16x3")
    if prec in ("x16", "x16-hi"):
        if not x16_fits:
            raise ValueError(f"the x16 store kernel needs mse codes of 1-4 bits, a group width in {X16_DIMS}, bfloat16/float16 x and "
                             f"word-aligned codes; got {'prod' if prod else 'mse'} {mse.bits}-bit codes, width {d}, {x.dtype}")
        _launch_store_x16(mse, c, x, codes, norms, nrange, norm8, lo=prec == "x16")
        return
    if prod and prec == "fp16x3":
        raise ValueError("the store kernel's fp16x3 rotation supports mse codes only; use tf32x3 for prod keys")
    signs, rnorms = (out["qjl_signs"], out["residual_norms"]) if prod else (codes, norms)
    rows = b * h * t
    # Split-precision dots keep hi/lo copies of both operands in shared memory: rotation tiles of at most [D, 64]
    block_r = tune["block_r"] or (32 if (prod or d > 128 or mse.bits > 4) else 64)  # 5-8 bits: int64 words (64 rows spill at d 128)
    # A whole [D, D] rotation tile per program where shared memory allows (D <= 128, not prod).
    bn = min(d, tune["bn"] or (64 if (prod or d > 128) else d))
    word = mse.bits in (2, 4) and tune["word_store"] and aligned
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


def _launch_store_x16(mse, c: dict, x: torch.Tensor, codes: torch.Tensor, norms: torch.Tensor, nrange: torch.Tensor, norm8: bool,
                      lo: bool = False) -> None:
    """`_tq_store_x16_kernel` on x [B, H, T, d] (bfloat16/float16, last stride 1) -> codes, norms. lo=False (the
    default) multiplies by Πᵀ rounded to x's dtype alone, one MMA: in bfloat16 a code within ~2^-9 of a boundary may
    move to its neighbour, as rounding x to bfloat16 moves it; lo=True adds the lo part (two MMAs)."""
    b, h, t, d = x.shape
    rows = b * h * t
    tune = STORE_TUNING
    bf16 = x.dtype == torch.bfloat16
    quantizer = tune["x16_quantizer"]
    if quantizer not in X16_QUANTIZERS:
        raise ValueError(f"STORE_TUNING['x16_quantizer'] must be one of {X16_QUANTIZERS}, got {quantizer!r}")
    # TMA loads of x: Hopper or newer, 16-byte aligned rows, and at least one whole tile of tokens: a one-token append
    # would pay the host's descriptor set-up for nothing (the interpreter reads x with plain loads)
    tma = (tune["x16_tma"] and not interpreting() and t >= tune["x16_block_r"] and torch.cuda.get_device_capability(x.device)[0] >= 9
           and _tma_fits(x))
    if interpreting():
        quantizer = "f32"  # the CPU interpreter runs no inline PTX
    block_r = tune["x16_block_r"]
    tiles = b * h * triton_cdiv(t, block_r)  # the kernel's tiles: block_r consecutive tokens of one (batch, head)
    smem = (4 if lo else 2) * d * d + 2 * tune["x16_num_stages"] * block_r * d + (4 << 10)  # Πᵀ hi (+ lo), x tiles, scratch
    regs = tune["x16_maxnreg"] or 168  # without a cap, assume 168 (ptxas chose 96-168 at d 128 in the compile checks)
    fits = min((224 << 10) // smem, 65536 // (regs * 32 * tune["x16_num_warps"]))  # as many as shared memory and registers hold
    per_sm = tune["x16_programs_per_sm"] or max(1, min(8, fits))
    grid = min(tiles, per_sm * _sm_count(x.device.index or 0)) if x.is_cuda else min(tiles, 3)
    with _device_ctx(x.device):
        _tk()._tq_store_x16_kernel[(grid,)](
            x, x.stride(0), x.stride(1), x.stride(2), _x_descriptor(x, block_r) if tma else x,
            h, t, rows,
            c["rotT_bhi"] if bf16 else c["rotT_hi"], c["rotT_blo"] if bf16 else c["rotT_lo"], c["boundaries"], c["store_code_constants"],
            codes, codes.stride(0), codes.stride(1), codes.stride(2),
            norms, norms.stride(0), norms.stride(1), norms.stride(2),
            nrange,
            D=d, MB=mse.bits, BLOCK_R=block_r, SCALE=1.0 if bf16 else 4096.0, NORM8=norm8, LO=lo, F16X2=quantizer == "f16x2",
            CBMAX=tune["x16_channel_block"], TMA=tma, ASM_STORE=tune["x16_asm_store"] and not interpreting(),
            num_warps=tune["x16_num_warps"], num_stages=tune["x16_num_stages"],
            **({"maxnreg": tune["x16_maxnreg"]} if tune["x16_maxnreg"] else {}),
        )


def _tma_fits(x: torch.Tensor) -> bool:
    """Whether a TMA descriptor can address x [B, H, T, d]: a 16-byte aligned base and 16-byte multiples as strides."""
    return x.data_ptr() % 16 == 0 and all(s * x.element_size() % 16 == 0 for s in x.stride()[:3]) and x.stride(3) == 1


def _x_descriptor(x: torch.Tensor, block_r: int):
    """A host-side tensor descriptor of x [B, H, T, d] whose blocks are [1, 1, block_r, d]: one tile of the x16 kernel."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, block_r, x.shape[3]])


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
    rope_bias: RopeBias | None = None,  # centered keys' ⟨q, R_p μ⟩ in factored form, added like key_bias
    norm_bias: torch.Tensor | None = None,  # [B, Hq, groups] float32: Σ_g norm_bias_g ‖k_g‖² added like key_bias (score variance)
) -> torch.Tensor:
    """Attention of one query token over compressed + full-precision tokens: [B, Hq, d] in out_dtype (default q's)."""
    out_dtype = out_dtype or q.dtype
    if q.dim() != 3:
        raise ValueError(f"expected q [B, Hq, d], got {tuple(q.shape)}")
    b, hq, d = q.shape
    kn = next(iter(key_parts.values()))  # every part is [B, Hkv, L, ...]
    if kn.dim() < 3 or kn.shape[0] != b or hq % kn.shape[1] != 0:
        raise ValueError(f"key parts [B, Hkv, L, ...] {tuple(kn.shape)} do not fit queries [B, Hq, d] {tuple(q.shape)}")
    if key_codec.head_dim != d or value_codec.head_dim != d:
        raise ValueError(f"codecs are for head_dim {key_codec.head_dim}/{value_codec.head_dim}, queries have {d}")
    if key_bias is not None and tuple(key_bias.shape) != (b, hq, kn.shape[2]):
        raise ValueError(f"key_bias must be [B, Hq, L] = {(b, hq, kn.shape[2])}, got {tuple(key_bias.shape)}")
    if code_query is not None and code_query.shape != q.shape:
        raise ValueError(f"code_query must have the queries' shape {tuple(q.shape)}, got {tuple(code_query.shape)}")
    if rope_bias is not None:
        if key_bias is not None:
            raise ValueError("give key_bias or rope_bias, not both")
        rows, width = rope_bias.table.shape
        if rope_bias.coefficients.shape != q.shape or width != 2 * d or rows < rope_bias.first + kn.shape[2]:
            raise ValueError(f"rope_bias must hold coefficients {tuple(q.shape)} and a table [>= {rope_bias.first + kn.shape[2]}, {2 * d}], "
                             f"got {tuple(rope_bias.coefficients.shape)} and {tuple(rope_bias.table.shape)}")
    if norm_bias is not None:
        key_groups = sum(name.endswith("norms") and name != "residual_norms" for name in key_parts)  # "norms", or "hi_norms" (+ "lo_norms")
        if tuple(norm_bias.shape) != (b, hq, key_groups):
            raise ValueError(f"norm_bias must be [B, Hq, groups] = {(b, hq, key_groups)}, got {tuple(norm_bias.shape)}")
    if not (supports(key_codec) and supports(value_codec) and _use_triton(q)):
        if rope_bias is not None:
            key_bias = rope_bias.dense(kn.shape[2])
        return decode_attention_reference(
            q, key_codec, value_codec, key_parts, value_parts, fp_keys, fp_values, scaling, valid, fp_valid, key_bias, code_query, norm_bias
        ).to(out_dtype)
    args = (q, key_codec, value_codec, key_parts, value_parts, fp_keys, fp_values, scaling, valid, fp_valid, out_dtype, block_t, num_splits,
            key_bias, code_query, rope_bias, norm_bias)
    try:
        return _launch_decode(*args)
    except WarpKernelError as exc:  # Gluon is experimental: a Triton whose Gluon cannot build the warp kernel
        warnings.warn(f"the Gluon warp decode kernel failed ({exc.__cause__!r}); using the Triton split kernel from now on", RuntimeWarning, stacklevel=2)
        DECODE_TUNING["warp_kernel"] = False
        return _launch_decode(*args)


def _launch_decode(q, key_codec, value_codec, kp, vp, fk, fv, scaling, valid, fp_valid, out_dtype, block_t, num_splits, key_bias=None, code_query=None,
                   rope_bias=None, norm_bias=None):
    tk = _tk()
    b, hq, d = q.shape
    kgroups, vgroups = _groups(key_codec), _groups(value_codec)
    kfirst = kp[kgroups[0].norms]  # [B, Hkv, L]
    hkv, length = kfirst.shape[1], kfirst.shape[2]
    g = hq // hkv
    gp = max(16, 1 << (g - 1).bit_length())  # query rows padded for tl.dot
    min_plane = DECODE_TUNING["min_plane_width"]
    klay, vlay = layout(key_codec, kgroups, d, q.device, min_plane), layout(value_codec, vgroups, d, q.device, min_plane)
    for lay in (klay, vlay):
        if lay.query.shape[0] not in (1, hkv):
            raise ValueError(f"a split codec calibrated for {lay.query.shape[0]} KV heads read with {hkv}")
    prod = isinstance(kgroups[0].quantizer, TurboQuantProd)
    if q.stride(-1) != 1:
        q = q.contiguous()
    scoring = (q if code_query is None else code_query).reshape(b * hq, d)  # any float dtype: rotate_rows reads it as float32
    biased = key_bias is not None or rope_bias is not None or norm_bias is not None
    warp = (_warp_kernel_fits(kgroups, vgroups, d, g, prod) and _token_offsets_fit_int32(kp, vp, kgroups[0], vgroups[0], length)
            and (not biased or (DECODE_TUNING["warp_bias"] and _lut_kernel_fits(_code_words(kp, vp, kgroups[0], vgroups[0]), g))))
    if warp:
        block_t = max(16, DECODE_TUNING["warp_lut_tokens"])  # the warp kernels' step; their rotated query is made below, in their channel order
    elif klay.query.shape[0] == 1:
        qr = rotate_rows(scoring, klay.query[0])  # [B*Hq, QW]: the groups' Π_g q_g (| S q)
    else:  # per KV head: each group's channels gathered and rotated in one product
        qr = torch.matmul(scoring.float().view(b, hkv, g, d), klay.query).reshape(b * hq, -1)
    block_t = block_t or DECODE_TUNING["split_block_t" if max(len(kgroups), len(vgroups)) > 1 else "block_t"]
    programs = b * hkv
    if num_splits is None:
        num_splits = default_splits(programs, length, _sm_count(q.device.index or 0) if q.is_cuda else 4, warp, block_t)
    per_split = triton_cdiv(triton_cdiv(max(length, 1), num_splits), block_t) * block_t
    splits = triton_cdiv(length, per_split) if length else 0
    aw = d if warp else vlay.accumulator_width
    m = torch.empty(programs, max(splits, 1), g, dtype=torch.float32, device=q.device)
    l_ = torch.empty_like(m)
    acc = torch.empty(programs, max(splits, 1), g, aw, dtype=torch.float32, device=q.device)
    valid = _as_flags(valid)
    fp_valid = _as_flags(fp_valid)
    scale_log2 = float(scaling) * LOG2E
    bias_log2 = scale_log2 / rope_bias.scale if rope_bias is not None else scale_log2  # the rope bias comes in s·(table units)
    qjl_scale = kgroups[0].quantizer.qjl_scale if prod else 0.0
    kn8, vn8 = kgroups[0].norm_codes is not None, vgroups[0].norm_codes is not None
    unrot, awu = vlay.unrotate, sum(vlay.widths)  # [1 or Hkv, AW, d]
    with _device_ctx(q.device):
        if splits and warp:
            kc, vc = _warp_consts(kgroups[0], q.device), _warp_consts(vgroups[0], q.device)
            if rope_bias is not None:
                key_bias = rope_bias_dense(rope_bias, length)
            elif key_bias is not None:
                key_bias = key_bias.float().reshape(b * hq, length).contiguous()
            nb = norm_bias.float().reshape(b * hq).contiguous() if norm_bias is not None else None
            lut = _launch_decode_warp(scoring, kgroups[0], vgroups[0], kp, vp, klay, vlay, kc, vc, valid, m, l_, acc, hkv,
                                      length, per_split, splits, scale_log2, g, d, key_bias, nb)
            unrot, awu = vc["lut_unrotate" if lut else "warp_unrotate"], d
        elif splits:
            k0, k1 = _group_args(kp, kgroups, klay)
            v0, v1 = _group_args(vp, vgroups, vlay)
            kg, kr = (kp["qjl_signs"], kp["residual_norms"]) if prod else (kfirst, kfirst)
            mk = valid if valid is not None else kfirst
            if key_bias is not None:
                key_bias = key_bias.float().reshape(b * hq, length)
                if key_bias.stride(1) != 1:
                    key_bias = key_bias.contiguous()
            kb = key_bias if key_bias is not None else kfirst
            if rope_bias is not None:
                if rope_bias.table.shape[0] < block_t:  # the kernel reads the rows of the in-tile offsets 0 .. block_t-1
                    raise ValueError(f"rope_bias.table needs at least {block_t} rows (the decode tile), got {rope_bias.table.shape[0]}")
                rc = rope_bias.coefficients.float().reshape(b * hq, d).contiguous()
                rt = rope_bias.table.float().contiguous()
            else:
                rc, rt = qr, qr
            nb = norm_bias.float().reshape(b * hq, len(kgroups)).contiguous() if norm_bias is not None else qr
            tk._tq_decode_split_kernel[(programs, splits)](
                qr, qr.stride(0),
                *k0["args"], *k1["args"],
                kg, *kg.stride()[:3],
                kr, *kr.stride()[:3],
                klay.centroids,
                *v0["args"], *v1["args"],
                vlay.centroids,
                klay.norm_ranges if kn8 else qr, vlay.norm_ranges if vn8 else qr,
                mk, mk.stride(0) if valid is not None else 0, 0,
                kb, kb.stride(0) if key_bias is not None else 0,
                rc, rc.stride(0), rt, rt.stride(0), rope_bias.first if rope_bias is not None else 0, bias_log2,
                nb,
                m, l_, acc,
                hkv, length, per_split, scale_log2, qjl_scale,
                G=g, GP=gp, D=d, AW=aw,
                KG=len(kgroups), **{"K" + k + "0": v for k, v in k0["const"].items()}, **{"K" + k + "1": v for k, v in k1["const"].items()},
                VG=len(vgroups), **{"V" + k + "0": v for k, v in v0["const"].items()}, **{"V" + k + "1": v for k, v in v1["const"].items()},
                PROD=prod, HAS_MASK=valid is not None, HAS_BIAS=key_bias is not None, HAS_ROPE=rope_bias is not None,
                HAS_NORM_BIAS=norm_bias is not None,
                ROPE_PREC="ieee" if interpreting() else DECODE_TUNING["rope_precision"],
                BLOCK_T=block_t, LUT=DECODE_TUNING["lut"], KN8=kn8, VN8=vn8, KCS=klay.centroids.shape[1], VCS=vlay.centroids.shape[1],
                num_warps=DECODE_TUNING["num_warps"], num_stages=DECODE_TUNING["num_stages"],
            )
        ch = DECODE_TUNING["premerge_splits"]
        if ch and splits > DECODE_TUNING["combine_block_s"]:  # long context, few programs: merge the splits in groups first
            merged = triton_cdiv(splits, ch)
            m2 = torch.empty(programs, merged, g, dtype=torch.float32, device=q.device)
            l2 = torch.empty_like(m2)
            acc2 = torch.empty(programs, merged, g, aw, dtype=torch.float32, device=q.device)
            tk._tq_decode_merge_kernel[(programs * g, merged)](m, l_, acc, splits, m2, l2, acc2, merged, G=g, AW=aw, CH=ch, num_warps=4)
            m, l_, acc, splits = m2, l2, acc2, merged
        out = torch.empty(b, hq, d, dtype=out_dtype, device=q.device)
        nf = 0 if fk is None else fk.shape[2]
        if nf == 0:
            fk = fv = q.unsqueeze(2)
        if fk.stride(-1) != 1:
            fk = fk.contiguous()
        if fv.stride(-1) != 1:
            fv = fv.contiguous()
        fm = fp_valid if fp_valid is not None else q
        tk._tq_decode_combine_kernel[(programs * g,)](
            m, l_, acc, splits,
            q, q.stride(0), q.stride(1),
            fk, fk.stride(0), fk.stride(1), fk.stride(2),
            fv, fv.stride(0), fv.stride(1), fv.stride(2),
            nf,
            fm, fm.stride(0) if fp_valid is not None else 0, 0,
            unrot, unrot.stride(0) if unrot.shape[0] > 1 else 0,
            out, out.stride(0), out.stride(1),
            hkv, scale_log2,
            G=g, D=d, AW=aw, AWU=awu, HAS_FMASK=fp_valid is not None, BLOCK_F=16, BLOCK_S=DECODE_TUNING["combine_block_s"], BLOCK_J=max(8, 8192 // d),
            num_warps=4,
        )
    return out


def rope_bias_dense(rope_bias: RopeBias, length: int, block_t: int = 64, tiles_per_program: int = 4, block_r: int = 64, num_warps: int = 4) -> torch.Tensor:
    """`rope_bias.dense(length)` as [B*Hq, length] float32 by `_tq_rope_bias_kernel` (angle addition from the table's
    rows of the tile starts and of the in-tile offsets, tl.dot at `rope_precision`), for the warp decode kernel. Launch
    settings from run 102's sweep (bench/rope_dense_sweep.py, H100): 64 rows x 4 tiles of 64 tokens per program,
    0.0237 ms at B=8, Hq=32, 32k (0.0409 with 16 x 8 x 64)."""
    b, hq, d = rope_bias.coefficients.shape
    rows, width = rope_bias.table.shape
    if width != 2 * d or rows < max(rope_bias.first + length, block_t):
        raise ValueError(f"rope_bias.table must be [>= {max(rope_bias.first + length, block_t)}, {2 * d}], got {tuple(rope_bias.table.shape)}")
    rc = rope_bias.coefficients.float().reshape(b * hq, d).contiguous()
    rt = rope_bias.table.float().contiguous()
    out = torch.empty(b * hq, length, dtype=torch.float32, device=rc.device)
    if length:
        grid = (triton_cdiv(b * hq, block_r), triton_cdiv(triton_cdiv(length, block_t), tiles_per_program))
        with _device_ctx(rc.device):
            _tk()._tq_rope_bias_kernel[grid](
                rc, rc.stride(0), rt, rt.stride(0), rope_bias.first, 1.0 / rope_bias.scale, out, out.stride(0),
                b * hq, length, tiles_per_program,
                D=d, BLOCK_R=block_r, BLOCK_T=block_t, ROPE_PREC="ieee" if interpreting() else DECODE_TUNING["rope_precision"], num_warps=num_warps,
            )
    return out


def rotate_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [R, d] (any float dtype, last stride 1) @ w [d, N] float32 -> [R, N] float32, by `_tq_rotate_rows_kernel`
    (one launch; torch's cast and GEMM take two or three, ~10 µs at a decode step's few hundred rows: run 84)."""
    if not DECODE_TUNING["rotate_rows_kernel"]:  # torch's cast and GEMM (the A/B baseline)
        return x.float() @ w.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    w = w.float().contiguous()
    r, d = x.shape
    n = w.shape[1]
    out = torch.empty(r, n, dtype=torch.float32, device=x.device)
    block_n = 32
    with _device_ctx(x.device):
        _tk()._tq_rotate_rows_kernel[(triton_cdiv(r, 16), triton_cdiv(n, block_n))](
            x, x.stride(0), w, out, r, n, D=d, BLOCK_K=max(16, 1 << (d - 1).bit_length()), BLOCK_R=16, BLOCK_N=block_n, num_warps=4)
    return out


def default_splits(programs: int, length: int, sms: int, warp: bool, block_t: int) -> int:
    """Flash-decoding splits per (B·Hkv) program row: enough programs to fill the SMs (`programs_per_sm`, or
    `warp_programs_per_sm` for the one-warp kernels), but splits no shorter than `warp_min_split_tokens` (warp
    kernels) or 4 tiles (few long splits: less to combine)."""
    want = triton_cdiv(DECODE_TUNING["warp_programs_per_sm" if warp else "programs_per_sm"] * sms, programs)
    min_tokens = DECODE_TUNING["warp_min_split_tokens"] if warp else 4 * block_t
    return max(1, min(want, triton_cdiv(length, min_tokens)))


class WarpKernelError(RuntimeError):
    """The Gluon warp kernel could not be built or launched (decode_attention falls back to the split kernel)."""


def _code_words(kp, vp, kgroup: CodeGroup, vgroup: CodeGroup) -> tuple:
    """The key and value code bytes as int32 words (`_as_words`; None where they do not align)."""
    return _as_words(kp[kgroup.codes]), _as_words(vp[vgroup.codes])


def _lut_kernel_fits(words: tuple, g: int) -> bool:
    """Whether the warp path takes `_tq_decode_lut_kernel`: `warp_lut`, G <= 8, codes readable as 32-bit words."""
    return DECODE_TUNING["warp_lut"] and g <= 8 and None not in words


def _launch_decode_warp(q, kgroup, vgroup, kp, vp, klay, vlay, kc, vc, valid, m, l_, acc, hkv, length, per_split, splits, scale_log2, g, d,
                        key_bias=None, norm_bias=None) -> bool:
    """A Gluon warp kernel over (B*Hkv, splits) programs of one warp for the queries q [B*Hq, d] fp32: partials m, l,
    acc (value columns in its order). The LUT kernel where it fits (`_lut_kernel_fits`; with int8 keys where
    `warp_lut_int8_keys` and the key table allow), else `_tq_decode_warp_kernel`; returns whether the LUT kernel ran.
    key_bias [B*Hq, L] fp32 and norm_bias [B*Hq] fp32 (added to ⟨q, k̃⟩ as in `decode_attention`): LUT kernel only."""
    words = _code_words(kp, vp, kgroup, vgroup)
    lut = _lut_kernel_fits(words, g)
    if not lut and (key_bias is not None or norm_bias is not None):
        raise ValueError("score biases need the LUT warp kernel (_lut_kernel_fits)")
    i8 = int(DECODE_TUNING["warp_lut_int8_keys"]) if lut and "lut_table_i8" in kc else 0
    vi8 = int(bool(DECODE_TUNING["warp_lut_int8_values"]) and lut and "lut_table_i8" in vc)
    qk = rotate_rows(q, kc["warp_query_i8" if i8 else "warp_query"])  # [B*Hq, d] fp32 rotated, in the kernel's key channel order
    try:
        if lut:
            _run_lut_kernel(qk, kgroup, vgroup, kp, vp, *words, klay, vlay, kc, vc, valid, m, l_, acc, hkv, length, per_split, splits, scale_log2, g, d, i8,
                            vi8, key_bias, norm_bias)
        else:
            _run_warp_kernel(qk, kgroup, vgroup, kp, vp, klay, vlay, kc, vc, valid, m, l_, acc, hkv, length, per_split, splits, scale_log2, g, d)
    except Exception as exc:
        raise WarpKernelError("the Gluon warp decode kernel failed") from exc
    return lut


def _as_words(codes: torch.Tensor) -> torch.Tensor | None:
    """Code bytes [B, H, T, n] as int32 words [B, H, T, n/4] (the same memory), or None where they do not align."""
    if codes.stride(-1) != 1 or codes.shape[-1] % 4 or codes.data_ptr() % 4 or any(st % 4 for st in codes.stride()[:-1]):
        return None
    return codes.view(torch.int32)


def _warp_common_args(qk, kgroup, vgroup, kp, vp, klay, vlay, valid) -> tuple:
    """The arguments both warp kernels take after the codes: norms (+ their 8-bit ranges) and the valid flags."""
    knorms, vnorms = kp[kgroup.norms], vp[vgroup.norms]
    kn8, vn8 = kgroup.norm_codes is not None, vgroup.norm_codes is not None
    mk = valid if valid is not None else knorms
    return (knorms, vnorms, klay.norm_ranges if kn8 else qk, vlay.norm_ranges if vn8 else qk, mk, mk.stride(0) if valid is not None else 0,
            kn8, vn8)


def _run_lut_kernel(qk, kgroup, vgroup, kp, vp, kwords, vwords, klay, vlay, kc, vc, valid, m, l_, acc, hkv, length, per_split, splits, scale_log2, g, d,
                    i8: int = 0, vi8: int = 0, key_bias=None, norm_bias=None):
    from . import gluon_kernels as gk

    knorms, vnorms, krange, vrange, mk, smb, kn8, vn8 = _warp_common_args(qk, kgroup, vgroup, kp, vp, klay, vlay, valid)
    bt = DECODE_TUNING["warp_lut_tokens"]
    klayout, vlayout = gk.word_layouts(d, bt)
    gk._tq_decode_lut_kernel[(m.shape[0], splits)](
        qk, qk.stride(0),
        kwords, *kwords.stride()[:3], knorms, *knorms.stride()[:3], kc["lut_table_i8" if i8 else "lut_table"],
        vwords, *vwords.stride()[:3], vnorms, *vnorms.stride()[:3], vc["lut_table_i8" if vi8 else "lut_table"],
        krange, vrange, mk, smb, 0,
        key_bias if key_bias is not None else qk, key_bias.stride(0) if key_bias is not None else 0,
        norm_bias if norm_bias is not None else qk,
        m, l_, acc,
        hkv, length, per_split, scale_log2, kc["lut_i8_scale"] if i8 else 1.0, vc["lut_i8_scale"] if vi8 else 1.0,
        G=g, D=d, HAS_MASK=valid is not None, KN8=kn8, VN8=vn8, HAS_BIAS=key_bias is not None, HAS_NORM_BIAS=norm_bias is not None,
        BIAS_AHEAD=DECODE_TUNING["warp_bias_ahead"], KI8=i8, VI8=vi8, TAU=DECODE_TUNING["warp_lut_rescale_tau"], BT=bt, KSYM=kc["lut_symmetric"], VSYM=vc["lut_symmetric"], kwords=klayout, vwords=vlayout,
        num_warps=1, **({"maxnreg": DECODE_TUNING["warp_maxnreg"]} if DECODE_TUNING["warp_maxnreg"] else {}),
    )


def _run_warp_kernel(qk, kgroup, vgroup, kp, vp, klay, vlay, kc, vc, valid, m, l_, acc, hkv, length, per_split, splits, scale_log2, g, d):
    from . import gluon_kernels as gk

    kcodes, vcodes = kp[kgroup.codes], vp[vgroup.codes]
    knorms, vnorms, krange, vrange, mk, smb, kn8, vn8 = _warp_common_args(qk, kgroup, vgroup, kp, vp, klay, vlay, valid)
    kbytes, vbytes = gk.byte_layouts(d)
    pairs = DECODE_TUNING["warp_key_pairs"]
    gk._tq_decode_warp_kernel[(m.shape[0], splits)](
        qk, qk.stride(0),
        kcodes, *kcodes.stride()[:3], knorms, *knorms.stride()[:3], kc["centroid_pairs" if pairs else "centroids_fp16"],
        vcodes, *vcodes.stride()[:3], vnorms, *vnorms.stride()[:3], vc["centroids_fp16"],
        krange, vrange, mk, smb, 0, m, l_, acc,
        hkv, length, per_split, scale_log2,
        G=g, D=d, HAS_MASK=valid is not None, KN8=kn8, VN8=vn8, PAIRS=pairs, kbytes=kbytes, vbytes=vbytes,
        num_warps=1,
    )


def _group_args(parts: Parts, groups: list[CodeGroup], lay) -> tuple[dict, dict]:
    """The decode kernel's arguments for groups 0 and 1 (group 0's again where there is no group 1): codes and
    norms with their [B, H, T] strides, and the constants bits B, padded width W, code bytes NB, planes PL, trellis
    state bits SB (0: Lloyd-Max codes)."""
    out = []
    for i in (0, 1):
        j = min(i, len(groups) - 1)
        group = groups[j]
        codes, norms = parts[group.codes], parts[group.norms]
        out.append({
            "args": (codes, *codes.stride()[:3], norms, *norms.stride()[:3]),
            "const": {"B": group.mse.bits, "W": lay.widths[j], "NB": group.code_bytes, "PL": lay.planes[j], "SB": group.state_bits},
        })
    return out[0], out[1]


def decode_bytes(b: int, hkv: int, length: int, key_codec, value_codec) -> int:
    """Bytes the decode kernel must read for `length` compressed tokens (codes, norms, signs)."""
    total = 0
    for codec in (key_codec, value_codec):
        for group in _groups(codec):
            total += group.code_bytes + (1 if group.norm_codes is not None else 2)
            if isinstance(group.quantizer, TurboQuantProd):
                total += group.head_dim / 8 + 2
    return int(b * hkv * length * total)

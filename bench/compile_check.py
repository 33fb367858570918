"""Compile the decode split kernel or the store kernel for sm_90 (H100/H200) without a GPU; print ptxas
registers, spills, shared memory.

    .venv/bin/python bench/compile_check.py [BLOCK_T,WARPS,STAGES,BITS[,D[,N8[,LUT[,GROUPS[,ROPE[,NORM_BIAS[,TRELLIS]]]]]]]] ...]   e.g. 32,4,3,4 32,4,3,4,128,1,0,2 32,4,3,4,128,1,0,1,1
    .venv/bin/python bench/compile_check.py store [PRECISION,BLOCK_R,WARPS,BITS[,D[,STAGES]] ...]   e.g. fp16x3,64,8,4,128,2
    .venv/bin/python bench/compile_check.py store-x16 [BLOCK_R,WARPS,STAGES,BITS[,D[,DTYPE[,N8[,LO[,F16X2[,CB[,TMA[,ASM_STORE]]]]]]]] ...]   e.g. 128,8,1,4,128,bf16,0,1,1,128,1,1
    .venv/bin/python bench/compile_check.py warp [D[,N8[,MASK[,G[,PAIRS]]]] ...]   e.g. 128,1,1,4,0 (the Gluon k4v4 gather kernel)
    .venv/bin/python bench/compile_check.py lut [D[,N8[,MASK[,G[,BT[,MAXNREG[,SYM[,I8[,TAU[,VI8[,BIAS[,NORM_BIAS]]]]]]]]]]]] ...]   e.g. 128,0,0,4,32,160,1,1,3,1 (the register-table kernel; I8: int8 keys; TAU: lazy rescaling; VI8: int8 values; BIAS: a dense score bias, 2: loaded a step ahead; NORM_BIAS: the score variance's)
    .venv/bin/python bench/compile_check.py lut-sass [the same] ...   its main loop's SASS per token step, per opcode (cuobjdump)
    .venv/bin/python bench/compile_check.py viterbi [BITS[,T[,WARPS]]] ...   e.g. 4,128,4 (the trellis encoder, `kernels/viterbi.py`)

Uses the ptxas that ships with Triton (for the Gluon kernel: shared memory 0 B and 0 barriers is the point). Integer arguments are specialized as on the B=8, Hkv=8, L=32k
bench shape (pointers and multiples of 16 marked divisible by 16, ones folded), so the pipelining
and vector widths match a real launch. Catches compile errors (the interpreter does not) and
register pressure / spills before spending device time.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tqpatch.kernels.groups import planes
from tqpatch.kernels import triton_kernels as tk

PTXAS = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas"))[0]


def _ptxas_report(k) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        r = subprocess.run([PTXAS, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"ptxas failed: {r.stderr[-2000:]}")
    return " ".join(line.split(":", 1)[-1].strip() for line in r.stderr.splitlines() if "Used" in line or "spill" in line)


def _compile(fn, const: dict, ints: dict, ptr_type, int_type, warps: int, stages: int = 1, source=ASTSource, maxnreg: int | None = None):
    """Compile `fn` for sm_90 with constexprs `const`, integer arguments typed by int_type(name) and specialized as
    `ints` (ones folded, multiples of 16 and pointers marked divisible by 16, as Triton does at launch), pointers
    typed by ptr_type(name)."""
    const = {**const, **{n: 1 for n, v in ints.items() if v == 1}}
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n.endswith("_ptr"):
            sig[n] = ptr_type(n)
        elif n in const:
            sig[n] = "constexpr"
        else:
            sig[n] = int_type(n)
        if n.endswith("_ptr") or ints.get(n, 1) % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(source(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {})))


def _store_ints(d: int, bits: int, model_layout: bool) -> dict:
    """Integer arguments of a store kernel launch on [8, 8, 32768, d] x ([B, T, H, d] memory if model_layout)."""
    t, nb = 32768, d * bits // 8
    x = dict(sxb=8 * t * d, sxh=d, sxt=8 * d) if model_layout else dict(sxb=8 * t * d, sxh=t * d, sxt=d)
    return dict(**x, H=8, T=t, R=64 * t, scb=8 * t * nb, sch=t * nb, sct=nb, snb=8 * t, snh=t, snt=1)


def compile_viterbi(bits: int, t: int = 128, warps: int = 4) -> str:
    """The trellis encoder as launched on N = 16,384 vectors of t coordinates."""
    from tqpatch.kernels import viterbi
    from tqpatch.trellis import TRELLIS_STATE_BITS

    const = dict(T=t, BITS=bits, SBITS=TRELLIS_STATE_BITS[bits], V=viterbi.VECTORS)
    ptr_types = {"y_ptr": "*fp32", "lut_sq_ptr": "*fp32", "lut_m2_ptr": "*fp32", "choice_ptr": "*i8", "codes_ptr": "*u8"}
    k = _compile(viterbi._viterbi_kernel, const, dict(N=16384), ptr_types.get, lambda n: "i32", warps)
    return f"viterbi bits={bits} T={t} warps={warps}: shared {k.metadata.shared} B; {_ptxas_report(k)}"


def compile_store(precision: str, block_r: int, warps: int, bits: int, d: int = 128, stages: int = 1) -> str:
    """The store kernel as launched for a contiguous [8, 8, 32768, d] bf16 input (mse codes, word stores)."""
    t, nb = 32768, d * bits // 8
    ints = dict(_store_ints(d, bits, False), sgb=8 * t * nb, sgh=t * nb, sgt=nb, srb=8 * t, srh=t, srt=1)
    const = dict(D=d, MB=bits, PROD=False, BLOCK_R=block_r, BN=d if d <= 128 else 64, PREC=precision, WORD=bits in (2, 4), NORM8=False)
    ptr_types = {"x_ptr": "*bf16", "rhi_ptr": "*fp16", "rlo_ptr": "*fp16", "c_ptr": "*u8", "g_ptr": "*u8", "n_ptr": "*fp16", "r_ptr": "*fp16"}
    k = _compile(tk._tq_store_kernel, const, ints, lambda n: ptr_types.get(n, "*fp32"), lambda n: "i32" if n in ("H", "T", "R") else "i64", warps, stages)
    return f"store precision={precision} block_r={block_r} warps={warps} stages={stages} bits={bits} d={d}: shared {k.metadata.shared} B; {_ptxas_report(k)}"


def compile_store_x16(block_r: int, warps: int, stages: int, bits: int, d: int = 128, dtype: str = "bf16", n8: int = 0, lo: int = 1,
                      f16x2: int = 1, cb: int = 64, tma: int = 1, asm_store: int = 1) -> str:
    """The x16 store kernel as launched for the model's [8, 32768, 8, d] layout of x (bf16 or fp16), mse codes."""
    const = dict(D=d, MB=bits, BLOCK_R=block_r, SCALE=1.0 if dtype == "bf16" else 4096.0, NORM8=bool(n8), LO=bool(lo), F16X2=bool(f16x2), CBMAX=cb, TMA=bool(tma), ASM_STORE=bool(asm_store))
    ptr_types = {"x_ptr": f"*{dtype}", "rhi_ptr": f"*{dtype}", "rlo_ptr": f"*{dtype}", "bnd16_ptr": "*i32", "c_ptr": "*u8", "n_ptr": "*u8" if n8 else "*fp16"}
    x_desc = f"tensordesc<{dtype}[1, 1, {block_r}, {d}]>" if tma else f"*{dtype}"
    k = _compile(tk._tq_store_x16_kernel, const, _store_ints(d, bits, True), lambda n: ptr_types.get(n, "*fp32"),
                 lambda n: x_desc if n == "x_desc" else "i32" if n in ("H", "T", "R") else "i64", warps, stages)
    return (f"store x16 block_r={block_r} warps={warps} stages={stages} bits={bits} d={d} {dtype}{' 8-bit norms' if n8 else ''}"
            f"{'' if lo else ' hi only'}{' f16x2' if f16x2 else ' f32'} quantizer, {min(d, cb)}-column blocks{', TMA' if tma else ''}{', asm stores' if asm_store else ''}: shared {k.metadata.shared} B; {_ptxas_report(k)}")


def compile_warp(d: int = 128, n8: int = 0, mask: int = 0, g: int = 4, pairs: int = 1) -> str:
    """The Gluon warp decode kernel (one warp per program) at the B=8, Hkv=8, L=32k bench shape, k4v4 codes."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from tqpatch.kernels import gluon_kernels as gk

    length, nb = 32768, d // 2
    ints = dict(sqk=d, skcb=8 * length * nb, skch=length * nb, skct=nb, sknb=8 * length, sknh=length, sknt=1, svcb=8 * length * nb,
                svch=length * nb, svct=nb, svnb=8 * length, svnh=length, svnt=1, smb=0, mask_off=0, Hkv=8, L=length, per_split=512)
    kbytes, vbytes = gk.byte_layouts(d)
    const = dict(G=g, D=d, HAS_MASK=bool(mask), KN8=bool(n8), VN8=bool(n8), PAIRS=bool(pairs), kbytes=kbytes, vbytes=vbytes)
    fp32 = ("qk_ptr", "m_ptr", "l_ptr", "acc_ptr", "krange_ptr", "vrange_ptr")
    fp16 = ("vcent_ptr",) + (() if pairs else ("kcent_ptr",)) + (() if n8 else ("kn_ptr", "vn_ptr"))
    ptr_type = lambda n: "*fp32" if n in fp32 else "*fp16" if n in fp16 else "*i32" if n == "kcent_ptr" else "*u8"  # noqa: E731
    int_type = lambda n: "fp32" if n == "scale_log2" else "i64" if n.startswith("s") else "i32"  # noqa: E731
    k = _compile(gk._tq_decode_warp_kernel, const, ints, ptr_type, int_type, 1, source=GluonASTSource)
    return (f"warp d={d} G={g}{' 8-bit norms' if n8 else ''}{' mask' if mask else ''}{' key pairs' if pairs else ''}: "
            f"shared {k.metadata.shared} B; {_ptxas_report(k)}")


def build_lut(d: int = 128, n8: int = 0, mask: int = 0, g: int = 4, bt: int = 32, maxnreg: int = 160, sym: int = 1, i8: int = 0, tau: int = 0, vi8: int = 0,
              bias: int = 0, norm_bias: int = 0):
    """The Gluon register-table decode kernel compiled at the B=8, Hkv=8, L=32k bench shape, k4v4 codes read as int32 words."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from tqpatch.kernels import gluon_kernels as gk

    length, nw = 32768, d // 8
    ints = dict(sqk=d, skcb=8 * length * nw, skch=length * nw, skct=nw, sknb=8 * length, sknh=length, sknt=1, svcb=8 * length * nw,
                svch=length * nw, svct=nw, svnb=8 * length, svnh=length, svnt=1, smb=0, mask_off=0, skb=length, Hkv=8, L=length, per_split=512)
    kwords, vwords = gk.word_layouts(d, bt)
    const = dict(G=g, D=d, HAS_MASK=bool(mask), KN8=bool(n8), VN8=bool(n8), BT=bt, KSYM=bool(sym), VSYM=bool(sym), KI8=i8, VI8=vi8, TAU=tau, HAS_BIAS=bool(bias), BIAS_AHEAD=bias == 2,
                 HAS_NORM_BIAS=bool(norm_bias), kwords=kwords, vwords=vwords)
    fp32 = ("qk_ptr", "m_ptr", "l_ptr", "acc_ptr", "krange_ptr", "vrange_ptr", "kbias_ptr", "nb_ptr")
    i32 = ("kc_ptr", "vc_ptr", "ktab_ptr", "vtab_ptr")
    ptr_type = lambda n: "*fp32" if n in fp32 else "*i32" if n in i32 else "*fp16" if n in ("kn_ptr", "vn_ptr") and not n8 else "*u8"  # noqa: E731
    int_type = lambda n: "fp32" if n in ("scale_log2", "ktab_scale", "vtab_scale") else "i64" if n.startswith("s") else "i32"  # noqa: E731
    return _compile(gk._tq_decode_lut_kernel, const, ints, ptr_type, int_type, 1, source=GluonASTSource, maxnreg=maxnreg or None)


def compile_lut(d: int = 128, n8: int = 0, mask: int = 0, g: int = 4, bt: int = 32, maxnreg: int = 160, sym: int = 1, i8: int = 0, tau: int = 0, vi8: int = 0,
                bias: int = 0, norm_bias: int = 0) -> str:
    """`build_lut`'s ptxas report (registers, spills)."""
    k = build_lut(d, n8, mask, g, bt, maxnreg, sym, i8, tau, vi8, bias, norm_bias)
    return (f"lut d={d} G={g} tokens/step={bt}{' 8-bit norms' if n8 else ''}{' mask' if mask else ''}{' symmetric' if sym else ' general'} PTX"
            f"{f' maxnreg={maxnreg}' if maxnreg else ''}{f' int8 keys ({i8})' if i8 else ''}{' int8 values' if vi8 else ''}{f' lazy rescale {tau}' if tau else ''}{' bias' if bias else ''}{' norm bias' if norm_bias else ''}: shared {k.metadata.shared} B; {_ptxas_report(k)}")


def sass_loop_counts(k) -> tuple[int, dict[str, int]]:
    """The SASS of a compiled kernel's main loop (from the last backward branch's target to the branch, by cuobjdump):
    its instruction count and the count per opcode (modifiers dropped), e.g. the LUT kernel's work per token step."""
    import collections
    import re

    line = re.compile(r"\s*/\*([0-9a-f]{4})\*/\s*(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        subprocess.run([PTXAS, "-arch=sm_90a", ptx, "-o", cubin], check=True, capture_output=True)
        sass = subprocess.run([os.path.join(os.path.dirname(PTXAS), "cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    code = [(int(m[1], 16), m[2], text) for text in sass.splitlines() if (m := line.match(text))]
    loops = [(int(b[1], 16), addr) for addr, op, text in code if op == "BRA" and (b := re.search(r"BRA\s+0x([0-9a-f]+)", text)) and int(b[1], 16) < addr]
    start, end = loops[-1]
    body = [op for addr, op, _ in code if start <= addr <= end]
    return len(body), dict(collections.Counter(body).most_common())


def compile_split(block_t: int, warps: int, stages: int, bits: int, d: int = 128, n8: int = 0, lut: int = 0, groups: int = 1, rope: int = 0,
                  norm_bias: int = 0, trellis: int = 0) -> str:
    """The decode split kernel at the B=8, Hkv=8, L=32k bench shape: keys and values of `bits` bits, as one code
    group per vector or (groups=2) two equal halves (a split codec's layout); rope=1 adds the RoPE-position bias (2: in tf32);
    norm_bias=1 the score variance's per-group norm bias; trellis=1 trellis codes (read by window, natural order)."""
    from tqpatch.trellis import TRELLIS_STATE_BITS

    fn = tk._tq_decode_split_kernel
    length = 32768
    width = d // groups
    nb = width * bits // 8
    strides = {}
    for side in ("k", "v"):
        for i in range(2):
            strides.update({f"s{side}c{i}b": 8 * length * nb, f"s{side}c{i}h": length * nb, f"s{side}c{i}t": nb,
                            f"s{side}n{i}b": 8 * length, f"s{side}n{i}h": length, f"s{side}n{i}t": 1})
    ints = dict(sqr=d, skgb=8 * length * d // 8, skgh=length * d // 8, skgt=d // 8, skrb=8 * length, skrh=length, skrt=1,
                smb=0, mask_off=0, skb=0, src=d, srt=2 * d, Hkv=8, L=length, per_split=1024, **strides)
    sb = TRELLIS_STATE_BITS[bits] if trellis else 0
    pl = 1 if trellis else planes(width, bits)
    slots = max(16, 1 << (bits + sb))
    const = dict(G=4, GP=16, D=d, AW=d, PROD=False, HAS_MASK=False, HAS_BIAS=False, HAS_ROPE=bool(rope), ROPE_PREC="tf32x3" if rope != 2 else "tf32",
                 HAS_NORM_BIAS=bool(norm_bias), BLOCK_T=block_t, LUT=lut,
                 KN8=bool(n8), VN8=bool(n8), KG=groups, VG=groups, KCS=slots, VCS=slots)
    for side in ("K", "V"):
        for i in range(2):
            const.update({f"{side}B{i}": bits, f"{side}W{i}": width, f"{side}NB{i}": nb, f"{side}PL{i}": pl, f"{side}SB{i}": sb})
    fp16 = ("kr_ptr", "kcent_ptr", "vcent_ptr") + (() if n8 else ("kn0_ptr", "kn1_ptr", "vn0_ptr", "vn1_ptr"))
    fp32 = ("qr_ptr", "m_ptr", "l_ptr", "acc_ptr", "krange_ptr", "vrange_ptr", "kbias_ptr", "rc_ptr", "rt_ptr", "nb_ptr")
    ptr_type = lambda n: "*fp32" if n in fp32 else "*fp16" if n in fp16 else "*u8"  # noqa: E731
    int_type = lambda n: "fp32" if n in ("scale_log2", "qjl_scale", "rope_log2") else "i64" if n.startswith("s") else "i32"  # noqa: E731
    k = _compile(fn, const, ints, ptr_type, int_type, warps, stages)
    report = _ptxas_report(k)
    return (f"block_t={block_t} warps={warps} stages={stages} bits={bits} groups={groups} planes={pl}{' 8-bit norms' if n8 else ''} "
            f"lut={lut}{' rope bias' if rope else ''}{' norm bias' if norm_bias else ''}{' trellis' if trellis else ''}: shared {k.metadata.shared} B; {report}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["viterbi"]:
        for spec in sys.argv[2:] or ["1,128", "2,128", "4,128", "6,64"]:
            print(compile_viterbi(*map(int, spec.split(","))), flush=True)
    elif sys.argv[1:2] == ["lut-sass"]:
        for spec in sys.argv[2:] or ["128,0,0,4,32,160,1,1,0,1"]:
            n, ops = sass_loop_counts(build_lut(*map(int, spec.split(","))))
            print(f"lut {spec}: {n} SASS instructions per loop step; " + ", ".join(f"{op} {c}" for op, c in ops.items()), flush=True)
    elif sys.argv[1:2] == ["lut"]:
        for spec in sys.argv[2:] or ["128", "128,0,0,4,16,144", "128,1,1,8,32,168,0", "64,0,1,5"]:
            print(compile_lut(*map(int, spec.split(","))), flush=True)
    elif sys.argv[1:2] == ["warp"]:
        for spec in sys.argv[2:] or ["128", "128,1,1,4,0", "64,0,1,8"]:
            print(compile_warp(*map(int, spec.split(","))), flush=True)
    elif sys.argv[1:2] == ["store-x16"]:
        for spec in sys.argv[2:] or ["64,4,2,4", "128,8,2,4", "64,4,2,2,64", "64,4,2,3,32,fp16,1", "64,4,2,4,128,bf16,0,0"]:
            block_r, warps, stages, bits, *rest = spec.split(",")
            extra = [int(rest[0])] if rest else []
            extra += rest[1:2] + [int(v) for v in rest[2:]]
            print(compile_store_x16(int(block_r), int(warps), int(stages), int(bits), *extra), flush=True)
    elif sys.argv[1:2] == ["store"]:
        for spec in sys.argv[2:] or ["fp16x3,64,8,4", "tf32x3,64,8,4", "fp16x3,64,4,4", "fp16x3,128,8,4", "fp16x3,64,8,2"]:
            precision, *numbers = spec.split(",")
            print(compile_store(precision, *map(int, numbers)), flush=True)
    else:
        for spec in sys.argv[1:] or ["32,4,3,4", "32,4,3,2", "32,4,3,3", "32,4,3,4,128,1,0,2", "32,4,3,4,128,1,0,1,1"]:
            print(compile_split(*map(int, spec.split(","))), flush=True)

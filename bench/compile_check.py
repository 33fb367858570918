"""Compile the decode split kernel for sm_90 (H100/H200) without a GPU; print ptxas registers, spills, shared memory.

    .venv/bin/python bench/compile_check.py [BLOCK_T,WARPS,STAGES,BITS ...]   e.g. 32,4,3,4 64,8,2,2

Uses the ptxas that ships with Triton. Integer arguments are specialized as on the B=8, Hkv=8, L=32k
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

from tqpatch.kernels import decode_planes
from tqpatch.kernels import triton_kernels as tk

PTXAS = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas"))[0]


def compile_split(block_t: int, warps: int, stages: int, bits: int, d: int = 128) -> str:
    fn = tk._tq_decode_split_kernel
    nb, length = d * bits // 8, 32768
    ints = dict(sqr=d, skcb=8 * length * nb, skch=length * nb, skct=nb, sknb=8 * length, sknh=length, sknt=1, skgb=8 * length * d // 8,
                skgh=length * d // 8, skgt=d // 8, skrb=8 * length, skrh=length, skrt=1, svcb=8 * length * nb, svch=length * nb, svct=nb,
                svnb=8 * length, svnh=length, svnt=1, smb=0, mask_off=0, Hkv=8, L=length, per_split=1024)
    planes = decode_planes(d, bits)
    const = dict(G=4, GP=16, D=d, KB=bits, VB=bits, PROD=False, HAS_MASK=False, BLOCK_T=block_t, KPL=planes, VPL=planes, LUT=0)
    const.update({n: 1 for n, v in ints.items() if v == 1})
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n.endswith("_ptr"):
            sig[n] = "*fp32" if n in ("qr_ptr", "m_ptr", "l_ptr", "acc_ptr") else "*fp16" if n in ("kn_ptr", "vn_ptr", "kr_ptr", "kcent_ptr", "vcent_ptr") else "*u8"
        elif n in const:
            sig[n] = "constexpr"
        else:
            sig[n] = "fp32" if n in ("scale_log2", "qjl_scale") else "i64" if n.startswith("s") else "i32"
        if n.endswith("_ptr") or ints.get(n, 1) % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        r = subprocess.run([PTXAS, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    report = " ".join(line.split(":", 1)[-1].strip() for line in r.stderr.splitlines() if "Used" in line or "spill" in line)
    return f"block_t={block_t} warps={warps} stages={stages} bits={bits} planes={planes}: shared {k.metadata.shared} B; {report}"


if __name__ == "__main__":
    for spec in sys.argv[1:] or ["32,4,3,4", "32,4,3,2", "32,4,3,3"]:
        print(compile_split(*map(int, spec.split(","))), flush=True)

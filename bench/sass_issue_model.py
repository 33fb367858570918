"""How many cycles one warp needs to issue the x16 store kernel's loop, from its sm_90 SASS (no GPU needed).

    .venv/bin/python bench/sass_issue_model.py [MAXNREG[,STAGES] ...]   e.g. 0,3 168,3 168,4   (0: no register cap)

Compiles `_tq_store_x16_kernel` as the bench launches it (`compile_check.compile_store_x16`'s shape: bf16 x in the
model's layout, d 128, 4-bit codes, Πᵀ's hi part alone, 64-row tiles on 4 warps), disassembles it with the cuobjdump
that ships with Triton and walks the loop body (first HGMMA to the backward branch) in order: an instruction issues
one cycle after the one before it, or when the registers and predicates it reads are ready, whichever is later; a
result is ready a fixed latency after issue (LATENCY; 5 cycles otherwise). The MMA, memory and barriers are taken as
free, so this is the latency floor of the quantizer and norm code alone: cycles per instruction near 1 mean a single
warp could issue back to back; what is above 1 compares with ncu's "wait" stall per issued instruction. Run 58's code
at 96 registers: model 1.41, ncu 1.51; run 63's code at 168 registers and 4 stages: model 0.35, ncu 0.88 (the model
leaves out the MMA's and the loads' latencies).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
import compile_check as cc  # noqa: E402  (bench/ is not a package)

from tqpatch.kernels import triton_kernels as tk  # noqa: E402

LATENCY = {"MUFU": 18, "SHFL": 24, "F2FP": 6, "HSET2": 6, "R2UR": 6}
INSTRUCTION = re.compile(r"\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)(\.[A-Z0-9_.]+)?\s*([^;]*);")


def store_sass(maxnreg: int | None, stages: int) -> tuple[str, str]:
    """(ptxas report, SASS text) of the x16-hi store kernel at 64 rows, 4 warps, `stages`, register cap `maxnreg`."""
    d, bits, block_r = 128, 4, 64
    const = dict(D=d, MB=bits, BLOCK_R=block_r, SCALE=1.0, NORM8=False, LO=False, F16X2=True, CBMAX=128, TMA=True, ASM_STORE=True)
    ptr_types = {"x_ptr": "*bf16", "rhi_ptr": "*bf16", "rlo_ptr": "*bf16", "bnd16_ptr": "*i32", "c_ptr": "*u8", "n_ptr": "*fp16"}
    x_desc = f"tensordesc<bf16[1, 1, {block_r}, {d}]>"
    k = cc._compile(tk._tq_store_x16_kernel, const, cc._store_ints(d, bits, True), lambda n: ptr_types.get(n, "*fp32"),
                    lambda n: x_desc if n == "x_desc" else "i32" if n in ("H", "T", "R") else "i64", 4, stages, maxnreg=maxnreg)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        report = subprocess.run([cc.PTXAS, "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(os.path.dirname(cc.PTXAS), "cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return " ".join(line.split(":", 1)[-1].strip() for line in report.splitlines() if "Used" in line), sass


def issue_cycles(sass: str) -> tuple[int, int]:
    """(instructions, cycles) for one warp to issue the loop body of `sass` in order (see the module docstring)."""
    body = [(m.group(2), m.group(4), m.group(1)) for m in map(INSTRUCTION.search, sass.splitlines()) if m]
    ops = [op for op, _, _ in body]
    start = ops.index("HGMMA")
    end = max(i for i, op in enumerate(ops) if op == "BRA" and i > start)
    ready: dict[str, int] = {}
    cycle = 0
    for op, args, pred in body[start:end]:
        regs = re.findall(r"\b(U?R\d+|U?P\d)\b", args)
        written, read = ([], regs) if op == "STG" else (regs[:1], regs[1:])
        if pred:
            read.append(pred.strip().lstrip("@!"))
        cycle = max([cycle + 1] + [ready.get(r, 0) for r in read])
        for r in written:
            ready[r] = cycle + LATENCY.get(op, 5)
    return end - start, cycle


if __name__ == "__main__":
    for spec in sys.argv[1:] or ["0,3", "168,3", "168,4"]:
        maxnreg, stages = (list(map(int, spec.split(","))) + [3])[:2]
        report, sass = store_sass(maxnreg or None, stages)
        n, cycles = issue_cycles(sass)
        print(f"maxnreg={maxnreg or None} stages={stages}: {report}; loop {n} instructions, {cycles} cycles for one warp "
              f"({cycles / n:.2f} per instruction)")

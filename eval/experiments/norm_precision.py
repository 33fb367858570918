"""python norm_precision.py eval ppl ... --settings k4v4-n8m1: how precise 8-bit norms (`-n8[m<octaves>]`) are in use.

Records, for every `LogNormQuantizer.encode` call of the run (all settings together: run one setting per call), the
relative error of the decoded norms and how many were clamped to the range's ends, and prints the RMS and largest
relative error and the clamp rate at exit (to stderr).
"""
import atexit
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
norms = importlib.import_module("tqpatch.norms")
totals = {"count": 0, "clamped": 0, "sq_rel_error": 0.0, "max_rel_error": 0.0}
original_encode = norms.LogNormQuantizer.encode


def encode(self, values: torch.Tensor) -> torch.Tensor:
    codes = original_encode(self, values)
    nonzero = values > 0
    rel = (self.decode(codes) / values.float().clamp_min(1e-30) - 1)[nonzero]
    totals["count"] += int(nonzero.sum())
    totals["clamped"] += int(((codes == 1) | (codes == self.LEVELS))[nonzero].sum())
    totals["sq_rel_error"] += float((rel**2).sum())
    totals["max_rel_error"] = max(totals["max_rel_error"], float(rel.abs().max())) if rel.numel() else totals["max_rel_error"]
    return codes


def report() -> None:
    n = max(totals["count"], 1)
    print(f"norm codes: {totals['count']} norms encoded, RMS relative error "
          f"{(totals['sq_rel_error'] / n) ** 0.5:.4%}, max {totals['max_rel_error']:.2%}, clamped {totals['clamped'] / n:.4%}",
          file=sys.stderr)


norms.LogNormQuantizer.encode = encode
atexit.register(report)
sys.argv = ["tqpatch"] + sys.argv[1:]
from cli.main import main

main()

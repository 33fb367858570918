"""Oracle: keep a fraction of key tokens exact, chosen per (chunk, head) by quantization error (or at random).
Usage: FRAC=0.03 MODE=err python outlier_tokens.py eval ppl ...   (bits reported are NOT corrected)"""
import importlib
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
P = importlib.import_module("tqpatch.patch")  # the module (tqpatch.patch is also a function)

FRAC = float(os.environ.get("FRAC", "0.03"))
MODE = os.environ.get("MODE", "err")
STATS = {"flag": 0, "total": 0}

class TokenOutlierKeys:
    def __init__(self, inner):
        self.inner = inner
    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)
    def _enc(self, x, fi):
        return self.inner.encode(x, fi) if getattr(self.inner, "uses_positions", False) else self.inner.encode(x)
    def _dec(self, parts, dtype, fi):
        return self.inner.decode(parts, dtype, fi) if getattr(self.inner, "uses_positions", False) else self.inner.decode(parts, dtype)
    def encode(self, x, first_index=0):
        parts = self._enc(x, first_index)
        rec = self._dec(parts, torch.float32, first_index)
        B, H, T, _ = x.shape
        k = max(1, math.floor(FRAC * T + 0.5)) if FRAC > 0 else 0
        flag = torch.zeros(B, H, T, 1, dtype=torch.bool)
        if k:
            if MODE == "err":
                score = (rec - x.float()).norm(dim=-1)
            elif MODE == "norm":
                score = x.float().norm(dim=-1)
            else:
                score = torch.rand(B, H, T)
            idx = score.topk(min(k, T), dim=-1).indices
            flag.scatter_(2, idx[..., None], True)
        STATS["flag"] += int(flag.sum()); STATS["total"] += flag.numel()
        parts = dict(parts)
        parts["exact"] = x.to(torch.float16)
        parts["flag"] = flag
        return parts
    def decode(self, parts, dtype, first_index=0):
        inner_parts = {n: t for n, t in parts.items() if n not in ("exact", "flag")}
        base = self._dec(inner_parts, torch.float32, first_index)
        return torch.where(parts["flag"], parts["exact"].float(), base).to(dtype)

_orig = P.make_codec
_count = [0]
def make_codec(*a, **kw):
    c = _orig(*a, **kw)
    _count[0] += 1
    return TokenOutlierKeys(c) if _count[0] % 2 == 1 else c   # key codec is made first in make_layer
P.make_codec = make_codec

import atexit

atexit.register(lambda: print(f"[oracle] MODE={MODE} FRAC={FRAC} flagged {STATS['flag']}/{STATS['total']} = {STATS['flag']/max(STATS['total'],1):.4f}", flush=True))
sys.argv = ["tqpatch"] + sys.argv[1:]
from cli.main import main

main()

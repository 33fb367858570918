"""Offline: the inner products ⟨q, x̃⟩ of TurboQuant_mse, of TurboQuant_mse decoded unbiased (centroids / (1 − D),
`TurboQuantMSE(unbiased=True)`) and of TurboQuant_prod, on random unit vectors x at d 128 with a fixed query q
(‖q‖ = √d, so ⟨q, x⟩ has unit variance): the slope of the estimate on the exact product (1 = unbiased) and the
variance of its error. Usage: .venv/bin/python eval/experiments/unbiased_scores.py"""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
from tqpatch import TurboQuantMSE, TurboQuantProd

D, N = 128, 20_000
x = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
x = x / x.norm(dim=-1, keepdim=True)
q = torch.randn(D, generator=torch.Generator().manual_seed(2))
q = q / q.norm() * math.sqrt(D)
exact = x @ q
print("bits | quantizer | slope of estimate on exact | error variance")
for bits in (2, 3, 4):
    for name, quantizer in (("mse", TurboQuantMSE(D, bits, 5, torch.float32)),
                            ("mse, unbiased", TurboQuantMSE(D, bits, 5, torch.float32, unbiased=True)),
                            ("prod", TurboQuantProd(D, bits, 5, torch.float32))):
        estimate = quantizer.dequantize(quantizer.quantize(x)) @ q
        slope = (estimate * exact).sum() / (exact * exact).sum()
        print(f"{bits} | {name} | {slope.item():.4f} | {(estimate - exact).var().item():.4f}")

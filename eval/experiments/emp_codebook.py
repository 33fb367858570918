"""Offline: Lloyd-Max codebooks fitted to real rotated SmolLM2 key/value coordinates (calibration text, tokens
100,000+) vs the theoretical density's codebook: MSE on held-out tokens of the same text and on the test text."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
from tqpatch.eval import data
from transformers import DynamicCache

from tqpatch.models import load_model
from tqpatch.quantizer import TurboQuantMSE

model, tok = load_model("smollm2")
text = data.read_text_file(data.default_text_file())
all_ids = tok(text, add_special_tokens=False).input_ids
def kv(ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([ids]), past_key_values=cache)
    return cache
cal, test = kv(all_ids[100000:102048]), kv(all_ids[:2048])
def rotated_units(cache, which, q, center):
    out = []
    for layer in cache.layers:
        t = getattr(layer, which)[0, :, 4:].float()  # [H, T, d], sinks out
        if center:
            t = t - t[:, :32].mean(1, keepdim=True)
        u = t / t.norm(dim=-1, keepdim=True)
        out.append(q.rotate(u).reshape(-1))
    return torch.cat(out)
def lloyd(samples, cent, iters=60):
    c = cent.clone()
    for _ in range(iters):
        bnd = (c[1:] + c[:-1]) / 2
        idx = torch.bucketize(samples, bnd)
        sums = torch.zeros_like(c).index_add_(0, idx, samples); cnt = torch.zeros_like(c).index_add_(0, idx, torch.ones_like(samples))
        c = torch.where(cnt > 0, sums / cnt.clamp_min(1), c)
    return c
def mse(samples, cent):
    bnd = (cent[1:] + cent[:-1]) / 2
    return ((cent[torch.bucketize(samples, bnd)] - samples) ** 2).mean().item()
for which in ("keys", "values"):
    for bits in (2, 3, 4):
        q = TurboQuantMSE(64, bits, seed=0)
        theo = q.centroids("cpu").double()
        s_cal = rotated_units(cal, which, q, which == "keys").double()
        s_test = rotated_units(test, which, q, which == "keys").double()
        emp = lloyd(s_cal[torch.randperm(len(s_cal))[:2_000_000]], theo)
        a, b = mse(s_test, theo), mse(s_test, emp)
        print(f"{which} {bits}-bit: test MSE theoretical {a*64:.5f}, empirical {b*64:.5f} (x d): {10*torch.log10(torch.tensor(a/b)).item():+.2f} dB; kurtosis {((s_test**4).mean()/(s_test**2).mean()**2).item():.2f} (Gaussian 3)", flush=True)

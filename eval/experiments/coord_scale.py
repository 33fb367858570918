"""Offline: per-rotated-coordinate variance spread of real SmolLM2 keys/values and the MSE gain of scaling each
rotated coordinate to unit variance before the Lloyd-Max codebook (scales from the first C tokens)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
from tqpatch.eval import data
from transformers import DynamicCache

from tqpatch.models import load_model
from tqpatch.quantizer import TurboQuantMSE

torch.manual_seed(0)
model, tok = load_model("smollm2")
text = data.read_text_file(data.default_text_file())
ids = tok(text, add_special_tokens=False).input_ids[100000:102048]
cache = DynamicCache(config=model.config)
with torch.no_grad():
    model(torch.tensor([ids]), past_key_values=cache)
CAL = int(sys.argv[1]) if len(sys.argv) > 1 else 32
def mse(x, q, scale):
    # x: [T, d] unit vectors; rotate, scale, quantize with the codebook, unscale, compare in rotated space
    y = q.rotate(x)
    ys = y / scale
    bnd = q._constants(x.device)[2]; cent = q.centroids(x.device)
    yh = cent[torch.bucketize(ys, bnd)] * scale
    return ((yh - y) ** 2).sum(-1).mean().item()
for which in ("keys", "values"):
    for bits in (2, 4):
        q = TurboQuantMSE(64, bits, seed=0)
        gains, spreads = [], []
        for li, layer in enumerate(cache.layers):
            t = getattr(layer, which)[0]  # [H, T, d]
            for h in range(t.shape[0]):
                x = t[h, 4:].float()
                if which == "keys":
                    x = x - x[:CAL].mean(0)  # crude centering (post-RoPE) just for the spread
                u = x / x.norm(dim=-1, keepdim=True)
                y = q.rotate(u)
                var = (y[:CAL] ** 2).mean(0)
                scale = (var * 64).sqrt().clamp_min(1e-3)
                scale = scale / scale.pow(2).mean().sqrt()  # mean-square 1
                ev = u[CAL:]
                base, scaled = mse(ev, q, torch.ones(64)), mse(ev, q, scale)
                gains.append(10 * torch.log10(torch.tensor(base / scaled)).item())
                spreads.append(((q.rotate(ev) ** 2).mean(0) * 64).std().item())
        g = torch.tensor(gains)
        print(f"{which} {bits}-bit: per-coordinate scaling gain mean {g.mean():.2f} dB (min {g.min():.2f}, max {g.max():.2f}); coordinate variance rel. spread {torch.tensor(spreads).mean():.2f}", flush=True)

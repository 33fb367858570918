"""Offline oracle: how much score (keys) or output (values) error shaping and a two-level eigen split could remove.

For one layer and KV head, with W the error metric (keys: E[q qᵀ] of the group's post-RoPE queries; values:
Σ_h W_o,hᵀ W_o,h of the o_proj blocks that read the head) and S the second moment of the stored vectors
(keys centered), let λ be the eigenvalues of W^½ S W^½ (descending). With c(b) the Lloyd-Max Gaussian distortion
at b bits, the weighted error is, relative to plain TurboQuant (c(b) tr W tr S / d):
    shaping:      c(b) (Σ √λ)² / d
    eigen split:  c(hi) Σ_{i<m} λ_i + c(lo) Σ_{i>=m} λ_i,  m = d (b - lo) / (hi - lo), best (hi, lo)
Moments from all 1,020 tokens (exact) and, for values, shaping fitted on 32 tokens (what a first chunk gives).

    .venv/bin/python eval/experiments/eigen_split_oracle.py [smollm2|gemma3-270m]
"""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
import transformers.models.gemma3.modeling_gemma3 as gemma3
import transformers.models.llama.modeling_llama as llama

from tqpatch.eval import data
from tqpatch.models import load_model
from tqpatch.shaping import _shrunk, shaping_gain, shaping_transform

DISTORTION = {0: 1.0, 1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497, 5: 0.002499, 6: 0.000642, 7: 0.000163, 8: 0.0000411}

model, tok = load_model(sys.argv[1] if len(sys.argv) > 1 else "smollm2")
ids = tok(data.read_text_file(data.default_text_file()), return_tensors="pt").input_ids[:, 4000:5024]
cfg = model.config
hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
captured, values = [], {}
for module in (llama, gemma3):  # post-RoPE queries and keys, [H, T, d] per layer
    original = module.apply_rotary_pos_emb

    def capture(q, k, cos, sin, *args, original=original, **kwargs):
        q, k = original(q, k, cos, sin, *args, **kwargs)
        captured.append((q.detach()[0].double(), k.detach()[0].double()))
        return q, k

    module.apply_rotary_pos_emb = capture
for i, layer in enumerate(model.model.layers):
    layer.self_attn.v_proj.register_forward_hook(
        lambda m, a, out, i=i: values.__setitem__(i, out.detach()[0].double().view(-1, hkv, d).transpose(0, 1)))
with torch.no_grad():
    model(ids)


def sqrtm(m):
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def gains_db(w, s, bits):
    """(shaping, best eigen split, its (hi, lo, m)) in dB against plain TurboQuant at `bits`."""
    base = torch.trace(w) * torch.trace(s) / d * DISTORTION[bits]
    wh = sqrtm(w)
    lam = torch.linalg.eigvalsh(wh @ s @ wh).clamp_min(0).flip(0)
    shaping = lam.sqrt().sum() ** 2 / d * DISTORTION[bits]
    best, choice = base, None
    for hi in range(bits + 1, 9):
        for lo in range(0, bits):
            m = d * (bits - lo) / (hi - lo)
            if m == int(m) and 0 < m < d:
                err = DISTORTION[hi] * lam[: int(m)].sum() + DISTORTION[lo] * lam[int(m):].sum()
                if err < best:
                    best, choice = err, (hi, lo, int(m))
    db = lambda e: 10 * math.log10(e / base)  # noqa: E731
    return db(shaping), db(best), choice


for bits in (4, 2):
    keys, vals = [], []
    for i, layer in enumerate(model.model.layers):
        q, k = captured[i]
        k = k - k[:, 4:].mean(1, keepdim=True)  # centered (post-RoPE mean: close enough for an estimate)
        wo = layer.self_attn.o_proj.weight.detach().double().view(-1, hkv, hq // hkv, d)
        for h in range(hkv):
            qs = q[h * (hq // hkv):(h + 1) * (hq // hkv), 4:].reshape(-1, d)
            keys.append(gains_db(qs.T @ qs / len(qs), k[h, 4:].T @ k[h, 4:] / (k.shape[1] - 4), bits))
            v = values[i][h, 4:]
            vals.append(gains_db(torch.einsum("ngi,ngj->ij", wo[:, h], wo[:, h]), v.T @ v / len(v), bits))
    mean = lambda rows, j: sum(r[j] for r in rows) / len(rows)  # noqa: E731
    print(f"{bits} bits: keys shaping {mean(keys, 0):+.2f} dB, eigen split {mean(keys, 1):+.2f} dB; "
          f"values shaping {mean(vals, 0):+.2f} dB, eigen split {mean(vals, 1):+.2f} dB")

# values shaped by o_proj with A fitted on a 32-token first chunk (shrunk like the keys' A), scored on all tokens
first_chunk = []
for i, layer in enumerate(model.model.layers):
    wo = layer.self_attn.o_proj.weight.detach().double().view(-1, hkv, hq // hkv, d)
    w = torch.einsum("nhgi,nhgj->hij", wo, wo)
    v = values[i][:, 4:]
    s_all = torch.einsum("hti,htj->hij", v, v) / v.shape[1]
    s_cal = torch.einsum("hti,htj->hij", v[:, :32], v[:, :32]) / 32
    a = shaping_transform(w, _shrunk(s_cal, 0.75), shrink=0.0)
    first_chunk.append(10 * torch.log10(shaping_gain(w, s_all, a)).mean().item())
print(f"values shaped by o_proj, fitted on 32 tokens: {sum(first_chunk) / len(first_chunk):+.2f} dB")

"""Offline oracle: how much of query shaping's score-error gain a diagonal map keeps, per layer kind.

Query shaping (tqpatch/shaping.py) stores A k with A [d, d] per layer and KV head. On a sliding-window layer that matrix
costs about as much as the 512-token cache itself, so sliding layers are not shaped, and on Gemma-3 they hold about two
thirds of the 4-bit loss (README, eigen split on Gemma). A diagonal A = diag(a) costs d numbers. With a_i equal on
the two channels of each RoPE pair (i, i + d/2) it commutes with RoPE. The best such a minimises
tr(Σ_q A⁻²)·tr(A² Σ_k) over a alone: a_i² ∝ sqrt(q_i / k_i), q_i and k_i the pair-averaged diagonals of the
post-RoPE second moments.

Per layer and KV head, the score-error variance relative to A = I (`shaping.shaping_gain`, in dB):
- full A fitted on the first 32 tokens (what the codec does, shrunk as `shaping_transform` shrinks);
- diagonal A fitted on the same 32 tokens;
- both evaluated on the moments of all 1,020 tokens (post-RoPE queries and keys, keys centered by their mean).

    .venv/bin/python eval/experiments/diagonal_shaping_oracle.py [gemma3-270m|smollm2]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
import transformers.models.gemma3.modeling_gemma3 as gemma3
import transformers.models.llama.modeling_llama as llama

from tqpatch.eval import data
from tqpatch.models import load_model
from tqpatch.shaping import SHRINK, _shrunk, shaping_gain, shaping_transform

FIT_TOKENS = 32

model, tok = load_model(sys.argv[1] if len(sys.argv) > 1 else "gemma3-270m")
ids = tok(data.read_text_file(data.default_text_file()), return_tensors="pt").input_ids[:, 4000:5024]
cfg = model.config
hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
captured = []
for module in (llama, gemma3):  # post-RoPE queries and keys, [H, T, d] per layer
    original = module.apply_rotary_pos_emb

    def capture(q, k, cos, sin, *args, original=original, **kwargs):
        q, k = original(q, k, cos, sin, *args, **kwargs)
        captured.append((q.detach()[0].double(), k.detach()[0].double()))
        return q, k

    module.apply_rotary_pos_emb = capture
with torch.no_grad():
    model(ids)


def moments(q, k, tokens):
    """(Σ_q [Hkv, d, d] summed over each KV head's query heads, Σ_k [Hkv, d, d] of centered keys) over `tokens`."""
    q, k = q[:, tokens], k[:, tokens]
    k = k - k.mean(dim=1, keepdim=True)
    sq = torch.einsum("hti,htj->hij", q, q).view(hkv, hq // hkv, d, d).sum(1) / q.shape[1]
    sk = torch.einsum("hti,htj->hij", k, k) / k.shape[1]
    return sq, sk


def diagonal_transform(sigma_q, sigma_k, shrink=SHRINK):
    """diag(a) [Hkv, d, d]: a_i² ∝ sqrt(q_i / k_i) on RoPE-pair-averaged, shrunk diagonals."""
    qd = _shrunk(sigma_q, shrink).diagonal(dim1=-2, dim2=-1)
    kd = _shrunk(sigma_k, shrink).diagonal(dim1=-2, dim2=-1)
    tie = lambda x: ((x[..., : d // 2] + x[..., d // 2 :]) / 2).repeat(1, 2)  # noqa: E731
    a = (tie(qd) / tie(kd)).clamp_min(1e-12) ** 0.25
    return torch.diag_embed(a / a.log().mean(-1, keepdim=True).exp())


db = lambda g: (10 * torch.log10(g)).tolist()  # noqa: E731
rows = {"sliding_attention": [], "full_attention": []}
for i, (q, k) in enumerate(captured):
    fit_q, fit_k = moments(q, k, slice(0, FIT_TOKENS))
    all_q, all_k = moments(q, k, slice(0, None))
    full = shaping_gain(all_q, all_k, shaping_transform(fit_q, fit_k))
    diagonal = shaping_gain(all_q, all_k, diagonal_transform(fit_q, fit_k))
    kind = layer_types[i]
    rows.setdefault(kind, []).append((full, diagonal))
    print(f"layer {i:2d} {kind:18s} full A {[round(x, 2) for x in db(full)]} dB   diagonal {[round(x, 2) for x in db(diagonal)]} dB")
for kind, values in rows.items():
    if values:
        full = torch.stack([f for f, _ in values]).flatten().mean()
        diagonal = torch.stack([g for _, g in values]).flatten().mean()
        print(f"{kind}: {len(values)} layers, mean gain over heads: full A {float(10 * torch.log10(full)):.2f} dB, "
              f"diagonal {float(10 * torch.log10(diagonal)):.2f} dB")

"""Offline oracle: the score-error gain of query shaping under each shaping prior, fitted as the codec fits it.

Per layer and KV head, A is fitted like `RopeKeyCodec._calibrate` does: pre-RoPE second moments of the first chunk
(queries of tokens 4..31 summed over the KV head's query heads; keys of the same tokens centered by their mean), RoPE-
averaged (`shaping.rope_average`), shrunk by each prior of `shaping.SHAPE_PRIORS`. The gain
(`shaping.shaping_gain`, dB, lower is better) is evaluated on the post-RoPE moments of all 1,024 tokens of the window
(keys centered by R_p μ). Rows: full A (isotropic / diagonal prior) and the diagonal map of sliding layers (both priors).

    .venv/bin/python eval/experiments/shaping_prior_oracle.py [gemma3-270m|smollm2] [first text token, default 4000]

Measured (2026-12-01): Gemma-3 full layers −5.75 dB isotropic, −10.87 dB diagonal prior; sliding layers, diagonal map
−1.80 / −2.13 dB; SmolLM2 −2.19 / −2.31 dB. The same at text tokens 20,000 and 100,000 (within 0.05 dB). Perplexity
did not follow (README, "Diagonal shaping of sliding-window layers"): this criterion weighs every (query, key) pair
alike, the softmax does not.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
import transformers.models.gemma3.modeling_gemma3 as gemma3
import transformers.models.llama.modeling_llama as llama

from tqpatch.eval import data
from tqpatch.models import load_model
from tqpatch.rope import RopeTable
from tqpatch.shaping import SHAPE_PRIORS, diagonal_transform, rope_average, shaping_gain, shaping_transform

FIRST, LAST = 4, 32  # the first chunk's tokens after 4 sinks

model, tok = load_model(sys.argv[1] if len(sys.argv) > 1 else "gemma3-270m")
start = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
ids = tok(data.read_text_file(data.default_text_file()), return_tensors="pt").input_ids[:, start : start + 1024]
cfg = model.config
hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
captured = []  # per layer: pre-RoPE q, k [H, T, d], cos, sin, the model's apply_rotary_pos_emb
for module in (llama, gemma3):
    original = module.apply_rotary_pos_emb

    def capture(q, k, cos, sin, *args, original=original, **kwargs):
        captured.append((q.detach()[0].double(), k.detach()[0].double(), cos, sin, original))
        return original(q, k, cos, sin, *args, **kwargs)

    module.apply_rotary_pos_emb = capture
with torch.no_grad():
    model(ids)


def query_moment(q):
    return torch.einsum("hti,htj->hij", q, q).view(hkv, hq // hkv, d, d).sum(1) / q.shape[1]


def key_moment(k):
    return torch.einsum("hti,htj->hij", k, k) / k.shape[1]


gains: dict[tuple[str, str], list[torch.Tensor]] = {}
for i, (q, k, cos, sin, rotate) in enumerate(captured):
    table = RopeTable.fit(cos, sin)
    mean = k[:, FIRST:LAST].mean(1, keepdim=True)
    fit_q = rope_average(query_moment(q[:, FIRST:LAST]), table)
    fit_k = rope_average(key_moment(k[:, FIRST:LAST] - mean), table)
    post_q, post_k = rotate(q[None].float(), (k - mean)[None].float(), cos, sin)
    all_q, all_k = query_moment(post_q[0].double()), key_moment(post_k[0].double())
    for prior, (diagonal_share, shrink) in SHAPE_PRIORS.items():
        full = shaping_transform(fit_q, fit_k, shrink, diagonal_share)
        diagonal = torch.diag_embed(diagonal_transform(fit_q, fit_k, shrink))
        gains.setdefault((layer_types[i], f"full A, {prior} prior"), []).append(shaping_gain(all_q, all_k, full))
        gains.setdefault((layer_types[i], f"diagonal, {prior} prior"), []).append(shaping_gain(all_q, all_k, diagonal))
for (kind, what), values in gains.items():
    print(f"{kind:18s} {what:26s} {float(10 * torch.log10(torch.stack(values).flatten().mean())):6.2f} dB over {len(values)} layers")

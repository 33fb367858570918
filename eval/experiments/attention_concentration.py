"""Offline, FP: how much of the quantization error's weight sits on a few key tokens, and can a store-time signal find them?

In the issue's protocol a query t reads keys i < C·⌊t/C⌋ (older chunks) from the compressed cache. With independent
code errors e_i (variance ∝ D(b_i)), the attention output's error variance is, to first order,

    values:  Σ_t Σ_i a_ti² ‖v_i‖² D(b_i)/d                  (weight Wv_i = Σ_t a_ti² ‖v_i‖²)
    keys:    Σ_t Σ_i a_ti² ‖v_i − o_t‖² (s_ti error)²        (weight Wk_i = Σ_t a_ti² ‖v_i − o_t‖² ‖q_t‖² ‖k_i‖²)

so giving a token more bits pays in proportion to its weight. This prints, per model layer kind, the share of the total
weight held by the top f of compressed tokens (the oracle, ranked per chunk of C tokens so every chunk spends the same
bits), and the share captured when each chunk's top f is chosen at store time, once the chunk has been processed, by
  - "chunk":   the attention the chunk's own queries paid it, Σ_{t in chunk, t ≥ i} a_ti² (causal);
  - "virtual": the weights every query of the chunk would give it, exp 2(s_ti − lse_t), no causal mask;
  - "norm":    ‖k_i‖ (keys) or ‖v_i‖ (values);
  - "bos_pair": how much the key looks like the first token's: cosine of their RoPE pairs' norms (RoPE-invariant);
  - "random".
It also takes the window's top n by each signal (a threshold, in effect). The sinks (the first S tokens) are left out
of the ranking; their own share of the weight is printed first (sliding-window layers store them compressed unless
`sliding_sinks`). Usage: python attention_concentration.py [model] [skip_chars] [tokens]
"""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from tqpatch.eval.data import load_text
from tqpatch.models import load_model

CHUNK, SINKS, FRACS, COUNTS = 32, 4, (0.03, 0.0625, 0.125, 0.25), (8, 32)
PREDICTORS = ("oracle", "chunk", "virtual", "norm", "bos_pair", "random")
rows = []  # (layer, sliding, side, {predictor: [share at each f]})


def chunk_top_share(weight: torch.Tensor, signal: torch.Tensor, frac: float) -> float:
    """Share of Σ weight [G, T] held by each chunk's top ⌈frac·C⌉ tokens by signal [G, T] (tokens < SINKS excluded)."""
    G, T = weight.shape
    k = max(1, math.ceil(frac * CHUNK))
    chosen = torch.zeros_like(weight, dtype=torch.bool)
    for start in range(0, T, CHUNK):
        lo = max(start, SINKS)
        if lo >= min(start + CHUNK, T):
            continue
        idx = signal[:, lo:start + CHUNK].topk(min(k, start + CHUNK - lo), dim=-1).indices + lo
        chosen.scatter_(1, idx, True)
    return float(weight[chosen].sum() / weight[:, SINKS:].sum())


def global_top_share(weight: torch.Tensor, signal: torch.Tensor, count: int) -> float:
    """Share of Σ weight [G, T] held by the window's top `count` tokens by signal (a threshold, in effect)."""
    signal = signal.clone().float()
    signal[:, :SINKS] = -math.inf
    idx = signal.topk(count, dim=-1).indices
    return float(weight.gather(1, idx).sum() / weight[:, SINKS:].sum())


def attention_weights(query, key, scaling, **kwargs):
    """(scores, lse, probs, visible, compressed) of one layer's FP attention: query [1, Hq, T, d], key [1, Hkv, T, d]
    after RoPE → scores/probs [Hq, T, T] (the model's softcap and sliding window applied), lse [Hq, T, 1], visible [T, T]
    (causal and in the window), compressed [T, T] (visible and in an older chunk of CHUNK tokens: read from the codes)."""
    q, k = query[0].float(), key[0].float()
    group = q.shape[0] // k.shape[0]
    T = q.shape[1]
    scores = q @ k.repeat_interleave(group, 0).transpose(-1, -2) * scaling
    softcap = kwargs.get("softcap")
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    if kwargs.get("sliding_window"):
        visible &= ~torch.ones(T, T, dtype=torch.bool).tril(-kwargs["sliding_window"])
    lse = scores.masked_fill(~visible, -math.inf).logsumexp(-1, keepdim=True)
    probs = (scores - lse).exp() * visible
    t_idx = torch.arange(T)
    compressed = (t_idx[None, :] < (t_idx[:, None] // CHUNK) * CHUNK) & visible
    return scores, lse, probs, visible, compressed


def analyse(module, query, key, value, attention_mask, scaling, **kwargs):
    """query [1, Hq, T, d], key/value [1, Hkv, T, d] after RoPE; records the weights' concentration per layer."""
    q, k, v = query[0].float(), key[0].float(), value[0].float()
    Hq, T, _ = q.shape
    group = Hq // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores, lse, probs, causal, compressed = attention_weights(query, key, scaling, **kwargs)
    window = kwargs.get("sliding_window")
    out = probs @ v  # [Hq, T, d]
    t_idx = torch.arange(T)
    a2 = probs.square() * compressed
    v_sq = v.square().sum(-1)  # [Hq, T]
    wv = (a2 * v_sq[:, None, :]).sum(1)
    dist = v_sq[:, None, :] - 2 * out @ v.transpose(-1, -2) + out.square().sum(-1, keepdim=True)  # ‖v_i − o_t‖²
    wk = (a2 * dist.clamp_min(0) * q.square().sum(-1, keepdim=True)).sum(1) * k.square().sum(-1)
    same_chunk = (t_idx[:, None] // CHUNK) == (t_idx[None, :] // CHUNK)
    chunk_sig = (probs.square() * same_chunk * causal).sum(1)
    virtual = (2 * (scores - lse)).exp().masked_fill(~same_chunk, 0).sum(1)
    fold = lambda x: x.view(-1, group, T).sum(1)  # query heads → their KV head
    half = k.shape[-1] // 2
    pair = lambda x: (x[..., :half].square() + x[..., half:].square()).sqrt()  # RoPE-invariant: each rotated pair's norm
    bos_pair = torch.nn.functional.cosine_similarity(pair(k), pair(k[:, :1]), dim=-1)  # [Hq, T]
    for side, weight, norm in (("keys", wk, k.norm(dim=-1)), ("values", wv, v.norm(dim=-1))):
        signals = {"oracle": fold(weight), "chunk": fold(chunk_sig), "virtual": fold(virtual),
                   "norm": fold(norm), "bos_pair": fold(bos_pair), "random": torch.rand(T).expand(fold(weight).shape[0], T)}
        shares = {name: [chunk_top_share(fold(weight), sig, f) for f in FRACS] + [global_top_share(fold(weight), sig, n) for n in COUNTS]
                  for name, sig in signals.items()}
        shares["first"] = float(fold(weight)[:, :SINKS].sum() / fold(weight).sum())  # the sinks' own share, of all
        rows.append((module.layer_idx, bool(window), side, shares))
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def main():
    model_name = sys.argv[1] if len(sys.argv) > 1 else None
    skip = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 2048
    model, tok = load_model(model_name)
    text, source = load_text()
    ids = tok(text[skip:], return_tensors="pt").input_ids[:, :tokens]
    AttentionInterface.register("concentration", analyse)
    model.config._attn_implementation = "concentration"
    for sub in model.modules():
        if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation"):
            sub.config._attn_implementation = "concentration"
    with torch.no_grad():
        model(ids)
    print(f"{model_name or 'default model'}, {source} from character {skip}, {ids.shape[1]} tokens, chunks of {CHUNK}; "
          "error weight W_i = Σ_t a_ti² (‖v_i‖² for values, ‖v_i − o_t‖² ‖q_t‖² ‖k_i‖² for keys) over compressed reads")
    for sliding in sorted({r[1] for r in rows}):
        for side in ("keys", "values"):
            sel = [r[3] for r in rows if r[1] == sliding and r[2] == side]
            first = sum(s["first"] for s in sel) / len(sel)
            print(f"\n{'sliding' if sliding else 'full'} layers ({len(sel)}), {side}: the first {SINKS} tokens hold {first:.3f} of all the weight;"
                  " of the rest, the share held by each chunk's top f / the window's top n tokens by each signal")
            print("    f = " + " / ".join(f"{f:.3f}" for f in FRACS) + "  |  n = " + " / ".join(map(str, COUNTS)))
            for name in PREDICTORS:
                mean = [sum(s[name][j] for s in sel) / len(sel) for j in range(len(FRACS) + len(COUNTS))]
                print(f"  {name:8s} " + " / ".join(f"{m:.3f}" for m in mean))
    print("\nper layer, keys (first tokens' share; oracle / chunk / bos_pair at f = 0.03):")
    print("  " + "  ".join(f"{r[0]}{'s' if r[1] else 'f'} ({r[3]['first']:.2f}) {r[3]['oracle'][0]:.2f}/{r[3]['chunk'][0]:.2f}/{r[3]['bos_pair'][0]:.2f}" for r in rows if r[2] == "keys"))


if __name__ == "__main__":
    main()

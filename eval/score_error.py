"""What a key codec does to attention scores: the error e_ij = (q_i · (k_j − k̃_j)) / √d, split the way softmax sees it.

Softmax ignores a shift common to all keys of a query, so a key error that is
the same for every key costs nothing. For each query i and the keys j it
reads compressed (those stored by earlier chunks), we report

- `total`: the root-mean-square of e_ij over all such pairs;
- `differential`: the RMS of e_ij − mean_j e_ij (what is left after the shift
  softmax ignores);
- `attention_weighted`: sqrt(E_i Σ_j p_ij (e_ij − Σ_j' p_ij' e_ij')²), p the exact
  attention of query i over those keys. To first order the attention output
  moves by Σ_j p_ij (e_ij − ē_i) v_j, so this is the error that reaches the model.

Queries and keys are recomputed from each chosen layer's input (Llama-family
attention: q/k projections, then RoPE from the position embeddings the model
passes), keys are stored chunk by chunk in the `TurboQuantLayer` that `patch` would
build for the setting, and read back from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tqpatch.config import TurboQuantConfig
from tqpatch.patch import make_layer


@dataclass
class ScoreError:
    setting: str
    layer: int
    total: float
    differential: float
    attention_weighted: float


def capture_queries_keys(model, ids: torch.Tensor, layers: list[int]) -> dict[int, tuple]:
    """{layer: (q [1, Hq, T, d], k [1, Hkv, T, d], cos, sin, q_pre [1, T, Hq, d])}: q and k post-RoPE, q_pre the
    queries before RoPE (what `shape_keys` codecs observe), from one forward pass over ids [T]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    captured, handles = {}, []
    for idx in layers:
        attn = model.model.layers[idx].self_attn

        def grab(module, args, kwargs, idx=idx):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            shape = (*hidden.shape[:-1], -1, module.head_dim)
            q_pre = module.q_proj(hidden).view(shape)
            k = module.k_proj(hidden).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q_pre.transpose(1, 2), k, cos, sin)
            captured[idx] = (q.detach().float(), k.detach().float(), cos, sin, q_pre.detach().float())

        handles.append(attn.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids[None])
    finally:
        for h in handles:
            h.remove()
    return captured


def stored_keys(keys: torch.Tensor, cos, sin, config: TurboQuantConfig, chunk: int, queries: torch.Tensor | None = None) -> torch.Tensor:
    """The keys [1, H, T, d] as the TurboQuantLayer `patch` would build reads them back after storing them
    `chunk` tokens at a time (sinks, window, RoPE-aware centering and, given the pre-RoPE queries
    [1, T, Hq, d], query shaping included)."""
    layer = make_layer(config, keys.shape[-1], config.key_bits, config.value_bits)
    for start in range(0, keys.shape[2], chunk):
        layer.observe_rope(cos[:, start : start + chunk], sin[:, start : start + chunk])
        if queries is not None:
            layer.observe_queries(queries[:, start : start + chunk], keys.shape[1])
        piece = keys[:, :, start : start + chunk]
        layer.update(piece, piece)  # the values are not looked at
    return layer.stored_kv()[0].float()


def score_errors(model, ids: torch.Tensor, settings: list[str], layers: list[int], chunk: int = 32) -> list[ScoreError]:
    """ScoreError per setting and layer for the token ids [T] (one window); keys read compressed: earlier chunks only."""
    captured = capture_queries_keys(model, ids, layers)
    rows = []
    for idx, (q, k, cos, sin, q_pre) in captured.items():
        hq, hkv, t, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
        group = hq // hkv
        exact = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(group, dim=1)) / math.sqrt(d)  # [1, Hq, T, T]
        pos = torch.arange(t)
        compressed = (pos[None, :] // chunk) < (pos[:, None] // chunk)  # key j stored by an earlier chunk than query i
        rows_with_keys = compressed.any(dim=1)
        for spec in settings:
            config = TurboQuantConfig.from_spec(spec)
            k_hat = stored_keys(k, cos, sin, config, chunk, q_pre).repeat_interleave(group, dim=1)
            err = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(group, dim=1) - k_hat) / math.sqrt(d)
            mask = compressed[None, None].expand_as(err)
            count = compressed.sum(dim=1).clamp_min(1)  # [T]
            mean = (err * mask).sum(-1) / count  # [1, Hq, T]
            total = err[mask].pow(2).mean().sqrt().item()
            differential = ((err - mean[..., None])[mask]).pow(2).mean().sqrt().item()
            p = torch.softmax(exact.masked_fill(~compressed, float("-inf")), dim=-1).nan_to_num(0.0)
            weighted_mean = (p * err).sum(-1, keepdim=True)
            weighted = (p * (err - weighted_mean).pow(2)).sum(-1)[..., rows_with_keys].mean().sqrt().item()
            rows.append(ScoreError(spec, idx, total, differential, weighted))
    return rows


def main() -> None:  # pragma: no cover - a measurement, run by hand (see README, quality levers)
    import argparse

    from tqpatch.eval.data import load_text
    from tqpatch.eval.perplexity import tokenize
    from tqpatch.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--layers", default="5,15,25")
    parser.add_argument("--settings", default="k4v4,k4v4-ck,k2v2,k2v2-ck")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    text, _ = load_text()
    ids = tokenize(tokenizer, text, max_tokens=args.tokens)
    rows = score_errors(model, ids, args.settings.split(","), [int(x) for x in args.layers.split(",")])
    print(f"{'setting':<12} {'layer':>5} {'total':>8} {'differential':>13} {'attention-weighted':>19}")
    for r in rows:
        print(f"{r.setting:<12} {r.layer:>5} {r.total:8.4f} {r.differential:13.4f} {r.attention_weighted:19.4f}")


if __name__ == "__main__":
    main()

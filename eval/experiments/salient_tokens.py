"""Oracle: keep the N key/value tokens per layer and window that FP attention weighs most exact (or N random ones).

The weight of token i is W_i = Σ_t a_ti² over the queries t that read it compressed (an older chunk; the
attention output's error from i's code error scales with it, see attention_concentration.py), measured by
an FP pass over the same window before the compressed one; the first 4 tokens are never chosen. MODE=oracle
takes the top N per layer (per KV head), MODE=bos_pair the N keys whose rotated pairs' norms are most like the
first token's (cosine), MODE=random N random positions ≥ 4. The bits reported are NOT
corrected for the exact copies (each costs 16 − b bits per coordinate for the layer's tokens).
Usage: N=8 MODE=oracle python salient_tokens.py eval ppl --model gemma3-270m ...
"""
import importlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # attention_concentration beside this file
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from attention_concentration import SINKS, attention_weights

PPL = importlib.import_module("tqpatch.eval.perplexity")
STORE = importlib.import_module("tqpatch.store")
N = int(os.environ.get("N", "8"))
MODE = os.environ.get("MODE", "oracle")
state = {"model": None, "chosen": {}, "current": None, "cache": None, "weights": {}, "bos_pair": {}}


def _weights(module, query, key, value, attention_mask, scaling, **kwargs):
    """FP pass: W [Hkv, T] per layer, Σ over a KV head's query heads of Σ_t a_ti² on compressed reads."""
    _, _, probs, _, compressed = attention_weights(query, key, scaling, **kwargs)
    Hq, T = probs.shape[:2]
    state["weights"][module.layer_idx] = (probs.square() * compressed).sum(1).view(-1, Hq // key.shape[1], T).sum(1)
    kk = key[0].float()
    half = kk.shape[-1] // 2
    pair = (kk[..., :half].square() + kk[..., half:].square()).sqrt()  # [Hkv, T, d/2]: RoPE-invariant
    state["bos_pair"][module.layer_idx] = torch.nn.functional.cosine_similarity(pair, pair[:, :1], dim=-1)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def _choose(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """{layer: chosen positions [Hkv, N]} for one window."""
    AttentionInterface.register("salient_weights", _weights)
    old = {m: m.config._attn_implementation for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")}
    for m in old:
        m.config._attn_implementation = "salient_weights"
    try:
        with torch.no_grad():
            model(ids[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        for m, name in old.items():
            m.config._attn_implementation = name
    chosen = {}
    g = torch.Generator().manual_seed(0)
    for layer, w in state["weights"].items():
        w = w.clone()
        w[:, :SINKS] = -1
        if MODE == "oracle":
            chosen[layer] = w.topk(N, dim=-1).indices
        elif MODE == "bos_pair":  # the keys most like the first token's, pair norms compared (RoPE-invariant)
            sim = state["bos_pair"][layer].clone()
            sim[:, :SINKS] = -1
            chosen[layer] = sim.topk(N, dim=-1).indices
        else:
            chosen[layer] = torch.stack([torch.randperm(w.shape[1] - SINKS, generator=g)[:N] + SINKS for _ in range(w.shape[0])])
    return chosen


_orig_dp, _orig_windows, _orig_nll = PPL.decode_perplexity, PPL.make_windows, PPL.window_nll


def decode_perplexity(model, *args, **kwargs):
    state["model"] = model
    return _orig_dp(model, *args, **kwargs)


def make_windows(*args, **kwargs):
    windows = _orig_windows(*args, **kwargs)
    for w in windows:
        state["chosen"][tuple(w.tolist())] = _choose(state["model"], w)
    return windows


def window_nll(model, ids, chunk, cache, on_chunk=None):
    state["current"], state["cache"] = state["chosen"][tuple(ids.tolist())], cache
    return _orig_nll(model, ids, chunk, cache, on_chunk)


PPL.decode_perplexity, PPL.make_windows, PPL.window_nll = decode_perplexity, make_windows, window_nll
_orig_store, _orig_stored_kv = STORE.TurboQuantLayer._store, STORE.TurboQuantLayer.stored_kv


def _positions(layer) -> torch.Tensor:
    """The chosen positions [Hkv, N] of this layer in the current window."""
    index = next(i for i, other in enumerate(state["cache"].layers) if other is layer)
    return state["current"][index]


def _store(self, keys, values):
    """Keep exact copies of the chosen tokens among the new ones (positions cumulative_length − T …)."""
    exact = self.__dict__.setdefault("_salient", {})
    first = self.cumulative_length - keys.shape[2]
    for h, row in enumerate(_positions(self).tolist()):
        for p in row:
            if first <= p < first + keys.shape[2]:
                exact[(h, p)] = (keys[:, h, p - first].clone(), values[:, h, p - first].clone())
    return _orig_store(self, keys, values)


def stored_kv(self):
    keys, values = _orig_stored_kv(self)
    salient = self.__dict__.get("_salient")
    if salient and self.num_compressed:
        keys, values = keys.clone(), values.clone()
        for (h, p), (k, v) in salient.items():
            j = p - self.compressed_start
            if 0 <= j < self.num_compressed:
                keys[:, h, self.num_sink + j], values[:, h, self.num_sink + j] = k, v
    return keys, values


STORE.TurboQuantLayer._store, STORE.TurboQuantLayer.stored_kv = _store, stored_kv
print(f"[salient] MODE={MODE} N={N} per layer and window (bits not corrected)", flush=True)
sys.argv = ["tqpatch"] + sys.argv[1:]
from cli.main import main

main()

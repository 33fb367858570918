"""List the host-device synchronizations in the decode steps of a patched model (CUDA only).

A sync in a decode step stalls the host until the GPU has drained, so the step costs host time plus GPU
time instead of the larger of the two. This builds a small random-weight Llama (4 layers, 32 q / 8 KV heads,
d 128), fills a cache through each method's own path, then runs decode steps under
`torch.cuda.set_sync_debug_mode("warn")` and prints each distinct synchronizing call (the Python line that
made it) with how often it ran.

    python3 bench/sync_check.py --methods tqpatch-k4v4,tqpatch-3.5bit,tqpatch-k4v4+,tqpatch-3.5bit+
"""

import argparse
import warnings

import torch


def check(method: str, layers: int, batch: int, context: int, steps: int) -> list[str]:
    import tqpatch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=1024, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=context + steps + 8,
                         attn_implementation="sdpa")
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    tqpatch.patch(model, tqpatch.TurboQuantConfig.from_spec(method.split("-", 1)[1]))
    ids = torch.randint(0, 1024, (batch, context), device="cuda")
    seen: dict[str, int] = {}
    with torch.no_grad():
        out = model(ids, use_cache=True)  # prefill: calibrates the codecs, not checked
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(2):  # warm-up decode steps (first-use compiles, lazy tables)
            out = model(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(steps):
                    out = model(nxt, past_key_values=cache, use_cache=True)
                    nxt = out.logits[:, -1:].argmax(-1)
                control = len(caught)
                torch.ones(1, device="cuda").item()  # a known sync: proves the warnings are caught
                if len(caught) == control:
                    raise RuntimeError("sync debug mode reported no sync for .item(): this check cannot see syncs here")
                del caught[control:]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        key = f"{w.filename}:{w.lineno}: {str(w.message)[:120]}"
        seen[key] = seen.get(key, 0) + 1
    tqpatch.unpatch(model)
    del model, cache
    torch.cuda.empty_cache()
    return [f"{count:5d} x {key}" for key, count in sorted(seen.items(), key=lambda kv: -kv[1])]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="tqpatch-k4v4,tqpatch-3.5bit,tqpatch-k4v4+,tqpatch-3.5bit+")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    for method in args.methods.split(","):
        found = check(method, args.layers, args.batch, args.context, args.steps)
        print(f"{method}: {len(found)} distinct synchronizing calls in {args.steps} decode steps of {args.layers} layers", flush=True)
        for line in found:
            print("   ", line, flush=True)


if __name__ == "__main__":
    main()

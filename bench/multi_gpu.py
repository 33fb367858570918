"""device_map="auto" across every visible GPU: each layer's store lives on its layer's GPU,
and generation matches a single-GPU run of the same patched model.

    python bench/multi_gpu.py --out results/multi_gpu.json

Random weights of real shapes (Llama-style, hidden 4096, 32 query / 8 KV heads, d 128), a few GB in bf16.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tqpatch


def build_model(layers: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=False,
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def run(model, ids, new_tokens, preset):
    tqpatch.patch(model, preset)
    try:
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        devices = []
        for i, layer in enumerate(cache.layers):
            held = [t for t in layer.compressed_keys.parts.values()]
            devices.append(str(held[0].device) if held else "empty")
        stats = tqpatch.cache_stats(cache)
        return out.sequences.cpu(), devices, stats
    finally:
        tqpatch.unpatch(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--preset", default="k4v4")
    parser.add_argument("--out", type=Path, default=Path("results/multi_gpu.json"))
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    if gpus < 2:
        raise SystemExit(f"needs at least 2 GPUs, found {gpus}")

    model = build_model(args.layers)
    size_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    ids = torch.randint(0, 32000, (2, args.prompt_tokens), generator=torch.Generator().manual_seed(1))

    from accelerate import dispatch_model, infer_auto_device_map

    per_gpu = f"{size_gb / gpus * 1.3:.1f}GB"
    device_map = infer_auto_device_map(model, max_memory={i: per_gpu for i in range(gpus)}, no_split_module_classes=["LlamaDecoderLayer"])
    multi = dispatch_model(model, device_map=device_map)
    t0 = time.time()
    seq_multi, devices, stats = run(multi, ids.to("cuda:0"), args.new_tokens, args.preset)
    t_multi = time.time() - t0
    layer_devices = {name: str(dev) for name, dev in device_map.items()}

    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(multi, recurse=True)
    single = multi.to("cuda:0")
    t0 = time.time()
    seq_single, devices_single, _ = run(single, ids.to("cuda:0"), args.new_tokens, args.preset)
    t_single = time.time() - t0

    expected = [f"cuda:{device_map[f'model.layers.{i}']}" for i in range(args.layers)]
    result = {
        "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
        "torch": torch.__version__,
        "model": f"random-weight Llama, {args.layers} layers, hidden 4096, 32/8 heads, d 128, {size_gb:.2f} GB bf16",
        "batch": 2, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "preset": args.preset,
        "device_map": layer_devices,
        "store_devices": devices,
        "stores_on_their_layers_gpu": devices == expected,
        "single_gpu_store_devices": sorted(set(devices_single)),
        "tokens_identical_to_single_gpu": bool(torch.equal(seq_multi, seq_single)),
        "compressed_tokens": stats.compressed_tokens,
        "compression_ratio": stats.compression_ratio,
        "seconds_multi": t_multi, "seconds_single": t_single,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if not (result["stores_on_their_layers_gpu"] and result["tokens_identical_to_single_gpu"]):
        raise SystemExit("multi-GPU check FAILED")


if __name__ == "__main__":
    main()

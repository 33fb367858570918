"""Where one end-to-end decode step spends its time: host (Python, launches) vs. GPU kernels.

Builds the random-weight Llama-3.1-8B-shaped model of `tqpatch bench` (32 layers, 32 q / 8 KV
heads, d 128), fills a B=8, 32k-token cache per method (as `tqpatch bench` does), runs warm-up
steps, then times steps with CUDA events and profiles one step with torch.profiler. Prints, per
method: the step's wall time, the GPU's busy time (sum of kernel durations; streams are serial
here), the number of kernel launches, and the top operators by GPU and by host time.

    python3 bench/profile_step.py --out results/profile_step.json
"""

import argparse
import json
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from cli.bench import _decode_ms, _fill, _free, _with_method, build_model


def profile_method(model, method: str, batch: int, length: int) -> dict:
    _with_method(model, method)
    _free()
    cache = _fill(model, method, batch, length)
    times = _decode_ms(model, cache, batch, length, steps=5, warmup=3)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
    pos = torch.full((batch, 1), length + 8, device="cuda", dtype=torch.long)
    torch.cuda.synchronize()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True)
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    launches = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    by_gpu = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    del cache
    _free()
    return {
        "step_ms_median": statistics.median(times), "step_ms_all": times,
        "gpu_busy_ms": gpu_us / 1e3, "kernel_launches": launches,
        "top_gpu": [{"name": e.key[:80], "count": e.count, "gpu_ms": e.self_device_time_total / 1e3} for e in by_gpu],
        "top_host": [{"name": e.key[:80], "count": e.count, "host_ms": e.self_cpu_time_total / 1e3} for e in by_cpu],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="results/profile_step.json")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--methods", default="bf16,tqpatch-k4v4")
    args = parser.parse_args()
    model = build_model(32)
    result = {"gpu": torch.cuda.get_device_name(0), "batch": args.batch, "context": args.context, "methods": {}}
    for method in args.methods.split(","):
        row = profile_method(model, method, args.batch, args.context)
        result["methods"][method] = row
        print(f"{method}: step {row['step_ms_median']:.2f} ms (median of 5), GPU busy {row['gpu_busy_ms']:.2f} ms in the profiled step, "
              f"{row['kernel_launches']} kernel launches", flush=True)
        for r in row["top_gpu"][:8]:
            print(f"   gpu  {r['gpu_ms']:8.3f} ms  x{r['count']:<5} {r['name']}")
        for r in row["top_host"][:8]:
            print(f"   host {r['host_ms']:8.3f} ms  x{r['count']:<5} {r['name']}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

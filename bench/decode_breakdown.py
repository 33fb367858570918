"""Where a fused k4v4 decode-attention call spends its GPU time, kernel by kernel (one GPU).

    python3 bench/decode_breakdown.py --out decode_breakdown.json

k4v4 codes (random bytes, fp16 norms), Llama-3.1-8B heads (32 query / 8 KV heads, d 128), B=8 at 32k tokens and B=1
at 128k, as `bench/decode_ab.py`. `kernels.decode_attention` is captured in a CUDA graph and replayed under
torch.profiler (CUPTI): every kernel's device time per call, averaged over the replays, next to the whole call's GPU
time from CUDA events (`cli.bench._ms_graph`) and bf16 SDPA's on the same shapes. The difference between the call
and the sum of its kernels is the gaps between kernels inside the graph.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict

import click
import torch

from bench.decode_ab import decode_inputs
from cli.bench import _ms_graph
from tqpatch import kernels
from tqpatch.codec import TurboQuantCodec


def kernel_times(fn, reps: int) -> dict[str, float]:
    """Mean device milliseconds per call of each GPU kernel `fn` launches (captured in a CUDA graph, replayed `reps`
    times under the profiler); kernel names shortened to 60 characters."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    warnings.filterwarnings("ignore", message=".*Profiler clears events")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    total = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            total[ev.name[:60]] += ev.device_time / 1000.0  # µs -> ms
    return {name: t / reps for name, t in sorted(total.items(), key=lambda kv: -kv[1])}


@click.command()
@click.option("--reps", default=50, show_default=True)
@click.option("--out", default=None, help="JSON file for the breakdown.")
def main(reps: int, out: str | None) -> None:
    hq, hkv, d = 32, 8, 128
    codec = TurboQuantCodec(d, 4, "mse", 0)
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "tuning": dict(kernels.DECODE_TUNING), "shapes": []}
    for b, length, kp, vp, q, ks, vs in decode_inputs(codec, hq, hkv):
        call = lambda: kernels.decode_attention(q, codec, codec, kp, vp, None, None, d**-0.5)  # noqa: E731
        sdpa = _ms_graph(lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], ks, vs, enable_gqa=True), reps)
        whole = _ms_graph(call, reps)
        parts = kernel_times(call, reps)
        row = {"B": b, "L": length, "sdpa_ms": sdpa, "call_ms": whole, "kernels_ms": parts, "gaps_ms": whole - sum(parts.values())}
        result["shapes"].append(row)
        click.echo(f"B={b} L={length}: call {whole:.4f} ms ({whole / sdpa:.2f}x bf16 SDPA {sdpa:.4f} ms); kernels:")
        for name, t in parts.items():
            click.echo(f"  {t:.4f} ms  {100 * t / whole:5.1f}%  {name}")
        click.echo(f"  {row['gaps_ms']:.4f} ms  {100 * row['gaps_ms'] / whole:5.1f}%  (gaps between kernels)")
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

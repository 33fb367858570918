"""Interleaved A/B timing of the LUT decode kernel's key scoring (fp16 vs int8 mmas) against bf16 SDPA (one GPU).

    python3 bench/decode_int8_ab.py --rounds 7 --out decode_int8_ab.json

k4v4 codes (random bytes, fp16 norms), Llama-3.1-8B heads (32 query / 8 KV heads, d 128), B=8 at 32k tokens and B=1
at 128k; GPU time per call from CUDA-graph replays (`cli.bench._ms_graph`). Each round times bf16
`scaled_dot_product_attention` (enable_gqa) and every `warp_lut_int8_keys` setting once, in turn, so drift of the
card hits all alike; medians and ranges over rounds are printed and written as JSON.
"""

from __future__ import annotations

import json
import statistics

import click
import torch

from cli.bench import _ms_graph, _random_parts
from tqpatch import kernels
from tqpatch.codec import TurboQuantCodec

MODES = {"fp16 keys": 0, "int8 keys": 1, "int8 keys + query remainder": 2}


@click.command()
@click.option("--rounds", default=7, show_default=True)
@click.option("--out", default=None, help="JSON file for the per-round times and medians.")
def main(rounds: int, out: str | None) -> None:
    hq, hkv, d = 32, 8, 128
    codec = TurboQuantCodec(d, 4, "mse", 0)
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": []}
    default = kernels.DECODE_TUNING["warp_lut_int8_keys"]
    for b, length in ((8, 32768), (1, 131072)):
        kp, vp = _random_parts(codec, b, hkv, length), _random_parts(codec, b, hkv, length)
        q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
        qs = q[:, :, None]
        ks = torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16)
        vs = torch.randn_like(ks)
        calls = {"bf16 SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)}
        for name, mode in MODES.items():
            def call(mode=mode):
                kernels.DECODE_TUNING["warp_lut_int8_keys"] = mode
                return kernels.decode_attention(q, codec, codec, kp, vp, None, None, d**-0.5)
            calls[name] = call
        times = {name: [] for name in calls}
        for _ in range(rounds):
            for name, fn in calls.items():
                if name in MODES:
                    kernels.DECODE_TUNING["warp_lut_int8_keys"] = MODES[name]  # the setting the graph captures
                times[name].append(_ms_graph(fn, 50))
        kernels.DECODE_TUNING["warp_lut_int8_keys"] = default
        med = {name: statistics.median(t) for name, t in times.items()}
        row = {"B": b, "L": length, "ms": times, "median_ms": med,
               "ratio_to_sdpa": {name: med[name] / med["bf16 SDPA"] for name in MODES}}
        result["shapes"].append(row)
        click.echo(f"B={b} L={length}: " + " | ".join(f"{n} {med[n]:.4f} ms [{min(t):.4f}, {max(t):.4f}]"
                                                        + (f" ({med[n] / med['bf16 SDPA']:.2f}x)" if n in MODES else "")
                                                        for n, t in times.items()))
        del kp, vp, ks, vs
        torch.cuda.empty_cache()
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Interleaved A/B timing of decode-kernel settings against bf16 SDPA (one GPU).

    python3 bench/decode_ab.py --setting warp_lut_int8_keys=0,1,2 --rounds 7 --out decode_ab.json   # run 75
    python3 bench/decode_ab.py --setting premerge_splits=0,16,32 --rounds 7 --out decode_ab.json     # run 77

k4v4 codes (random bytes, fp16 norms), Llama-3.1-8B heads (32 query / 8 KV heads, d 128), B=8 at 32k tokens and B=1
at 128k; GPU time per call of `kernels.decode_attention` from CUDA-graph replays (`cli.bench._ms_graph`). Each round
times bf16 `scaled_dot_product_attention` (enable_gqa) and every value of the `DECODE_TUNING` key once, in turn, so
drift of the card hits all alike; medians and ranges over rounds are printed and written as JSON.
"""

from __future__ import annotations

import json
import statistics

import click
import torch

from cli.bench import _ms_graph, _random_parts
from tqpatch import kernels
from tqpatch.codec import TurboQuantCodec


SHAPES = ((8, 32768), (1, 131072))  # (B, L): the two decode-attention targets


def decode_inputs(codec, hq: int = 32, hkv: int = 8, shapes=SHAPES):
    """For each (B, L) of `shapes`: (B, L, key parts, value parts, bf16 query [B, Hq, d], bf16 K and V [B, Hkv, L, d]
    for SDPA), random codes in `codec`'s format; the GPU cache is emptied between shapes."""
    d = codec.head_dim
    for b, length in shapes:
        kp, vp = _random_parts(codec, b, hkv, length), _random_parts(codec, b, hkv, length)
        q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
        ks = torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16)
        yield b, length, kp, vp, q, ks, torch.randn_like(ks)
        del kp, vp, q, ks
        torch.cuda.empty_cache()


@click.command()
@click.option("--setting", required=True, help="KEY=V1,V2,...: a DECODE_TUNING key and the integer values to compare "
              "(KEY1+KEY2=V1,V2: several keys set to the same value together).")
@click.option("--rounds", default=7, show_default=True)
@click.option("--out", default=None, help="JSON file for the per-round times and medians.")
def main(setting: str, rounds: int, out: str | None) -> None:
    key, _, values = setting.partition("=")
    keys = key.split("+")
    if any(k not in kernels.DECODE_TUNING for k in keys) or not values:
        raise click.BadParameter(f"expected KEY=V1,V2 with KEY one of {sorted(kernels.DECODE_TUNING)}", param_hint="--setting")
    values = [int(v) for v in values.split(",")]
    defaults = {k: kernels.DECODE_TUNING[k] for k in keys}
    hq, hkv, d = 32, 8, 128
    codec = TurboQuantCodec(d, 4, "mse", 0)
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "setting": key, "values": values, "shapes": []}
    for b, length, kp, vp, q, ks, vs in decode_inputs(codec, hq, hkv):
        qs = q[:, :, None]
        names = ["bf16 SDPA"] + [f"{key}={v}" for v in values]
        times = {name: [] for name in names}
        for _ in range(rounds):
            times["bf16 SDPA"].append(_ms_graph(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True), 50))
            for v in values:
                kernels.DECODE_TUNING.update({k: v for k in keys})  # the setting the graph captures
                times[f"{key}={v}"].append(_ms_graph(lambda: kernels.decode_attention(q, codec, codec, kp, vp, None, None, d**-0.5), 50))
        kernels.DECODE_TUNING.update(defaults)
        med = {name: statistics.median(t) for name, t in times.items()}
        result["shapes"].append({"B": b, "L": length, "ms": times, "median_ms": med,
                                 "ratio_to_sdpa": {n: med[n] / med["bf16 SDPA"] for n in names[1:]}})
        click.echo(f"B={b} L={length}: " + " | ".join(f"{n} {med[n]:.4f} ms [{min(t):.4f}, {max(t):.4f}]"
                                                        + (f" ({med[n] / med['bf16 SDPA']:.2f}x)" if n != "bf16 SDPA" else "")
                                                        for n, t in times.items()))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Launch settings of `kernels.rope_bias_dense` (the `+` presets' RoPE bias written out dense for the warp decode
kernel), one GPU: each setting's time alone and inside the full decode call (k4v4 + RoPE bias + norm bias), against
bf16 SDPA in the same run, at the bench shapes of `decode_ab.decode_inputs` (B=8 at 32k, B=1 at 128k).

    python3 bench/rope_dense_sweep.py --rounds 3 --out rope_dense_sweep.json

Each setting is (block_r, block_t, tiles_per_program, num_warps); its output is checked against `RopeBias.dense`.
Also the full call with the default settings and the LUT kernel's bias tile loaded at its step or a step ahead
(`DECODE_TUNING["warp_bias_ahead"]`).
"""

from __future__ import annotations

import functools
import json
import statistics

import click
import torch

from bench.decode_norm_bias import biased_decode_inputs
from cli.bench import _ms_graph
from tqpatch import kernels

SETTINGS = [(16, 64, 8, 4), (32, 64, 8, 8), (64, 64, 8, 8), (64, 64, 4, 4), (32, 128, 4, 8), (64, 32, 8, 4), (16, 32, 16, 4), (64, 64, 16, 8)]


@click.command()
@click.option("--rounds", default=3, show_default=True)
@click.option("--out", default=None, help="JSON file for the per-round times and medians.")
def main(rounds: int, out: str | None) -> None:
    hq, d = 32, 128
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": []}
    original = kernels.rope_bias_dense
    for codec, (b, length, kp, vp, q, ks, vs, rope, norm_bias) in biased_decode_inputs(hq=hq, d=d):
        ref = rope.dense(length).reshape(b * hq, length)
        qs = q[:, :, None]
        calls = {"bf16 SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)}
        errors = {}
        for br, bt, tpp, w in SETTINGS:
            dense = functools.partial(original, block_r=br, block_t=bt, tiles_per_program=tpp, num_warps=w)
            name = f"r{br} t{bt} x{tpp} w{w}"
            errors[name] = ((dense(rope, length) - ref).abs().max() / ref.abs().max()).item()
            calls[name + " dense"] = functools.partial(dense, rope, length)

            def full(dense=dense):
                kernels.rope_bias_dense = dense
                try:
                    return kernels.decode_attention(q, codec, codec, kp, vp, None, None, d**-0.5, rope_bias=rope, norm_bias=norm_bias)
                finally:
                    kernels.rope_bias_dense = original
            calls[name + " decode"] = full
        for ahead in (False, True):  # the default dense settings, the bias tile loaded at its step or a step ahead
            def tuned(ahead=ahead):
                before = kernels.DECODE_TUNING["warp_bias_ahead"]
                kernels.DECODE_TUNING["warp_bias_ahead"] = ahead
                try:
                    return kernels.decode_attention(q, codec, codec, kp, vp, None, None, d**-0.5, rope_bias=rope, norm_bias=norm_bias)
                finally:
                    kernels.DECODE_TUNING["warp_bias_ahead"] = before
            calls[f"default decode, bias {'a step ahead' if ahead else 'at its step'}"] = tuned
        times = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                times[name].append(_ms_graph(call, 50))
        med = {name: statistics.median(t) for name, t in times.items()}
        result["shapes"].append({"B": b, "L": length, "ms": times, "median_ms": med, "max_rel_error": errors})
        click.echo(f"B={b} L={length}: SDPA {med['bf16 SDPA']:.4f} ms")
        for name in errors:
            click.echo(f"  {name}: dense {med[name + ' dense']:.4f} ms, decode {med[name + ' decode']:.4f} ms "
                       f"({med[name + ' decode'] / med['bf16 SDPA']:.2f}x SDPA), max error {errors[name]:.1e}")
        for name in calls:
            if name.startswith("default decode"):
                click.echo(f"  {name}: {med[name]:.4f} ms ({med[name] / med['bf16 SDPA']:.2f}x SDPA)")
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""What the score-variance bias (`score_variance`, spec -sv) costs the fused decode, against bf16 SDPA (one GPU).

    python3 bench/decode_norm_bias.py --rounds 7 --out decode_norm_bias.json

k4v4 codes with 8-bit norms (random bytes), Llama-3.1-8B heads (32 query / 8 KV heads, d 128), B=8 at 32k tokens and
B=1 at 128k (`decode_ab.decode_inputs`). Per round, in turn: bf16 `scaled_dot_product_attention` (enable_gqa); the
plain kernel call (k4v4: the warp kernel); with the RoPE bias of centered keys (the `+` presets) and with the RoPE bias
plus `norm_bias` (the `+` presets with -sv), each through the LUT warp kernel (the RoPE bias written out dense first:
`DECODE_TUNING["warp_bias"]`, the default since run 101) and through the split kernel (the path before). GPU time per
call from CUDA-graph replays, medians.
"""

from __future__ import annotations

import json
import statistics

import click
import torch

from bench.decode_ab import decode_inputs
from cli.bench import _ms_graph
from tqpatch import kernels
from tqpatch.codec import TurboQuantCodec
from tqpatch.rope import RopeBias, RopeTable


def _split_kernel(call):
    """`call` with scores that carry a bias sent to the split kernel (warp_bias off while it runs or is captured)."""
    def run():
        before = kernels.DECODE_TUNING["warp_bias"]
        kernels.DECODE_TUNING["warp_bias"] = False
        try:
            return call()
        finally:
            kernels.DECODE_TUNING["warp_bias"] = before
    return run


def biased_decode_inputs(hq: int = 32, hkv: int = 8, d: int = 128):
    """The k4v4 codec (8-bit norms) and, per bench shape of `decode_ab.decode_inputs`, (B, L, key parts, value parts,
    q [B, Hq, d], K and V for SDPA, a random RoPE bias from position 0, a random norm bias [B, Hq, 1]): yields
    (codec, that tuple)."""
    codec = TurboQuantCodec(d, 4, "mse", 0, norm_bits=8)
    codec.prepare(torch.randn(1, hkv, 64, d))  # fixes the 8-bit norms' ranges
    table = RopeTable(5e5 ** -(torch.arange(d // 2, dtype=torch.float64) / (d // 2)), 1.0)
    for b, length, kp, vp, q, ks, vs in decode_inputs(codec, hq, hkv):
        rope = RopeBias(torch.randn(b, hq, d, device="cuda"), table.joined_range(0, max(length, kernels.ROPE_TABLE_MIN_ROWS), "cuda"), 0, 1.0)
        yield codec, (b, length, kp, vp, q, ks, vs, rope, torch.rand(b, hq, 1, device="cuda") * 1e-3)


@click.command()
@click.option("--rounds", default=7, show_default=True)
@click.option("--out", default=None, help="JSON file for the per-round times and medians.")
def main(rounds: int, out: str | None) -> None:
    d = 128
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": []}
    for codec, (b, length, kp, vp, q, ks, vs, rope, norm_bias) in biased_decode_inputs(d=d):
        qs = q[:, :, None]
        rope_call = lambda: kernels.decode_attention(q, codec, codec, kp, vp, None, None, d**-0.5, rope_bias=rope)  # noqa: E731
        both_call = lambda: kernels.decode_attention(q, codec, codec, kp, vp, None, None, d**-0.5, rope_bias=rope, norm_bias=norm_bias)  # noqa: E731
        calls = {
            "bf16 SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True),
            "k4v4": lambda: kernels.decode_attention(q, codec, codec, kp, vp, None, None, d**-0.5),
            "k4v4 + rope bias (warp)": rope_call,
            "k4v4 + rope bias + norm bias (warp)": both_call,
            "k4v4 + rope bias (split)": _split_kernel(rope_call),
            "k4v4 + rope bias + norm bias (split)": _split_kernel(both_call),
            "rope bias dense alone": lambda: kernels.rope_bias_dense(rope, length),
        }
        times = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                times[name].append(_ms_graph(call, 50))
        med = {name: statistics.median(t) for name, t in times.items()}
        result["shapes"].append({"B": b, "L": length, "ms": times, "median_ms": med,
                                 "ratio_to_sdpa": {n: med[n] / med["bf16 SDPA"] for n in calls if n != "bf16 SDPA"}})
        click.echo(f"B={b} L={length}: " + " | ".join(f"{n} {med[n]:.4f} ms" + (f" ({med[n] / med['bf16 SDPA']:.2f}x)" if n != "bf16 SDPA" else "")
                                                        for n in calls))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

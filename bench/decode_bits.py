"""Fused decode attention at every bit width the kernels read, against bf16 SDPA (one GPU).

    python3 bench/decode_bits.py --out decode_bits.json

Llama-3.1-8B heads (32 query / 8 KV heads, d 128), B=8 at 32k tokens; random codes and fp16 norms in each codec's
format (`cli.bench._random_parts`); GPU time per call of `kernels.decode_attention` from CUDA-graph replays
(`cli.bench._ms_graph`), bf16 SDPA timed in the same rounds. Codecs: one group of b = 2, 3, 4, 5, 6, 8 bits on both sides
(4 bits takes the Gluon register-table kernel, the others the Triton split kernel), and split codecs with a 5- or
6-bit group (what `-e5.3` / `-e6.2` keys store: an eigen split's groups, here on channel indices 0..n-1).

    python3 bench/decode_bits.py --trellis --out decode_trellis.json

instead times trellis codes (`tqpatch.trellis`, read by window in the split kernel) against the same codecs' Lloyd-Max
codes: k2v2, k3v3, k4v4 (Lloyd-Max k4v4 on the warp kernel and, with it switched off, on the split kernel), the
e6.2 split, and the codes of 3.5bit+ (4-bit keys, 3-bit values) and 2.5bit+ (64 channels at 3 bits + 64 at 2).
"""

from __future__ import annotations

import json
import statistics

import click
import torch

from cli.bench import _ms_graph, _random_parts
from tqpatch import kernels
from tqpatch.codec import SplitCodec, TurboQuantCodec


def _split(d: int, groups: tuple[int, int, int], trellis: bool = False) -> SplitCodec:
    codec = SplitCodec(d, 0.0, groups=groups, trellis=trellis)
    codec.calibrate_leading(8)  # the first n channels are the high group in every KV head
    return codec


@click.command()
@click.option("--rounds", default=5, show_default=True)
@click.option("--out", default=None, help="JSON file for the per-round times and medians.")
@click.option("--trellis", is_flag=True, help="Trellis codes against Lloyd-Max codes of the same bits instead.")
def main(rounds: int, out: str | None, trellis: bool) -> None:
    hq, hkv, d, b, length = 32, 8, 128, 8, 32768
    whole = lambda bits, tr=False: TurboQuantCodec(d, bits, "mse", 0, trellis=tr)  # noqa: E731
    split_kernel = set()  # codecs timed with the warp kernels switched off
    if trellis:
        codecs = {}
        for bits in (2, 3, 4):
            codecs[f"k{bits}v{bits}"] = (whole(bits),) * 2
            if bits == 4:
                codecs["k4v4, split kernel"] = (whole(4),) * 2
                split_kernel.add("k4v4, split kernel")
            codecs[f"k{bits}v{bits} trellis"] = (whole(bits, True),) * 2
        codecs["keys e6.2 (56 at 6 b + 72 at 2 b), values 4 b"] = (_split(d, (56, 6, 2)), whole(4))
        codecs["keys e6.2, values 4 b, trellis"] = (_split(d, (56, 6, 2), True), whole(4, True))
        codecs["k4v3 (3.5bit+ codes)"] = (whole(4), whole(3))
        codecs["k4v3 trellis (3.5bit+ now)"] = (whole(4, True), whole(3, True))
        codecs["k2.5v2.5 (64 at 3 b + 64 at 2 b)"] = (_split(d, (64, 3, 2)),) * 2
        codecs["k2.5v2.5 trellis (2.5bit+ now)"] = (_split(d, (64, 3, 2), True),) * 2
    else:
        codecs = {f"k{bits}v{bits}": (whole(bits),) * 2 for bits in (2, 3, 4, 5, 6, 8)}
        codecs["keys 56 at 6 b + 72 at 2 b (e6.2), values 4 b"] = (_split(d, (56, 6, 2)), whole(4))
        codecs["keys 48 at 5 b + 80 at 3 b (e5.3), values 4 b"] = (_split(d, (48, 5, 3)), whole(4))
        codecs["keys 56 at 6 b + 72 at 2 b, values 3 b"] = (_split(d, (56, 6, 2)), whole(3))
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
    ks = torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16)
    vs = torch.randn_like(ks)
    parts = {name: (_random_parts(kc, b, hkv, length), _random_parts(vc, b, hkv, length)) for name, (kc, vc) in codecs.items()}
    times = {name: [] for name in ["bf16 SDPA", *codecs]}
    warp_default = kernels.DECODE_TUNING["warp_kernel"]
    for _ in range(rounds):
        times["bf16 SDPA"].append(_ms_graph(lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], ks, vs, enable_gqa=True), 20))
        for name, (kc, vc) in codecs.items():
            kp, vp = parts[name]
            kernels.DECODE_TUNING["warp_kernel"] = warp_default and name not in split_kernel  # read at capture: the graph keeps that kernel
            try:
                times[name].append(_ms_graph(lambda: kernels.decode_attention(q, kc, vc, kp, vp, None, None, d**-0.5), 20))
            finally:
                kernels.DECODE_TUNING["warp_kernel"] = warp_default
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "B": b, "L": length, "ms": times, "median_ms": med,
              "ratio_to_sdpa": {n: med[n] / med["bf16 SDPA"] for n in codecs}}
    for name, t in med.items():
        click.echo(f"{name:<48} {t:.4f} ms" + (f"  ({t / med['bf16 SDPA']:.2f}x bf16 SDPA)" if name != "bf16 SDPA" else ""))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

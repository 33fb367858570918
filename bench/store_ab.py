"""Interleaved A/B timing of x16 store-kernel settings on the 32k-token prefill at B=8 (one GPU).

    python3 bench/store_ab.py --rounds 7 --out store_ab.json

The store sweep in `tqpatch bench` times each setting once, and settings within ~3% of each other swapped places
from run to run (runs 58, 61, 62). Here every round times every setting once, in turn, so slow drift of the card
(clocks, temperature) hits all of them alike; the medians over rounds and each setting's spread are printed and
written as JSON, with the device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import json
import statistics

import click
import torch

from cli.bench import _ms_graph, copy_bandwidth
from tqpatch import kernels
from tqpatch.codec import TurboQuantCodec

# (name, STORE_TUNING overrides): the default, then what it is compared with
SETTINGS = [
    ("default", {}),
    ("3 stages", {"x16_num_stages": 3}),
    ("4 stages", {"x16_num_stages": 4}),
    ("4 stages, 232 registers", {"x16_num_stages": 4, "x16_maxnreg": 232}),
    ("no register cap", {"x16_maxnreg": None}),
]


@click.command()
@click.option("--rounds", default=7, show_default=True, help="Times each setting is timed (each a CUDA-graph replay of 20 calls).")
@click.option("--bits", default=4, show_default=True)
@click.option("--out", type=click.Path(), default=None, help="JSON file for the timings.")
def main(rounds: int, bits: int, out: str | None) -> None:
    b, h, t, d = 8, 8, 32768, 128
    codec = TurboQuantCodec(d, bits, "mse", 0)
    x = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # the model's layout
    parts = {n: torch.empty(b, h, t, *p.shape[3:], dtype=p.dtype, device="cuda") for n, p in kernels.encode(codec, x[:, :, :16]).items()}
    nbytes = x.numel() * 2 + sum(p.numel() * p.element_size() for p in parts.values())
    bw = copy_bandwidth()
    saved = dict(kernels.STORE_TUNING)
    times: dict[str, list[float]] = {name: [] for name, _ in SETTINGS}
    try:
        for _ in range(rounds):
            for name, knobs in SETTINGS:
                kernels.STORE_TUNING.update(saved)
                kernels.STORE_TUNING.update(knobs)
                times[name].append(_ms_graph(lambda: kernels.encode_into(codec, x, parts), 20))
    finally:
        kernels.STORE_TUNING.update(saved)
    rows = []
    for name, knobs in SETTINGS:
        ms = statistics.median(times[name])
        rows.append({"setting": name, "knobs": knobs, "ms_median": ms, "ms_min": min(times[name]), "ms_max": max(times[name]),
                     "fraction_of_copy": nbytes / (ms * 1e-3) / bw, "ms_all": times[name]})
        click.echo(f"{name:28s} median {ms:.4f} ms ({rows[-1]['fraction_of_copy']:.1%} of copy), min {min(times[name]):.4f}, max {max(times[name]):.4f}")
    result = {"gpu": torch.cuda.get_device_name(), "copy_bandwidth_GB_per_s": bw / 1e9, "bytes": nbytes, "bits": bits,
              "shape": [b, h, t, d], "defaults": {k: v for k, v in saved.items() if k.startswith("x16")}, "rows": rows}
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

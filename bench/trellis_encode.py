"""Trellis codes' encode cost (the Viterbi search, `tqpatch.trellis.viterbi_encode`) against Lloyd-Max's (a bucketize),
on the device at hand: one decode step's vectors and one 2,048-token prefill, Llama-3.1-8B KV heads (8 × d 128).
Rows: a whole `quantize` with Lloyd-Max codes and with trellis codes (on CUDA the Triton encoder,
`tqpatch.kernels.viterbi`), and the PyTorch Viterbi alone (`viterbi_encode_reference`, what CUDA ran before it).

    python3 bench/trellis_encode.py --out trellis_encode.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tqpatch import TurboQuantMSE
from tqpatch.trellis import get_trellis, viterbi_encode_reference


def _time(fn, device: torch.device, rounds: int) -> float:
    """Median wall time of fn() in ms (synchronised on CUDA)."""
    fn()
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for label, tokens, batch in (("decode step, B=8", 1, 8), ("prefill 2048 tokens, B=1", 2048, 1)):
        x = torch.randn(batch, 8, tokens, 128, device=device)
        y = torch.randn(batch * 8 * tokens, 128, device=device)  # rotated coordinates at unit variance
        for bits in (1, 2, 3, 4):
            lloyd_max, trellis, book = TurboQuantMSE(128, bits), TurboQuantMSE(128, bits, trellis=True), get_trellis(bits)
            runs = {"Lloyd-Max quantize": lambda: lloyd_max.quantize(x), "trellis quantize": lambda: trellis.quantize(x),
                    "PyTorch Viterbi alone": lambda: viterbi_encode_reference(y, book)}
            for what, fn in runs.items():
                ms = _time(fn, device, args.rounds)
                rows.append(dict(shape=label, vectors=batch * 8 * tokens, bits=bits, what=what, ms=round(ms, 3)))
                print(f"{label:<26} {bits} bits {what:<22} {ms:9.3f} ms", flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device_name, torch=torch.__version__, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()

"""Output error of the LUT decode kernel's key scoring and value variants against the float32 PyTorch reference
(run 73; int8 values: run 79).

    python3 bench/int8_keys_error.py      (needs CUDA and Gluon)

`DECODE_TUNING["warp_lut_int8_keys"]`: 0 fp16 look-ups and mmas, 1 int8 mmas with the query rounded to int8 per
column, 2 the same plus the query's remainder as a second int8 mma; `warp_lut_int8_values` 1: values from their
7-bit table as fp16 1024 + u. k4v4 codes of random keys and values (norms spread
over 3 octaves), B=2, 8 KV heads, 4 query heads each, d 128, 4099 tokens; queries N(0, σ²) with σ 1/3 (flat
attention) and 2 (peaked: scores with a standard deviation of ~2/√d · |k| · √d). Prints relative error and cosine.
"""

from __future__ import annotations

import torch

from tqpatch import kernels
from tqpatch.codec import TurboQuantCodec


def main() -> None:
    default = dict(kernels.DECODE_TUNING)
    gen = torch.Generator().manual_seed(0)
    d, hkv, group, length = 128, 8, 4, 4099
    kc, vc = TurboQuantCodec(d, 4, "mse", seed=5), TurboQuantCodec(d, 4, "mse", seed=6)
    scale = torch.exp2(torch.rand(2, hkv, length, 1, generator=gen) * 3)
    kp = {n: t.cuda() for n, t in kc.encode(torch.randn(2, hkv, length, d, generator=gen) * scale).items()}
    vp = {n: t.cuda() for n, t in vc.encode(torch.randn(2, hkv, length, d, generator=gen)).items()}
    for sigma in (1 / 3, 2.0):
        q = (torch.randn(2, hkv * group, d, generator=gen) * sigma).cuda().to(torch.bfloat16)
        ref = kernels.decode_attention_reference(q, kc, vc, kp, vp, None, None, d**-0.5)
        for mode, values in ((0, 0), (1, 0), (2, 0), (0, 1), (1, 1)):
            kernels.DECODE_TUNING.update(warp_lut_int8_keys=mode, warp_lut_int8_values=values)
            out = kernels.decode_attention(q, kc, vc, kp, vp, None, None, d**-0.5, out_dtype=torch.float32)
            rel = ((out - ref).norm() / ref.norm()).item()
            cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.float().flatten(), dim=0).item()
            print(f"query sigma {sigma:.2f}  int8 keys {mode}, int8 values {values}: relative error {rel:.2e}, cosine {cos:.6f}", flush=True)
    kernels.DECODE_TUNING.update(default)


if __name__ == "__main__":
    main()

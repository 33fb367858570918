"""One launch of each Triton kernel at the headline shapes, for Nsight Compute (ncu) to read the hardware counters.

    ncu --clock-control none -k regex:_tq_ --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section LaunchStats --section WarpStateStats python3 bench/profile_kernels.py

Shapes (Llama-3.1-8B KV heads): store: B=8, 8 KV heads, 32,768 tokens, d=128, 4-bit mse, bf16 input in
the model's [B, T, H, d] layout; decode: k4v4 codes, B=8, 32 query / 8 KV heads, L=32,768, without and
with one exact token (the latter adds the combine kernel's window work). TQ_INT8_KEYS=0/1/2 in the environment sets
the LUT kernel's key scoring (`DECODE_TUNING["warp_lut_int8_keys"]`), TQ_DECODE_SHAPE=BxL the decode shape. Each kernel is compiled by a
first call outside the profiled range, so the profiled launches are steady-state ones.
"""

import os

import torch

from tqpatch import kernels
from tqpatch.codec import TurboQuantCodec


def random_parts(codec, b, h, length):
    return {
        "codes": torch.randint(0, 256, (b, h, length, codec.head_dim * codec.bits // 8), dtype=torch.uint8, device="cuda"),
        "norms": (torch.rand(b, h, length, device="cuda") + 0.5).half(),
    }


def main():
    b, h, t, d, hq = 8, 8, 32768, 128, 32
    kernels.DECODE_TUNING["warp_lut_int8_keys"] = int(os.environ.get("TQ_INT8_KEYS", kernels.DECODE_TUNING["warp_lut_int8_keys"]))
    codec = TurboQuantCodec(d, 4, "mse", 0)
    x = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    out = kernels.encode(codec, x[:, :, :64])  # compile
    out = {"codes": torch.empty(b, h, t, d // 2, dtype=torch.uint8, device="cuda"), "norms": torch.empty(b, h, t, dtype=torch.float16, device="cuda")}
    if "TQ_DECODE_SHAPE" in os.environ:  # e.g. 1x131072: the decode kernels at another B x L (the store keeps its shape)
        b, t = map(int, os.environ["TQ_DECODE_SHAPE"].split("x"))
    kp, vp = random_parts(codec, b, h, t), random_parts(codec, b, h, t)
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
    fk = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16)
    kernels.decode_attention(q, codec, codec, kp, vp, None, None, d**-0.5)  # compile
    kernels.decode_attention(q, codec, codec, kp, vp, fk, fk, d**-0.5)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    kernels.encode_into(codec, x, out)
    kernels.decode_attention(q, codec, codec, kp, vp, None, None, d**-0.5)
    kernels.decode_attention(q, codec, codec, kp, vp, fk, fk, d**-0.5)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()

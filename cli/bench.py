"""`tqpatch bench`: GPU speed of the store kernel, the fused decode attention and end-to-end decoding.

One run on one GPU (cuda:0), everything timed with CUDA events after warm-up, medians of many:
  (a) store kernel: a 32k-token prefill at B=8 (Llama-3.1-8B K/V heads) and a one-token append;
  (b) decode attention on k4v4 / k2v2 codes vs. bf16 scaled_dot_product_attention, same shapes: per call
      (synced), back to back, and as CUDA-graph replays (GPU time with no host); the decode kernels' settings
      are swept first (TQ_SWEEP=warp in the environment sweeps only the Gluon warp kernels');
  (c) end-to-end decode tokens/s of a random-weight Llama-3.1-8B-shaped model at B=8, 32k context:
      tqpatch k4v4 / k2v2 vs. bf16 DynamicCache vs. transformers' QuantizedCache (quanto, 4 bits);
      caches are filled directly with random K/V (a 32k prefill of 8 sequences would cost a minute of GPU);
  (d) the largest batch that fits at 32k for each, from the measured bytes per sequence and per-step
      peak, then checked by filling and decoding at that batch.
Writes JSON and prints a table. Random data everywhere (never zeros).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import click
import torch

LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
)


def _ms(fn, warmup: int = 5, reps: int = 50) -> float:
    """Median milliseconds of fn() over `reps` runs, CUDA events, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _ms_back_to_back(fn, reps: int = 50) -> float:
    """Milliseconds per call of `reps` calls issued back to back between two CUDA events (after a warm-up call).

    `_ms` syncs after every call, so host time spent before the first kernel
    (Python, argument checks, launches) shows up as GPU idle time; here the
    host runs ahead while the GPU works, so this is the GPU's time per call
    wherever the host is faster than the GPU (as inside a CUDA graph).
    """
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _ms_graph(fn, reps: int = 50) -> float | None:
    """Milliseconds per call of `fn` captured once in a CUDA graph and replayed `reps` times between two CUDA events:
    the GPU's time per call with no host in the way (None where `fn` cannot be captured)."""
    fn()
    torch.cuda.synchronize()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # noqa: BLE001 (reported, not fatal)
        click.echo(f"CUDA graph capture failed: {str(exc)[:200]}", err=True)
        return None
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) / reps


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _ms(lambda: dst.copy_(src), 3, 20)
    del src, dst
    return 2 * n / (ms * 1e-3)


def _random_parts(codec, b, h, length, device="cuda"):
    """Parts of `length` random tokens in the codec's format: uniform random code bytes (and 8-bit norm codes),
    float16 norms in 5..15. The codec is calibrated first on one random token (split channels, norm ranges)."""
    proto = codec.encode(torch.randn(1, h, 1, codec.head_dim))
    out = {}
    for name, like in proto.items():
        shape = (b, h, length, *like.shape[3:])
        if like.dtype == torch.uint8:
            out[name] = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        else:
            out[name] = (torch.rand(shape, device=device) + 0.5).to(like.dtype) * 10
    return out


def bench_store(bw: float) -> dict:
    from tqpatch import kernels
    from tqpatch.codec import TurboQuantCodec

    b, h, t, d = 8, 8, 32768, 128
    rows = []
    for bits, method, norm_bits in ((4, "mse", 16), (4, "mse", 8), (2, "mse", 16), (4, "prod", 16)):
        codec = TurboQuantCodec(d, bits, method, 0, norm_bits)
        x = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # the model's layout
        out = kernels.encode(codec, x[:, :, :16])
        out = {n: torch.empty(b, h, t, *p.shape[3:], dtype=p.dtype, device="cuda") for n, p in out.items()}
        ms_events = _ms(lambda: kernels.encode_into(codec, x, out), 3, 20)  # each call timed alone: host launch included
        ms = _ms_graph(lambda: kernels.encode_into(codec, x, out), 20) or ms_events  # GPU time per call
        nbytes = x.numel() * 2 + sum(p.numel() * p.element_size() for p in out.values())
        one = x[:, :, :1]
        one_out = {n: p[:, :, :1] for n, p in out.items()}
        ms_one = _ms(lambda: kernels.encode_into(codec, one, one_out), 10, 200)
        rows.append({
            "what": f"store {codec.bits}-bit {method}{'' if norm_bits == 16 else ', 8-bit norms'}, B={b} Hkv={h} T={t} d={d}",
            "ms": ms, "ms_events": ms_events, "bytes": nbytes, "GB_per_s": nbytes / ms / 1e6, "fraction_of_copy": nbytes / (ms * 1e-3) / bw,
            "append_one_token_ms": ms_one,
        })
        del x, out
    return {"rows": rows}


def bench_store_sweep(bw: float) -> dict:
    """Store-kernel launch settings (rotation precision, row block, column block, warps, stages, x16 quantizer) on the 32k
    prefill at B=8: time, bandwidth, and how far the codes move from the float32 reference (the fraction of codes that
    differ, SQNR of the decode, distortion of x)."""
    from tqpatch import kernels
    from tqpatch.codec import TurboQuantCodec
    from tqpatch.packing import unpack_codes

    b, h, t, d = 8, 8, 32768, 128
    codec = TurboQuantCodec(d, 4, "mse", 0)
    x = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    out = {"codes": torch.empty(b, h, t, d // 2, dtype=torch.uint8, device="cuda"), "norms": torch.empty(b, h, t, dtype=torch.float16, device="cuda")}
    nbytes = x.numel() * 2 + sum(p.numel() * p.element_size() for p in out.values())
    probe32 = torch.randn(1, h, 2048, d, device="cuda")
    x[:1, :, :2048] = probe32.to(torch.bfloat16)
    probe = x[:1, :, :2048]
    ref = codec.encode(probe)
    ref_deq = codec.decode(ref, torch.float32)
    # the yardstick: how far the codes of the bfloat16 probe are from those of the float32 vectors it rounds
    exact = codec.encode(probe32)
    input_rounding = {
        "code_mismatch": (unpack_codes(ref["codes"], 4, d) != unpack_codes(exact["codes"], 4, d)).float().mean().item(),
        "distortion_vs_float32_codes": ((ref_deq - probe32).pow(2).sum() / (codec.decode(exact, torch.float32) - probe32).pow(2).sum()).item(),
    }
    print("store sweep: bfloat16 rounding of x itself", input_rounding, flush=True)
    saved = dict(kernels.STORE_TUNING)
    rows = []
    try:
        # (precision, row block, column block, warps, stages); word stores on (run 8: always faster)
        configs = [("fp16x3", 64, 128, 4, 1, {})]
        # the x16 kernel with hi + lo splits of the rotation (two MMAs): rows, warps, stages, and the STORE_TUNING knobs
        # that differ from `base` (set in full, so a row means the same whatever the defaults are); each knob off once
        # (runs 54 and 57 swept more tiles: bench/RESULTS.md); 128 / 8 / 1 at 128 registers was its best tile; the last
        # row has the run-33 settings (float32 quantizer, plain loads and stores, 64-column chains)
        base = dict(x16_quantizer="f16x2", x16_channel_block=128, x16_tma=True, x16_asm_store=True, x16_maxnreg=168, x16_programs_per_sm=None)
        old = dict(x16_quantizer="f32", x16_tma=False, x16_asm_store=False, x16_channel_block=64)
        configs += [("x16", r, None, n, st, knobs) for r, n, st, knobs in (
            (64, 4, 3, {}), (64, 4, 3, dict(x16_quantizer="f32")), (64, 4, 3, dict(x16_tma=False)), (64, 4, 3, dict(x16_asm_store=False)),
            (64, 4, 3, dict(x16_channel_block=64)), (128, 8, 1, dict(x16_maxnreg=128)), (64, 4, 2, old))]
        # the default, Πᵀ's hi part alone (one MMA): its error is that of x's own bfloat16 rounding (the `input_rounding`
        # yardstick); run 57 chose 64 / 4 / 3. Without a cap ptxas gives the kernel 96 registers and interleaves ~2 pairs
        # in the quantizer; shared memory allows 2 programs per SM anyway, so caps of 168-232 registers cost no occupancy
        # and let ptxas interleave more (run 61)
        configs += [("x16-hi", r, None, n, st, knobs) for r, n, st, knobs in (
            (64, 4, 3, dict(x16_maxnreg=None)), (64, 4, 3, dict(x16_maxnreg=168)), (64, 4, 3, dict(x16_maxnreg=200)),
            (64, 4, 4, dict(x16_maxnreg=168)), (64, 4, 4, dict(x16_maxnreg=232)), (64, 4, 2, dict(x16_maxnreg=168)))]
        for precision, block_r, bn, warps, stages, knobs in configs:
            kernels.STORE_TUNING.update(saved)
            if precision.startswith("x16"):
                kernels.STORE_TUNING.update(precision=precision, x16_block_r=block_r, x16_num_warps=warps, x16_num_stages=stages, **{**base, **knobs})
            else:
                kernels.STORE_TUNING.update(precision=precision, block_r=block_r, bn=bn, num_warps=warps, num_stages=stages, word_store=True)
            row = {"precision": precision, "block_r": block_r, "bn": bn, "num_warps": warps, "num_stages": stages,
                   **{k: kernels.STORE_TUNING[k] for k in ("x16_quantizer", "x16_channel_block", "x16_tma", "x16_asm_store", "x16_maxnreg")
                      if precision.startswith("x16")}}
            try:
                ms_events = _ms(lambda: kernels.encode_into(codec, x, out), 2, 10)
                ms = _ms_graph(lambda: kernels.encode_into(codec, x, out), 20) or ms_events
                got = kernels.encode(codec, probe)
                deq = codec.decode(got, torch.float32)
                row.update(
                    ms=ms, ms_events=ms_events, GB_per_s=nbytes / ms / 1e6, fraction_of_copy=nbytes / (ms * 1e-3) / bw,
                    code_mismatch=(unpack_codes(got["codes"], 4, d) != unpack_codes(ref["codes"], 4, d)).float().mean().item(),
                    sqnr_db=10 * torch.log10(ref_deq.pow(2).sum() / (deq - ref_deq).pow(2).sum().clamp_min(1e-30)).item(),
                    # what the codes are for: their distortion of x, relative to the float32 reference's
                    distortion_vs_reference=((deq - probe.float()).pow(2).sum() / (ref_deq - probe.float()).pow(2).sum()).item(),
                )
            except Exception as exc:  # e.g. out of shared memory for this tile
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            print("store sweep", row, flush=True)
            rows.append(row)
    finally:
        kernels.STORE_TUNING.clear()
        kernels.STORE_TUNING.update(saved)
    return {"shape": f"B={b} Hkv={h} T={t} d={d}, 4-bit mse", "bytes": nbytes, "input_rounding": input_rounding, "rows": rows}


def _sdpa_ms(b, hq, hkv, length, d):
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = _ms(lambda: sdpa(q, k, v, enable_gqa=True))
    packed = q.view(b, hkv, hq // hkv, d)  # transformers packs GQA queries for one-token decode
    pack = _ms(lambda: sdpa(packed, k, v))
    fn = (lambda: sdpa(q, k, v, enable_gqa=True)) if gqa <= pack else (lambda: sdpa(packed, k, v))
    streamed = _ms_back_to_back(fn)
    graphed = _ms_graph(fn)
    del q, k, v
    return min(gqa, pack), {"enable_gqa": gqa, "packed_gqa": pack, "back_to_back": streamed, "graph": graphed}


def _tuning_of(trial_row: dict) -> dict:
    """The DECODE_TUNING settings of a sweep row (without its timing and codec name)."""
    return {k: v for k, v in trial_row.items() if k not in ("ms", "codecs")}


def bench_attention(bw: float, shapes) -> dict:
    from tqpatch import kernels
    from tqpatch.codec import SplitCodec, TurboQuantCodec

    hq, hkv, d = 32, 8, 128
    # choose the decode kernel's tile / warps / pipelining / centroid lookup / split count on the headline shape (k4v4, B=8, L=32k),
    # then the split codecs' tile and narrowest plane on 2.5 bits
    kc = TurboQuantCodec(d, 4, "mse", 0)
    kp, vp = _random_parts(kc, 8, hkv, 32768), _random_parts(kc, 8, hkv, 32768)
    q = torch.randn(8, hq, d, device="cuda", dtype=torch.bfloat16)
    sweep = []

    def trial(codecs=(kc, kc), name="k4v4", **tuning):
        """Times one setting as GPU time per call (a CUDA graph's replays; synced calls where capture fails)."""
        kernels.DECODE_TUNING.update(tuning)
        call = lambda: kernels.decode_attention(q, *codecs, kp, vp, None, None, d**-0.5)  # noqa: E731
        try:
            ms = _ms_graph(call, 20) or _ms(call, 3, 20)
            if tuning.get("warp_kernel") and not kernels.DECODE_TUNING["warp_kernel"]:  # the warp kernel failed: the split kernel answered
                ms = float("inf")
        except Exception as exc:  # a variant that does not compile is reported, not fatal
            ms = float("inf")
            click.echo(f"variant {tuning} failed: {str(exc)[:200]}", err=True)
        sweep.append({"codecs": name, **kernels.DECODE_TUNING, "ms": ms})

    if os.environ.get("TQ_SWEEP", "all") == "all":  # TQ_SWEEP=warp: keep the split kernel's defaults (saves device time)
        for block_t, warps in ((32, 4), (64, 4), (64, 8), (128, 8), (128, 16)):
            for stages in (2, 3):  # the Triton split kernel (k4v4 otherwise takes the Gluon warp kernel)
                trial(block_t=block_t, num_warps=warps, num_stages=stages, lut=0, programs_per_sm=4, warp_kernel=False)
        best = min(sweep, key=lambda r: r["ms"])
        for lut in (1, 2):  # the select-chain lookups (kernels._lookup) on the best tile
            trial(**{**_tuning_of(best), "lut": lut})
        best = min(sweep, key=lambda r: r["ms"])
        for per_sm in (2, 8, 16):
            trial(**{**_tuning_of(best), "programs_per_sm": per_sm})
        best = min(sweep, key=lambda r: r["ms"])
        kernels.DECODE_TUNING.update(_tuning_of(best))
    else:
        trial(warp_kernel=False)
    # the Gluon warp kernels (one warp per program): the register-table (LUT) kernel's split count, then the gather kernel's
    first = len(sweep)
    for per_sm in (16, 32, 64, 128):
        trial(name="k4v4-warp", warp_kernel=True, warp_lut=True, warp_programs_per_sm=per_sm, warp_min_split_tokens=512)
    best_warp = min(sweep[first:], key=lambda r: r["ms"])
    for min_tokens in (256, 1024):
        trial(name="k4v4-warp", **{**_tuning_of(best_warp), "warp_min_split_tokens": min_tokens})
    best_warp = min(sweep[first:], key=lambda r: r["ms"])
    for tokens, maxnreg in ((16, None), (16, 144), (16, 128), (32, 168), (32, None)):  # the LUT kernel's step and register cap
        trial(name="k4v4-warp", **{**_tuning_of(best_warp), "warp_lut_tokens": tokens, "warp_maxnreg": maxnreg})
    best_warp = min(sweep[first:], key=lambda r: r["ms"])
    for int8_keys in (0, 1, 2):  # keys by fp16 look-ups and mmas, or by int8 mmas (the query as int8, or int8 + remainder)
        for tokens, maxnreg in ((32, 168), (32, None)):
            trial(name="k4v4-warp", **{**_tuning_of(best_warp), "warp_lut_int8_keys": int8_keys, "warp_lut_tokens": tokens, "warp_maxnreg": maxnreg})
    best_warp = min(sweep[first:], key=lambda r: r["ms"])
    for pairs in (True, False):  # the gather kernel on the same splits
        trial(name="k4v4-warp", **{**_tuning_of(best_warp), "warp_lut": False, "warp_key_pairs": pairs})
    for block_s in (64, 128):  # the combine kernel's splits per round
        trial(name="k4v4-warp", **{**_tuning_of(best_warp), "combine_block_s": block_s})
    trial(name="k4v4-warp", **_tuning_of(best_warp))  # the same again: run-to-run spread
    best_warp = min(sweep[first:], key=lambda r: r["ms"])
    kernels.DECODE_TUNING.update({k: best_warp[k] for k in ("warp_kernel", "warp_lut", "warp_programs_per_sm", "warp_min_split_tokens", "warp_key_pairs",
                                                            "warp_maxnreg", "warp_lut_tokens", "warp_lut_int8_keys", "combine_block_s")})
    # split codecs (two code groups): their tile and the narrowest plane, on 2.5 bits (3-bit + 2-bit halves)
    split = SplitCodec(d, 2.5, 0, norm_bits=8)
    kp, vp = _random_parts(split, 8, hkv, 32768), _random_parts(split, 8, hkv, 32768)
    first = len(sweep)
    for split_block_t in (32, 64):
        for min_plane in (16, 32):
            trial((split, split), "2.5bit-n8", split_block_t=split_block_t, min_plane_width=min_plane)
    best = min(sweep[first:], key=lambda r: r["ms"])
    kernels.DECODE_TUNING.update(split_block_t=best["split_block_t"], min_plane_width=best["min_plane_width"])
    click.echo(f"decode kernel sweep: {sweep}; using {kernels.DECODE_TUNING}", err=True)
    del kp, vp
    rows = []
    for b, length in shapes:
        base, variants = _sdpa_ms(b, hq, hkv, length, d)
        bf16_bytes = 2 * b * hkv * length * d * 2
        row = {"B": b, "L": length, "bf16_sdpa_ms": base, "bf16_sdpa_variants": variants, "bf16_GB_per_s": bf16_bytes / base / 1e6}
        whole = lambda bits, method="mse", norm_bits=16: TurboQuantCodec(d, bits, method, 0, norm_bits)  # noqa: E731
        split = lambda bits, groups=None, norm_bits=16: SplitCodec(d, bits, 0, norm_bits=norm_bits, groups=groups)  # noqa: E731
        # (name, key codec, value codec, centroid lookup: None = the tuned one). Split codecs: two code groups per
        # vector; "k4v4-2groups" stores k4v4's bytes as two 64-channel groups (the cost of the second group alone).
        # "-split": k4v4 on the Triton split kernel instead of the Gluon warp kernel; "-gather": on the warp kernel that
        # gathers centroids from memory instead of the register-table (LUT) one; "-fp16keys" / "-int8q" / "-int8q-lo":
        # the LUT kernel with its keys scored by fp16 mmas / int8 mmas with the query as int8 / as int8 + remainder
        settings = (("k4v4", whole(4), whole(4), None), ("k4v4-fp16keys", whole(4), whole(4), None), ("k4v4-int8q", whole(4), whole(4), None),
                    ("k4v4-int8q-lo", whole(4), whole(4), None), ("k4v4-gather", whole(4), whole(4), None), ("k4v4-split", whole(4), whole(4), None),
                    ("k4v4-n8", whole(4, norm_bits=8), whole(4, norm_bits=8), None), ("k4v4-n8-split", whole(4, norm_bits=8), whole(4, norm_bits=8), None),
                    ("k2v2", whole(2), whole(2), None), ("k2v2-lut2", whole(2), whole(2), 2), ("k3v3", whole(3), whole(3), None),
                    ("k4v4-prod", whole(4, "prod"), whole(4), None),
                    ("k4v4-2groups", split(4, (64, 4, 4)), split(4, (64, 4, 4)), None),
                    ("3.5bit-n8", split(3.5, norm_bits=8), split(3.5, norm_bits=8), None),
                    ("2.5bit-n8", split(2.5, norm_bits=8), split(2.5, norm_bits=8), None))
        tuned_lut, tuned_warp_lut, tuned_i8 = kernels.DECODE_TUNING["lut"], kernels.DECODE_TUNING["warp_lut"], kernels.DECODE_TUNING["warp_lut_int8_keys"]
        for name, kc, vc, lut in settings:
            kernels.DECODE_TUNING["lut"] = tuned_lut if lut is None else lut
            kernels.DECODE_TUNING["warp_lut_int8_keys"] = {"k4v4-fp16keys": 0, "k4v4-int8q": 1, "k4v4-int8q-lo": 2}.get(name, tuned_i8)
            kernels.DECODE_TUNING["warp_kernel"] = not name.endswith("-split")
            kernels.DECODE_TUNING["warp_lut"] = tuned_warp_lut and not name.endswith("-gather")
            kp, vp = _random_parts(kc, b, hkv, length), _random_parts(vc, b, hkv, length)
            q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
            fk = torch.randn(b, hkv, 1, d, device="cuda", dtype=torch.bfloat16)
            ms = _ms(lambda: kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, d**-0.5))
            streamed = _ms_back_to_back(lambda: kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, d**-0.5))
            graphed = _ms_graph(lambda: kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, d**-0.5))
            nbytes = kernels.decode_bytes(b, hkv, length, kc, vc)
            row[name] = {"ms": ms, "ratio_to_bf16": ms / base, "bytes": nbytes, "GB_per_s": nbytes / ms / 1e6, "bytes_floor_ms": nbytes / bw * 1e3,
                         "back_to_back_ms": streamed, "back_to_back_ratio_to_bf16": streamed / variants["back_to_back"],
                         "graph_ms": graphed, "graph_ratio_to_bf16": graphed / variants["graph"] if graphed and variants["graph"] else None}
            del kp, vp
        kernels.DECODE_TUNING["lut"], kernels.DECODE_TUNING["warp_lut_int8_keys"] = tuned_lut, tuned_i8
        kernels.DECODE_TUNING["warp_kernel"], kernels.DECODE_TUNING["warp_lut"] = True, tuned_warp_lut
        row["k4v4_split_scan"] = _split_scan(kernels, whole(4), b, hq, hkv, length, d)
        row["rope_bias"] = _bench_rope_bias(kernels, b, hq, hkv, length, d, variants["back_to_back"])
        rows.append(row)
        torch.cuda.empty_cache()
    return {"tuning_sweep": sweep, "tuning": dict(kernels.DECODE_TUNING), "rows": rows}


def _split_scan(kernels, codec, b, hq, hkv, length, d) -> dict:
    """k4v4 on the warp kernel at explicit split counts around the default (GPU time per call, CUDA-graph replays).
    Run 57 measured it to test whether a partly filled last wave of one-warp programs costs time: the times show no
    step at the wave boundaries (bench/RESULTS.md)."""
    kp, vp = _random_parts(codec, b, hkv, length), _random_parts(codec, b, hkv, length)
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
    base = kernels.default_splits(b * hkv, length, kernels._sm_count(0), True, kernels.DECODE_TUNING["warp_lut_tokens"])
    counts = sorted({max(1, round(base * f)) for f in (0.5, 0.6, 0.7, 0.74, 0.77, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5)})
    out = {"default": base, "ms": {}}
    for n in counts:
        out["ms"][n] = _ms_graph(lambda: kernels.decode_attention(q, codec, codec, kp, vp, None, None, d**-0.5, num_splits=n), 20)
    click.echo(f"B={b} L={length} k4v4 split scan (ms by splits): {out['ms']}", err=True)
    del kp, vp
    return out


def _bench_rope_bias(kernels, b, hq, hkv, length, d, sdpa_ms) -> dict:
    """Centered keys' position bias ⟨q, R_p μ⟩ on k4v4 with 8-bit norms (what k4v4+ reads): as a dense [B, Hq, L]
    float32 tensor made per call (the product included in the timing), or evaluated inside the kernel (RopeBias) in
    tf32x3 or tf32; the output error of each against the dense float32 reference."""
    from tqpatch.codec import TurboQuantCodec
    from tqpatch.rope import RopeBias, RopeTable

    codec = TurboQuantCodec(d, 4, "mse", 0, 8)
    kp, vp = _random_parts(codec, b, hkv, length), _random_parts(codec, b, hkv, length)
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
    fk = torch.randn(b, hkv, 1, d, device="cuda", dtype=torch.bfloat16)
    table = RopeTable(5e5 ** -(torch.arange(d // 2, dtype=torch.float64) / (d // 2)), 1.0)  # Llama-3's base
    first = 4
    bias = RopeBias(torch.randn(b, hq, d, device="cuda") * 20, table.joined_range(0, first + length, "cuda"), first, 1.0)
    reference = kernels.decode_attention_reference(q, codec, codec, kp, vp, fk, fk, d**-0.5, key_bias=bias.dense(length))
    out = {}
    saved = kernels.DECODE_TUNING["rope_precision"]
    try:
        for name, call in (("dense", lambda: kernels.decode_attention(q, codec, codec, kp, vp, fk, fk, d**-0.5, key_bias=bias.dense(length))),
                           ("in_kernel_tf32x3", lambda: kernels.decode_attention(q, codec, codec, kp, vp, fk, fk, d**-0.5, rope_bias=bias)),
                           ("in_kernel_tf32", lambda: kernels.decode_attention(q, codec, codec, kp, vp, fk, fk, d**-0.5, rope_bias=bias))):
            kernels.DECODE_TUNING["rope_precision"] = "tf32" if name.endswith("tf32") else "tf32x3"
            result = call().float()
            error = ((result - reference).norm() / reference.norm()).item()
            streamed = _ms_back_to_back(call)
            out[name] = {"back_to_back_ms": streamed, "ratio_to_bf16": streamed / sdpa_ms, "rel_error_vs_float32": error}
    finally:
        kernels.DECODE_TUNING["rope_precision"] = saved
    click.echo(f"B={b} L={length} k4v4-n8 with the position bias: " + " | ".join(
        f"{k} {v['back_to_back_ms']:.3f} ms ({v['ratio_to_bf16']:.2f}x, rel. error {v['rel_error_vs_float32']:.1e})" for k, v in out.items()), err=True)
    return out


# -- end to end -------------------------------------------------------------------------------------------
def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_8B, num_hidden_layers=layers, attn_implementation="sdpa")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def _fill(model, method: str, batch: int, length: int):
    """A cache holding `length` random tokens per layer, in the method's own format."""
    from transformers import DynamicCache

    cfg = model.config
    layers, hkv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    if method == "quanto-int4":
        from transformers import QuantizedCache

        cache = QuantizedCache(backend="quanto", config=cfg, nbits=4)
    else:
        cache = DynamicCache(config=cfg)
    for i in range(layers):
        k = torch.randn(batch, hkv, length, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(batch, hkv, length, d, device="cuda", dtype=torch.bfloat16)
        if method.startswith("tqpatch"):
            module = model.model.layers[i].self_attn
            hook = module._hf_hook
            hook = next(h for h in getattr(hook, "hooks", [hook]) if hasattr(h, "new_layer"))
            layer = hook.new_layer(d, None)
            layer.fused = True  # store with the kernel (what a CUDA prefill does)
            positions = torch.arange(length, device="cuda")[None]
            layer.observe_rope(*model.model.rotary_emb(k, positions))  # what the hook does in a real prefill
            if layer.wants_queries:  # query-shaped keys: what the q_proj hook hands over in a real prefill
                layer.observe_queries(torch.randn(batch, min(length, 256), cfg.num_attention_heads, d, device="cuda"), hkv)
            layer.update(k, v)
            cache.layers[i] = layer
        else:
            cache.update(k, v, i)
        del k, v
    return cache


def _decode_ms(model, cache, batch: int, length: int, steps: int, warmup: int) -> list[float]:
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
    times = []
    with torch.no_grad():
        for step in range(warmup + steps):
            pos = torch.full((batch, 1), length + step, device="cuda", dtype=torch.long)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True)
            end.record()
            end.synchronize()
            ids = out.logits[:, -1:].argmax(-1)
            if step >= warmup:
                times.append(start.elapsed_time(end))
    return times


def _with_method(model, method: str):
    import tqpatch

    if tqpatch.is_patched(model):
        tqpatch.unpatch(model)
    if method.startswith("tqpatch-"):
        tqpatch.patch(model, tqpatch.TurboQuantConfig.from_spec(method.split("-", 1)[1]))


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def bench_end_to_end(model, methods, batch: int, length: int, steps: int) -> dict:
    rows = {}
    weights = torch.cuda.memory_allocated()
    for method in methods:
        _with_method(model, method)
        _free()
        try:
            base = torch.cuda.memory_allocated()
            t0 = time.time()
            cache = _fill(model, method, batch, length)
            fill_s = time.time() - t0
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated() - base
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            times = _decode_ms(model, cache, batch, length, steps, warmup=3)
            peak = torch.cuda.max_memory_allocated() - before
            ms = statistics.median(times)
            rows[method] = {
                "step_ms": ms, "tokens_per_s": batch / ms * 1e3, "step_ms_all": times, "fill_s": fill_s,
                "cache_bytes": held, "cache_bytes_per_seq": held / batch, "step_peak_extra_bytes": peak,
                "step_peak_extra_per_seq": peak / batch,
            }
            del cache
        except Exception as exc:  # report, keep benchmarking the others
            rows[method] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        _free()
    _with_method(model, "bf16")
    return {"batch": batch, "context": length, "weights_bytes": weights, "rows": rows}


def largest_batch(model, e2e: dict, length: int, verify: bool) -> dict:
    total = torch.cuda.get_device_properties(0).total_memory
    weights = e2e["weights_bytes"]
    margin = 2 << 30  # allocator slack, CUDA context, workspaces
    out = {}
    for method, row in e2e["rows"].items():
        if "error" in row:
            out[method] = {"error": row["error"]}
            continue
        per_seq = row["cache_bytes_per_seq"] * (length + 64) / length + row["step_peak_extra_per_seq"]
        predicted = int((total - weights - margin) // per_seq)
        entry = {"predicted": predicted, "bytes_per_seq_incl_step_peak": per_seq}
        if verify:
            batch = predicted
            for _ in range(3):
                _with_method(model, method)
                _free()
                try:
                    cache = _fill(model, method, batch, length)
                    _decode_ms(model, cache, batch, length, steps=2, warmup=0)
                    entry["verified"] = batch
                    del cache
                    break
                except torch.cuda.OutOfMemoryError:
                    entry.setdefault("oom_at", []).append(batch)
                    cache = None
                    batch = int(batch * 0.93)
                finally:
                    _free()
        out[method] = entry
    _with_method(model, "bf16")
    return out


def versions() -> dict:
    import transformers
    import triton

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton.__version__, "python": platform.python_version()}
    try:
        import optimum.quanto as quanto

        info["optimum-quanto"] = getattr(quanto, "__version__", "?")
    except Exception as exc:
        info["optimum-quanto"] = f"missing ({type(exc).__name__})"
    return info


ATTENTION_SHAPES = ((8, 32768), (1, 131072), (32, 32768), (1, 32768), (8, 4096), (16, 65536))


E2E_METHODS = ("bf16", "tqpatch-k4v4", "tqpatch-k2v2", "quanto-int4")


def run_bench(out: Path, layers: int, batch: int, context: int, steps: int, verify: bool, parts: str, shapes=ATTENTION_SHAPES,
              methods=E2E_METHODS) -> dict:
    if not torch.cuda.is_available():
        raise click.ClickException("tqpatch bench needs a CUDA GPU")
    torch.cuda.set_device(0)
    result = {"gpu": torch.cuda.get_device_name(0), "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory, "versions": versions()}
    bw = copy_bandwidth()
    result["copy_bandwidth_GB_per_s"] = bw / 1e9
    click.echo(f"{result['gpu']}: device copy {bw / 1e9:.0f} GB/s", err=True)
    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))

    if "store" in parts:
        result["store"] = bench_store(bw)
        save()
        click.echo(json.dumps(result["store"], indent=1), err=True)
    if "store_sweep" in parts:
        result["store_sweep"] = bench_store_sweep(bw)
        save()
    if "attention" in parts:
        result["attention"] = bench_attention(bw, shapes)
        click.echo(json.dumps(result["attention"], indent=1), err=True)
        save()
    if "e2e" in parts:
        _free()
        model = build_model(layers)
        methods = list(methods)
        result["end_to_end"] = e2e = bench_end_to_end(model, methods, batch, context, steps)
        e2e["layers"] = layers
        save()
        click.echo(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "step_ms_all"} for k, v in e2e["rows"].items()}, indent=1), err=True)
        if "fit" in parts:
            result["largest_batch"] = largest_batch(model, e2e, context, verify)
        del model
        _free()
    save()
    click.echo(table(result))
    return result


def table(result: dict) -> str:
    lines = [f"GPU {result['gpu']}, copy {result['copy_bandwidth_GB_per_s']:.0f} GB/s, " + ", ".join(f"{k} {v}" for k, v in result["versions"].items())]
    for row in result.get("store", {}).get("rows", []):
        lines.append(f"{row['what']}: {row['ms']:.3f} ms, {row['GB_per_s']:.0f} GB/s ({row['fraction_of_copy']:.0%} of copy); one-token append {row['append_one_token_ms'] * 1e3:.1f} us")
    for row in result.get("attention", {}).get("rows", []):
        cells = [f"B={row['B']:<3} L={row['L']:<6} bf16 SDPA {row['bf16_sdpa_ms']:.3f} ms"]
        # the settings timed (the split scan's "ms" is a dict of split count -> ms: it is printed while it runs)
        names = [name for name, value in row.items() if isinstance(value, dict) and isinstance(value.get("ms"), float)]
        cells += [f"{name} {row[name]['ms']:.3f} ms ({row[name]['ratio_to_bf16']:.2f}x)" for name in names]
        lines.append(" | ".join(cells))
        if "back_to_back" in row["bf16_sdpa_variants"]:
            cells = [f"  back to back (GPU time per call): bf16 SDPA {row['bf16_sdpa_variants']['back_to_back']:.3f} ms"]
            cells += [f"{name} {row[name]['back_to_back_ms']:.3f} ms ({row[name]['back_to_back_ratio_to_bf16']:.2f}x)" for name in names]
            lines.append(" | ".join(cells))
        if row["bf16_sdpa_variants"].get("graph"):
            cells = [f"  CUDA graph (GPU time per call, no host): bf16 SDPA {row['bf16_sdpa_variants']['graph']:.3f} ms"]
            cells += [f"{name} {row[name]['graph_ms']:.3f} ms ({row[name]['graph_ratio_to_bf16']:.2f}x)" for name in names if row[name].get("graph_ms")]
            lines.append(" | ".join(cells))
    e2e = result.get("end_to_end")
    if e2e:
        lines.append(f"end-to-end decode, {e2e['layers']} layers, B={e2e['batch']}, context {e2e['context']}:")
        base = e2e["rows"].get("bf16", {}).get("tokens_per_s")
        for name, row in e2e["rows"].items():
            if "error" in row:
                lines.append(f"  {name:<14} ERROR {row['error'][:120]}")
                continue
            rel = f" ({row['tokens_per_s'] / base:.2f}x bf16)" if base else ""
            lines.append(f"  {name:<14} {row['tokens_per_s']:8.1f} tok/s, step {row['step_ms']:.2f} ms{rel}, cache {row['cache_bytes_per_seq'] / 2**30:.2f} GiB/seq")
    fit = result.get("largest_batch")
    if fit:
        lines.append("largest batch at 32k context: " + ", ".join(f"{k} {v.get('verified', v.get('predicted', 'n/a'))}" for k, v in fit.items()))
    return "\n".join(lines)


def register(main: click.Group, eval_group: click.Group) -> None:
    main.add_command(bench_command)


@click.command("bench")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("results/bench.json"), help="Where to write the JSON.")
@click.option("--layers", type=int, default=32, help="Decoder layers of the random-weight Llama-3.1-8B-shaped model.")
@click.option("--batch", type=int, default=8, help="Batch of the end-to-end decode.")
@click.option("--context", type=int, default=32768, help="Cached tokens per sequence for the end-to-end decode.")
@click.option("--steps", type=int, default=10, help="Timed decode steps (after 3 warm-up steps).")
@click.option("--verify/--no-verify", default=True, help="Check the predicted largest batch by filling and decoding at it.")
@click.option("--parts", default="store,attention,e2e,fit", help="Comma-separated: store, store_sweep, attention, e2e, fit.")
@click.option("--shapes", default=None, help="Attention shapes as BxL, comma-separated (default: all six of bench/RESULTS.md), e.g. 8x32768,1x131072.")
@click.option("--methods", default=",".join(E2E_METHODS), help="End-to-end caches, comma-separated: bf16, quanto-int4, tqpatch-<preset or spec> (e.g. tqpatch-k4v4+, tqpatch-k4v4-s4-ck-qs).")
def bench_command(out: Path, layers: int, batch: int, context: int, steps: int, verify: bool, parts: str, shapes: str | None, methods: str) -> None:
    """Time the kernels and end-to-end decoding on cuda:0 (see bench/RESULTS.md)."""
    chosen = tuple(tuple(int(x) for x in s.split("x")) for s in shapes.split(",")) if shapes else ATTENTION_SHAPES
    run_bench(out, layers, batch, context, steps, verify, set(parts.split(",")), chosen, methods.split(","))


if __name__ == "__main__":
    bench_command()

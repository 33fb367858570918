"""Triton kernels vs. the PyTorch reference, on fresh random inputs.

Runs on CUDA when a GPU and Triton are present, and on CPU under Triton's
interpreter when the environment says TRITON_INTERPRET=1 (slow; a developer's
check without a GPU). Otherwise every test here skips: CPU CI stays green.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from tqpatch import kernels
from tqpatch.codec import SplitCodec, TurboQuantCodec
from tqpatch.kernels.groups import code_groups
from tqpatch.packing import unpack_codes

if kernels.interpreting() and kernels.triton_available():
    DEVICE = "cpu"
elif torch.cuda.is_available() and kernels.triton_available():
    DEVICE = "cuda"
else:
    DEVICE = None

pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs CUDA + Triton (or TRITON_INTERPRET=1 with Triton installed)")
FAST = DEVICE == "cpu" and not os.environ.get("TQ_ALL_CASES")  # the interpreter is slow: fewer, smaller cases (TQ_ALL_CASES=1: all)

# Tolerances: scores and value sums use tf32/fp16 tensor-core operands (~1e-3 relative).
REL_TOL = 1e-2
COS_FLOOR = 0.9995
# The LUT kernel's int8 keys (DECODE_TUNING["warp_lut_int8_keys"] 1, the default, or 2) round the key centroids to
# 7 bits and the query to int8: ~1e-2 relative score error, 1.5-2.6e-2 on the output (bench/int8_keys_error.py, run 73);
# its int8 values (`warp_lut_int8_values`, the default) read the value centroids from their 7-bit table: 7.6e-3 alone,
# 1.8-2.7e-2 with int8 keys (run 79).
INT8_REL_TOL = 3e-2
INT8_COS_FLOOR = 0.999


def _code_mismatch(got: torch.Tensor, ref: torch.Tensor, bits: int, d: int) -> float:
    """The fraction of b-bit codes (unpacked from [..., d·b/8] bytes) that differ. The store kernels may move a code
    only to a neighbour, where its coordinate lies within rounding of the boundary between them (the x16 kernel's
    fp16x2 quantizer compares in fp16: ~1e-3 of the codes of random vectors at 4 bits); anything else fails here."""
    g, r = unpack_codes(got.cpu(), bits, d), unpack_codes(ref.cpu(), bits, d)
    assert (g.long() - r.long()).abs().max().item() <= 1, "a code moved past its neighbour"
    return (g != r).float().mean().item()


def _distortion_ratio(codec, got: dict, ref: dict, x: torch.Tensor) -> float:
    """Σ‖x − x̃‖² of the kernel's parts over that of the reference's: codes moved at a boundary cost nothing."""
    err = lambda parts: (codec.decode(parts, torch.float32) - x.float()).pow(2).sum().item()  # noqa: E731
    return err(got) / max(err(ref), 1e-30)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


STORE_CASES = [(d, bits, method) for d in (64, 128, 256) for bits, method in ((2, "mse"), (3, "mse"), (4, "mse"), (3, "prod"), (4, "prod"))]
STORE_CASES += [(64, 5, "mse"), (128, 6, "mse"), (128, 8, "mse"), (64, 7, "prod")]  # 5-8 bits: the generic kernel's binary search
if FAST:
    STORE_CASES = [c for c in STORE_CASES if c[0] != 256 or c[1:] == (4, "mse")]


@pytest.mark.parametrize("d,bits,method", STORE_CASES)
def test_store_kernel_matches_quantizer(d, bits, method):
    gen = torch.Generator().manual_seed(d * 10 + bits)
    codec = TurboQuantCodec(d, bits, method, seed=3)
    x = (torch.randn(2, 3, 37, d, generator=gen) * 2).to(DEVICE, torch.bfloat16)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # the model's [B, H, T, d] view of [B, T, H, d]
    got = kernels.encode(codec, x)
    ref = codec.encode(x)
    hi_only = method == "mse" and d in kernels.X16_DIMS and bits <= 4  # the x16 kernel with Πᵀ rounded to bfloat16 (see HI_ONLY)
    assert set(got) == set(ref)
    for name in ref:
        assert got[name].shape == ref[name].shape and got[name].dtype == ref[name].dtype, name
        if name == "codes":
            mismatch = _code_mismatch(got[name], ref[name], bits - (method == "prod"), d)  # prod: b - 1 bits of mse codes
            assert mismatch <= (HI_ONLY["mismatch"]["bfloat16"] if hi_only else 2e-3), (name, mismatch)
        elif ref[name].dtype == torch.uint8:
            # signs may differ only where a coordinate sits within float rounding of zero
            mismatch = (got[name] != ref[name]).float().mean().item()
            assert mismatch <= 2e-3, (name, mismatch)
        else:
            assert _rel(got[name], ref[name]) < 2e-3, name
    # what matters downstream: the dequantized vectors are as close to x as the reference's
    assert _distortion_ratio(codec, got, ref, x) < 1 + (HI_ONLY["distortion"]["bfloat16"] if hi_only else 1e-3)


@pytest.mark.parametrize("precision", ["fp16x3", "tf32x3"])
def test_store_kernel_split_precisions_give_the_float32_codes(precision, monkeypatch):
    """fp16x3 and tf32x3 carry ~22 significant bits: codes differ from float32 only within rounding of a boundary."""
    monkeypatch.setitem(kernels.STORE_TUNING, "precision", precision)
    gen = torch.Generator().manual_seed(5)
    codec = TurboQuantCodec(128, 4, "mse", seed=1)
    x = (torch.randn(3, 4, 61, 128, generator=gen) * 3).to(DEVICE)
    got, ref = kernels.encode(codec, x), codec.encode(x)
    assert (got["codes"] != ref["codes"]).float().mean().item() <= 1e-4
    assert _rel(got["norms"], ref["norms"]) < 1e-3


def test_store_kernel_rejects_fp16x3_for_prod_keys(monkeypatch):
    monkeypatch.setitem(kernels.STORE_TUNING, "precision", "fp16x3")
    with pytest.raises(ValueError, match="fp16x3 rotation supports mse codes only"):
        kernels.encode(TurboQuantCodec(64, 3, "prod"), torch.randn(1, 2, 4, 64, device=DEVICE))


@pytest.mark.parametrize("d,bits", [(64, 4), (128, 2), (256, 3)])
def test_store_kernel_writes_8_bit_norm_codes_like_the_codec(d, bits):
    gen = torch.Generator().manual_seed(d + bits)
    codec = TurboQuantCodec(d, bits, "mse", seed=2, norm_bits=8)
    x = torch.randn(2, 3, 45, d, generator=gen) * torch.exp2(torch.rand(2, 3, 45, 1, generator=gen) * 3)
    x[0, 1, 7] = 0  # a zero vector: norm code 0
    x = x.to(DEVICE)
    codec.prepare(x)  # both paths use the ranges fixed here
    got, ref = kernels.encode(codec, x), codec.encode(x)
    assert got["norms"].dtype == torch.uint8 and got["norms"][0, 1, 7] == 0
    assert (got["norms"] != ref["norms"]).float().mean().item() <= 2e-3  # log2 rounding may differ at a code boundary
    assert (got["norms"].int() - ref["norms"].int()).abs().max() <= 1
    assert (got["codes"] != ref["codes"]).float().mean().item() <= 2e-3
    deq, deq_ref = codec.decode(got, torch.float32), codec.decode(ref, torch.float32)
    assert 10 * torch.log10(deq_ref.pow(2).sum() / (deq - deq_ref).pow(2).sum().clamp_min(1e-30)).item() > 35


@pytest.mark.parametrize("key_norm_bits,value_norm_bits", [(8, 8), (8, 16), (16, 8)])
def test_decode_attention_reads_8_bit_norm_codes(key_norm_bits, value_norm_bits):
    gen = torch.Generator().manual_seed(key_norm_bits + 2 * value_norm_bits)
    kc, vc = TurboQuantCodec(128, 4, "mse", seed=1, norm_bits=key_norm_bits), TurboQuantCodec(128, 2, "mse", seed=1, norm_bits=value_norm_bits)
    scale_k = torch.exp2(torch.rand(2, 2, 333, 1, generator=gen) * 4)  # norms over 4 octaves
    kp = {n: t.to(DEVICE) for n, t in kc.encode(torch.randn(2, 2, 333, 128, generator=gen) * scale_k).items()}
    vp = {n: t.to(DEVICE) for n, t in vc.encode(torch.randn(2, 2, 333, 128, generator=gen) * scale_k.flip(2)).items()}
    q = (torch.randn(2, 8, 128, generator=gen) / 4).to(DEVICE, torch.bfloat16)
    fk = torch.randn(2, 2, 2, 128, generator=gen).to(DEVICE, torch.bfloat16)
    ref = kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, 128**-0.5)
    for splits in (None, 3):
        out = kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, 128**-0.5, out_dtype=torch.float32, num_splits=splits)
        assert _rel(out, ref) < REL_TOL and _cos(out, ref) > COS_FLOOR


def test_store_kernel_writes_into_buffer_views():
    codec = TurboQuantCodec(128, 4, "mse", seed=0)
    x = torch.randn(2, 4, 5, 128, device=DEVICE)
    storage = {"codes": torch.full((2, 4, 9, 64), 7, dtype=torch.uint8, device=DEVICE), "norms": torch.full((2, 4, 9), -1.0, dtype=torch.float16, device=DEVICE)}
    kernels.encode_into(codec, x, {k: v[:, :, 3:8] for k, v in storage.items()})
    ref = codec.encode(x)
    assert (storage["codes"][:, :, 3:8] != ref["codes"]).float().mean() <= 2e-3
    assert torch.all(storage["codes"][:, :, :3] == 7) and torch.all(storage["codes"][:, :, 8:] == 7)
    assert torch.all(storage["norms"][:, :, :3] == -1) and torch.all(storage["norms"][:, :, 8:] == -1)


X16_CASES = [(d, bits, dtype, norm_bits) for d in (32, 64, 128) for bits in (1, 2, 3, 4) for dtype in ("bfloat16", "float16") for norm_bits in (16, 8)]
if FAST:
    X16_CASES = [c for c in X16_CASES if c[2] == "float16" and (c[0] == 64 or c[3] == 16) and (c[1] in (3, 4) or c[0] == 32)]


def test_decode_falls_back_to_the_split_kernel_when_the_warp_kernel_fails(monkeypatch):
    """A Triton whose Gluon cannot build the warp kernel: one warning, then the split kernel (the same result)."""
    if DEVICE != "cuda":
        pytest.skip("the warp kernel runs on CUDA only")
    gen, kc, vc, kp, vp, q, fk = _random_decode_inputs(21, b=2, hkv=2, group=4, length=300, d=128, fp_tokens=1)
    ref = kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, 128**-0.5)

    def broken(*args, **kwargs):
        raise kernels.WarpKernelError("the Gluon warp decode kernel failed") from TypeError("no such Gluon API")

    monkeypatch.setattr(kernels, "_launch_decode_warp", broken)
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_kernel", True)
    with pytest.warns(RuntimeWarning, match="using the Triton split kernel"):
        out = kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, 128**-0.5, out_dtype=torch.float32)
    assert kernels.DECODE_TUNING["warp_kernel"] is False
    assert _rel(out, ref) < REL_TOL


# STORE_TUNING knobs of the x16 kernel beside its defaults (Πᵀ's hi part alone, fp16x2 quantizer, 64-row tiles on 4
# warps in 4 stages at 168 registers, 128-column MMA chains, TMA loads, stores from registers); the last one is run 33's kernel
# settings. The interpreter runs the float32 quantizer with plain loads and stores whatever is set.
_RUN33 = {"precision": "x16", "x16_quantizer": "f32", "x16_tma": False, "x16_asm_store": False, "x16_block_r": 64, "x16_num_warps": 4, "x16_num_stages": 2,
          "x16_channel_block": 64, "x16_maxnreg": None}
X16_TUNINGS = [{}, {"x16_quantizer": "f32"}, {"x16_channel_block": 64}, {"x16_maxnreg": None},
               {"x16_block_r": 128, "x16_num_warps": 8, "x16_num_stages": 1, "x16_maxnreg": 96}, {"precision": "x16"},
               {"precision": "x16", "x16_block_r": 128, "x16_num_warps": 8, "x16_num_stages": 1, "x16_maxnreg": 128}, _RUN33] if DEVICE == "cuda" else [{}]
# The default multiplies by Πᵀ rounded to x's dtype (one MMA): in bfloat16 that moves ~0.45% of the codes to a
# neighbour and adds ~3e-4 to the distortion of random vectors, as rounding x itself to bfloat16 does (bench/RESULTS.md,
# run 57; at d 32 and 3 bits up to 1.1e-3); in float16 ~0.05% of the codes. "x16" (hi + lo, two MMAs) keeps ~16 bits.
HI_ONLY = {"mismatch": {"bfloat16": 1e-2, "float16": 2e-3}, "distortion": {"bfloat16": 3e-3, "float16": 1e-3}}


@pytest.mark.parametrize("knobs", X16_TUNINGS, ids=lambda k: "run33" if k is _RUN33 else "-".join(f"{n.removeprefix('x16_')}={v}" for n, v in k.items()) or "defaults")
@pytest.mark.parametrize("d,bits,dtype,norm_bits", X16_CASES)
def test_x16_store_kernel_matches_the_codec(d, bits, dtype, norm_bits, knobs, monkeypatch):
    """The x16 store kernel (16-bit x times a hi + lo split of the rotation, codes packed in registers) writes the
    codec's codes and norms with each quantizer, MMA chain width, load and store path: ragged token counts (partial
    tiles), a zero vector, norms over 6 octaves, and a strided destination (the store buffer's free slots)."""
    if knobs.get("x16_channel_block", 0) > d:
        pytest.skip("one chain of d columns either way")
    for name, value in knobs.items():
        monkeypatch.setitem(kernels.STORE_TUNING, name, value)
    calls = []
    launch = kernels._launch_store_x16
    monkeypatch.setattr(kernels, "_launch_store_x16", lambda *a, **kw: calls.append(a[2].shape) or launch(*a, **kw))
    gen = torch.Generator().manual_seed(d * 100 + bits * 10 + norm_bits)
    codec = TurboQuantCodec(d, bits, "mse", seed=4, norm_bits=norm_bits)
    x = torch.randn(3, 37 + d, 2, d, generator=gen) * torch.exp2(torch.rand(3, 37 + d, 2, 1, generator=gen) * 6 - 2)
    x[1, 5, 0] = 0
    x = x.to(DEVICE, getattr(torch, dtype)).transpose(1, 2)  # the model's [B, H, T, d] view of [B, T, H, d]
    codec.prepare(x)  # both paths use the 8-bit norm ranges fixed here
    ref = codec.encode(x)
    storage = {n: torch.full((3, 2, x.shape[2] + 20, *t.shape[3:]), 7, dtype=t.dtype, device=DEVICE) for n, t in ref.items()}
    kernels.encode_into(codec, x, {n: t[:, :, 9 : 9 + x.shape[2]] for n, t in storage.items()})
    assert calls == [x.shape]
    got = {n: t[:, :, 9 : 9 + x.shape[2]] for n, t in storage.items()}
    hi_only = kernels.STORE_TUNING["precision"] != "x16"
    assert _code_mismatch(got["codes"], ref["codes"], bits, d) <= (HI_ONLY["mismatch"][dtype] if hi_only else 2e-3)
    assert torch.all(storage["codes"][:, :, :9] == 7) and torch.all(storage["codes"][:, :, 9 + x.shape[2] :] == 7)
    if norm_bits == 8:
        assert (got["norms"].int() - ref["norms"].int()).abs().max() <= 1 and got["norms"][1, 0, 5] == 0
    else:
        assert _rel(got["norms"], ref["norms"]) < 2e-3 and got["norms"][1, 0, 5] == 0
    assert _distortion_ratio(codec, got, ref, x) < 1 + (HI_ONLY["distortion"][dtype] if hi_only else 1e-3)


DECODE_CASES = [
    # d, Hkv, group, L, F, key bits, value bits, key method, masked
    (128, 8, 4, 4099, 1, 4, 4, "mse", False),
    (128, 2, 1, 777, 3, 2, 2, "mse", True),
    (128, 1, 8, 1001, 17, 3, 3, "mse", True),
    (64, 3, 4, 513, 1, 4, 2, "mse", False),
    (64, 2, 8, 129, 0, 2, 4, "mse", True),
    (256, 2, 4, 300, 5, 4, 4, "mse", True),
    (128, 2, 4, 1500, 2, 4, 4, "prod", True),
    (64, 2, 1, 333, 1, 3, 2, "prod", False),
    (128, 4, 4, 65, 129, 4, 4, "mse", True),
    (128, 2, 4, 300, 2, 8, 5, "mse", True),  # 5-8 bits: codes unpacked from 40-56-bit words, 32-256-entry tables
    (64, 2, 8, 257, 1, 6, 7, "prod", False),
    (128, 1, 4, 200, 1, 5, 6, "mse", False),
]
if FAST:
    DECODE_CASES = [c[:3] + (min(c[3], 300),) + c[4:] for c in DECODE_CASES if c[1] * c[2] <= 16]


@pytest.mark.parametrize("d,hkv,group,length,nfp,kbits,vbits,method,masked", DECODE_CASES)
def test_decode_attention_matches_reference(d, hkv, group, length, nfp, kbits, vbits, method, masked, monkeypatch):
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_int8_keys", 0)  # exact keys and values at REL_TOL; the int8 defaults: the warp test
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_int8_values", 0)
    gen = torch.Generator().manual_seed(length + d)
    b = 3
    kc, vc = TurboQuantCodec(d, kbits, method, seed=1), TurboQuantCodec(d, vbits, "mse", seed=1)
    k = torch.randn(b, hkv, length, d, generator=gen) * 2 + 0.5
    v = torch.randn(b, hkv, length, d, generator=gen)
    kp = {n: t.to(DEVICE) for n, t in kc.encode(k).items()}
    vp = {n: t.to(DEVICE) for n, t in vc.encode(v).items()}
    q = (torch.randn(b, hkv * group, d, generator=gen) * 2).to(DEVICE, torch.bfloat16)
    fk = torch.randn(b, hkv, nfp, d, generator=gen).to(DEVICE, torch.bfloat16)
    fv = torch.randn(b, hkv, nfp, d, generator=gen).to(DEVICE, torch.bfloat16)
    valid = fp_valid = None
    if masked:  # left padding: row i starts at 0, 31, 62, ...; the new token is always valid
        full = torch.arange(length + nfp)[None, :] >= (torch.arange(b) * 31)[:, None]
        full[:, -1] = True
        valid, fp_valid = full[:, :length].to(DEVICE), full[:, length:].to(DEVICE)
    scale = d**-0.5
    ref = kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fv, scale, valid, fp_valid)
    for splits in (None, 1, 7):
        out = torch.full((1,), float("nan"))
        out = kernels.decode_attention(q, kc, vc, kp, vp, fk, fv, scale, valid, fp_valid, out_dtype=torch.float32, num_splits=splits)
        assert out.shape == (b, hkv * group, d)
        assert torch.isfinite(out).all()
        assert _rel(out, ref) < REL_TOL, (splits, _rel(out, ref))
        assert _cos(out, ref) > COS_FLOOR


@pytest.mark.parametrize("kbits,vbits,unbias_keys", [(4, 4, False), (4, 4, True), (2, 2, True), (2.5, 2.5, True)])
def test_decode_attention_reads_unbiased_codecs(kbits, vbits, unbias_keys, monkeypatch):
    """Unbiased decoding (centroids / (1 − D), `TurboQuantConfig.unbias_values` / `unbias_keys`) lives in the
    quantizers' centroid tables, so the kernels (the warp kernel for k4v4, the split kernel for the rest) read the
    same vectors as the reference (exact tables here: the int8 ones round them by ~1e-2, the warp test's tolerance)."""
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_int8_keys", 0)
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_int8_values", 0)
    gen = torch.Generator().manual_seed(int(kbits * 10))
    make = lambda bits, unbiased: (TurboQuantCodec(128, bits, "mse", seed=2, unbiased=unbiased) if bits == int(bits)  # noqa: E731
                                   else SplitCodec(128, bits, 2, unbiased=unbiased))
    kc, vc = make(kbits, unbias_keys), make(vbits, True)
    k = torch.randn(2, 2, 700, 128, generator=gen) + 0.3
    v = torch.randn(2, 2, 700, 128, generator=gen) + 0.5
    kp = {n: t.to(DEVICE) for n, t in kc.encode(k).items()}
    vp = {n: t.to(DEVICE) for n, t in vc.encode(v).items()}
    q = (torch.randn(2, 8, 128, generator=gen) / 2).to(DEVICE, torch.bfloat16)
    fk = torch.randn(2, 2, 1, 128, generator=gen).to(DEVICE, torch.bfloat16)
    ref = kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, 128**-0.5)
    out = kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, 128**-0.5, out_dtype=torch.float32)
    assert _rel(out, ref) < REL_TOL and _cos(out, ref) > COS_FLOOR
    kplain, vplain = make(kbits, False), make(vbits, False)
    assert all(torch.equal(t.to(DEVICE), kp[n]) for n, t in kplain.encode(k).items())  # same codes (and split channels)
    assert all(torch.equal(t.to(DEVICE), vp[n]) for n, t in vplain.encode(v).items())
    plain = kernels.decode_attention_reference(q, kplain, vplain, kp, vp, fk, fk, 128**-0.5)
    assert _rel(plain, ref) > 10 * _rel(out, ref)  # the gain is there to be read: the plain decode differs


TRELLIS_CASES = [  # d, key codec, value codec: bits, or (channels, high bits, low bits) of a split; trellis codes in every group
    (64, 4, 4), (128, 2, 3), (64, 1, 6), (128, 5, 4), (64, (28, 6, 2), 3), (128, (64, 4, 3), (32, 2, 1)),
]
if FAST:
    TRELLIS_CASES = TRELLIS_CASES[:1] + TRELLIS_CASES[4:5]


@pytest.mark.parametrize("d,kbits,vbits", TRELLIS_CASES)
def test_decode_attention_reads_trellis_codes(d, kbits, vbits):
    """Trellis codes (`tqpatch.trellis`): the split kernel reads each coordinate by its window of the code stream in
    the group's 2^(S+b)-entry table, as the reference decodes them; the store kernel declines them (Viterbi)."""
    gen = torch.Generator().manual_seed(d + (kbits if isinstance(kbits, int) else kbits[1]))
    b, hkv, group, length = 2, 2, 4, 301
    k = torch.randn(b, hkv, length, d, generator=gen) * (1 + 3 * torch.rand(d, generator=gen)) + 0.5
    v = torch.randn(b, hkv, length, d, generator=gen)

    def make(bits, x, seed):
        if isinstance(bits, int):
            return TurboQuantCodec(d, bits, "mse", seed=seed, norm_bits=8, trellis=True)
        codec = SplitCodec(d, 0.0, seed=seed, norm_bits=8, groups=bits, trellis=True)
        codec.encode(x[:, :, :8])  # calibrates the channel groups and the norm ranges
        return codec

    kc, vc = make(kbits, k, 1), make(vbits, v, 2)
    assert kernels._store_groups(kc, k.to(DEVICE)) is None  # encoded by the Viterbi search, not the store kernel
    q, fk, valid, kp, vp, ref = _kernel_matches_reference_with_splits(kc, vc, k, v, gen, group)
    for codec in (kc, vc):  # the same codes read as Lloyd-Max codes decode to something else: the windows matter
        for g in code_groups(codec):
            g.mse.trellis = None
    assert _rel(kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid), ref) > 10 * REL_TOL


@pytest.mark.parametrize("lut", [0, 1, 2])
@pytest.mark.parametrize("kbits,vbits", [(4, 2), (2, 4), (4, 4)])
def test_decode_lookup_variants(lut, kbits, vbits, monkeypatch):
    # every centroid lookup of the Triton split kernel (gather, select chains), on both plane widths (k4v4 would
    # otherwise take the Gluon warp kernel, whose int8 defaults the warp test checks at their own tolerance)
    monkeypatch.setitem(kernels.DECODE_TUNING, "lut", lut)
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_kernel", False)
    gen = torch.Generator().manual_seed(lut)
    kc, vc = TurboQuantCodec(128, kbits, "mse", seed=2), TurboQuantCodec(128, vbits, "mse", seed=2)
    kp = {n: t.to(DEVICE) for n, t in kc.encode(torch.randn(2, 2, 150, 128, generator=gen)).items()}
    vp = {n: t.to(DEVICE) for n, t in vc.encode(torch.randn(2, 2, 150, 128, generator=gen)).items()}
    q = torch.randn(2, 8, 128, generator=gen).to(DEVICE, torch.bfloat16)
    out = kernels.decode_attention(q, kc, vc, kp, vp, None, None, 128**-0.5, out_dtype=torch.float32, num_splits=2)
    ref = kernels.decode_attention_reference(q, kc, vc, kp, vp, None, None, 128**-0.5)
    assert _rel(out, ref) < REL_TOL and _cos(out, ref) > COS_FLOOR


SPLIT_CASES = [
    # d, key groups (outliers, high, low), value groups, norm bits: equal halves (the paper's 3.5 / 2.5 bits), an
    # eigen split's uneven groups (24 + 40 at d 64: widths padded in the kernel), a dropped group, 3-bit groups
    # (natural order), d 256 (value sums rotated back by the launcher)
    (128, (64, 4, 3), (64, 3, 2), 8),
    (64, (32, 3, 2), (32, 4, 3), 16),
    (64, (24, 4, 2), (32, 3, 2), 8),
    (64, (32, 3, 0), (40, 4, 2), 8),
    (64, (26, 3, 1), (21, 4, 3), 16),  # widths off whole bytes: 26 x 3 and 38 x 1 bits, 21 x 4 bits
    (256, (64, 4, 2), (128, 4, 3), 16),
    (64, (28, 6, 2), (32, 5, 3), 8),  # a 6-bit key group (e6.2's widths) and a 5-bit value group
]
if FAST:
    SPLIT_CASES = [c for c in SPLIT_CASES if c[0] <= 128]


def _calibrated_split(d: int, groups: tuple[int, int, int], norm_bits: int, x: torch.Tensor, seed: int) -> SplitCodec:
    codec = SplitCodec(d, 0.0, seed=seed, norm_bits=norm_bits, groups=groups)
    codec.encode(x[:, :, :8])  # calibrates the channel groups (mean |x| of this chunk) and the norm ranges
    return codec


def _kernel_matches_reference_with_splits(kc, vc, k: torch.Tensor, v: torch.Tensor, gen: torch.Generator, group: int):
    """Encode k, v [B, Hkv, T, d] with the codecs, decode `group` bf16 queries per KV head (3 full-precision tokens;
    row 1's first 37 compressed tokens masked) with the kernel, whole and in 3 splits of the sequence, and check both
    against the reference. Returns (q, fk, valid, key parts, value parts, reference output)."""
    b, hkv, length, d = k.shape
    assert kernels.supports(kc) and kernels.supports(vc)
    kp = {n: t.to(DEVICE) for n, t in kc.encode(k).items()}
    vp = {n: t.to(DEVICE) for n, t in vc.encode(v).items()}
    q = (torch.randn(b, hkv * group, d, generator=gen) / 2).to(DEVICE, torch.bfloat16)
    fk = torch.randn(b, hkv, 3, d, generator=gen).to(DEVICE, torch.bfloat16)
    valid = (torch.arange(length)[None, :] >= torch.tensor([0, 37])[:, None]).to(DEVICE)
    ref = kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid)
    for splits in (None, 3):
        out = kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid, out_dtype=torch.float32, num_splits=splits)
        assert _rel(out, ref) < REL_TOL and _cos(out, ref) > COS_FLOOR, (splits, _rel(out, ref))
    return q, fk, valid, kp, vp, ref


@pytest.mark.parametrize("d,kgroups,vgroups,norm_bits", SPLIT_CASES)
def test_decode_attention_reads_split_codes(d, kgroups, vgroups, norm_bits):
    """Split codecs (two channel groups with their own bits, rotation and norm; or one, the other dropped)."""
    gen = torch.Generator().manual_seed(d + kgroups[0])
    b, hkv, group, length = 2, 2, 4, 301
    k = torch.randn(b, hkv, length, d, generator=gen) * (1 + 3 * torch.rand(d, generator=gen)) + 0.5  # uneven channels
    v = torch.randn(b, hkv, length, d, generator=gen)
    kc, vc = _calibrated_split(d, kgroups, norm_bits, k, 1), _calibrated_split(d, vgroups, norm_bits, v, 2)
    q, fk, valid, _, vp, ref = _kernel_matches_reference_with_splits(kc, vc, k, v, gen, group)
    whole = TurboQuantCodec(d, kgroups[1], "mse", seed=1)  # the same keys under one group score differently
    assert _rel(kernels.decode_attention_reference(q, whole, vc, {n: t.to(DEVICE) for n, t in whole.encode(k).items()}, vp, fk, fk, d**-0.5, valid), ref) > 1e-3


@pytest.mark.parametrize("d,groups,norm_bits", [(128, (64, 4, 3), 8), (64, (32, 2, 1), 16), (64, (24, 4, 2), 8), (64, (32, 3, 0), 16)])
def test_store_kernel_writes_split_codes_like_the_codec(d, groups, norm_bits):
    """Each group whose width is a kernel size is written by the store kernel (24 + 40: the PyTorch encode)."""
    gen = torch.Generator().manual_seed(d + groups[0])
    x = (torch.randn(2, 3, 45, d, generator=gen) * (1 + 3 * torch.rand(d, generator=gen))).to(DEVICE)
    codec = _calibrated_split(d, groups, norm_bits, x.cpu(), 0)
    got, ref = kernels.encode(codec, x), codec.encode(x)
    assert set(got) == set(ref)
    for name in ref:
        assert got[name].shape == ref[name].shape and got[name].dtype == ref[name].dtype, name
        if name.endswith("codes"):
            assert (got[name] != ref[name]).float().mean().item() <= 2e-3, name
    deq, deq_ref = codec.decode(got, torch.float32), codec.decode(ref, torch.float32)
    assert 10 * torch.log10(deq_ref.pow(2).sum() / (deq - deq_ref).pow(2).sum().clamp_min(1e-30)).item() > 35
    storage = {n: torch.zeros(2, 3, 50, *t.shape[3:], dtype=t.dtype, device=DEVICE) for n, t in ref.items()}
    kernels.encode_into(codec, x, {n: t[:, :, 5:] for n, t in storage.items()})
    assert all((storage[n][:, :, 5:] != ref[n]).float().mean().item() <= 2e-3 for n in ref if n.endswith("codes"))


def _random_decode_inputs(seed: int, b: int, hkv: int, group: int, length: int, d: int, fp_tokens: int):
    """(generator, key codec, value codec, key parts, value parts, q [B, Hq, d] bf16, fp keys [B, Hkv, F, d] bf16)."""
    gen = torch.Generator().manual_seed(seed)
    kc = vc = TurboQuantCodec(d, 4, "mse", seed=seed)
    kp = {n: t.to(DEVICE) for n, t in kc.encode(torch.randn(b, hkv, length, d, generator=gen)).items()}
    vp = {n: t.to(DEVICE) for n, t in vc.encode(torch.randn(b, hkv, length, d, generator=gen)).items()}
    q = torch.randn(b, hkv * group, d, generator=gen).to(DEVICE, torch.bfloat16)
    fk = torch.randn(b, hkv, fp_tokens, d, generator=gen).to(DEVICE, torch.bfloat16)
    return gen, kc, vc, kp, vp, q, fk


def _warp_launches(monkeypatch) -> list:
    """Records every warp-kernel launch from now on: the list gets, per launch, whether the LUT kernel ran."""
    calls, launch = [], kernels._launch_decode_warp

    def spy(*args, **kwargs):
        calls.append(launch(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(kernels, "_launch_decode_warp", spy)
    return calls


def _bias_path(monkeypatch, warp_bias: bool) -> list:
    """Scores with a bias go to the LUT warp kernel (warp_bias, where Gluon runs) or the split kernel; exact keys and
    values (REL_TOL). Returns the list the warp launches are recorded in (`_warp_launches`)."""
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_bias", warp_bias)
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_int8_keys", 0)
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_int8_values", 0)
    return _warp_launches(monkeypatch)


def _expected_warp_calls(warp_bias: bool, launches: int) -> list:
    return [True] * launches if warp_bias and kernels.gluon_available() else []


WARP_CASES = [
    # d, Hkv, group, L, norm bits, masked
    (128, 8, 4, 4099, 16, False),
    (128, 2, 1, 777, 8, True),
    (64, 3, 8, 1000, 16, True),
    (128, 1, 16, 33, 8, False),
    (64, 4, 4, 15, 16, False),
    (128, 2, 5, 2048, 16, True),
]


@pytest.mark.skipif(not kernels.gluon_available(), reason="needs Triton's Gluon (CUDA, not the interpreter)")
@pytest.mark.parametrize("variant", ["nibbles", "pairs", "lut", "lut-general", "lut16", "lut-fp16keys", "lut-int8q-lo", "lut-lazy", "lut-int8v",
                                     "lut-int8v-lazy"])
@pytest.mark.parametrize("d,hkv,group,length,norm_bits,masked", WARP_CASES)
def test_warp_decode_kernel_matches_the_reference_and_the_split_kernel(d, hkv, group, length, norm_bits, masked, variant, monkeypatch):
    """k4v4 codes take a Gluon warp kernel (one warp per program, codes read in the mma operands' channel order):
    ragged tails, masks, GQA 1..16, 8-bit norms, d 64/128; key centroids gathered per nibble or per byte (pairs), or
    (lut, G <= 8) every centroid from the register table of `_tq_decode_lut_kernel` (the Lloyd-Max codebooks are
    symmetric: its short PTX; lut-general: the PTX for any codebook; lut16: 16 tokens per step instead of the default
    32; keys scored by int8 mmas with the query as int8, the default, within the looser INT8_REL_TOL, as in
    lut-int8q-lo: the query as int8 plus its remainder; lut-fp16keys: the exact fp16 key path at REL_TOL; lut-lazy:
    exact keys, running sums rescaled only when a column's max grows by more than 3; lut-int8v: int8 keys and values
    read from their 7-bit tables as fp16 1024 + u, and with lazy rescaling);
    the Triton split kernel on the same inputs agrees."""
    from tqpatch.kernels import groups

    if variant == "lut16":
        monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_tokens", 16)
        monkeypatch.setitem(kernels.DECODE_TUNING, "warp_maxnreg", 144)
    if variant == "lut-general":
        monkeypatch.setattr(groups, "is_symmetric", lambda centroids: False)
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_int8_keys", {"lut-fp16keys": 0, "lut-lazy": 0, "lut-int8q-lo": 2}.get(variant, 1))
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_rescale_tau", 3 if variant.endswith("lazy") else 0)
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_int8_values", int(variant.startswith("lut-int8v")))
    int8 = variant.startswith("lut") and variant not in ("lut-fp16keys", "lut-lazy") and group <= 8
    rel_tol, cos_floor = (INT8_REL_TOL, INT8_COS_FLOOR) if int8 else (REL_TOL, COS_FLOOR)
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_key_pairs", variant == "pairs")
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut", variant.startswith("lut"))
    calls = _warp_launches(monkeypatch)
    gen = torch.Generator().manual_seed(d + hkv + length)
    kc = TurboQuantCodec(d, 4, "mse", seed=5, norm_bits=norm_bits)
    vc = TurboQuantCodec(d, 4, "mse", seed=6, norm_bits=norm_bits)
    scale = torch.exp2(torch.rand(2, hkv, length, 1, generator=gen) * 3)
    kp = {n: t.to(DEVICE) for n, t in kc.encode(torch.randn(2, hkv, length, d, generator=gen) * scale).items()}
    vp = {n: t.to(DEVICE) for n, t in vc.encode(torch.randn(2, hkv, length, d, generator=gen) * scale.flip(2)).items()}
    q = (torch.randn(2, hkv * group, d, generator=gen) / 3).to(DEVICE, torch.bfloat16)
    fk = torch.randn(2, hkv, 2, d, generator=gen).to(DEVICE, torch.bfloat16)
    valid = (torch.arange(length)[None, :] >= torch.tensor([0, length // 3])[:, None]).to(DEVICE) if masked else None
    ref = kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid)
    outs = []
    for splits in (None, 1, 5):
        out = kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid, out_dtype=torch.float32, num_splits=splits)
        assert _rel(out, ref) < rel_tol and _cos(out, ref) > cos_floor, (splits, _rel(out, ref))
        outs.append(out)
    assert calls == [variant.startswith("lut") and group <= 8] * 3
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_kernel", False)
    split = kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid, out_dtype=torch.float32)
    assert len(calls) == 3 and _rel(outs[0], split) < rel_tol


@pytest.mark.skipif(not kernels.gluon_available(), reason="needs Triton's Gluon (CUDA, not the interpreter)")
@pytest.mark.parametrize("int8_values", [0, 1])
def test_lazy_rescaling_keeps_value_norms_near_the_fp16_limit_finite(int8_values, monkeypatch):
    """With lazy rescaling (tau 3) probabilities reach 2^3 against a stale max; the LUT kernel's value product takes
    p |v| 2^-tau, so value norms near fp16's limit (3e4: p |v| would reach 2.4e5 > 65504) still give the reference's
    output. Keys grow along the sequence, so the max keeps rising by less than tau and p > 1 happens."""
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_rescale_tau", 3)
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_int8_values", int8_values)
    gen = torch.Generator().manual_seed(11)
    d, hkv, group, length = 128, 2, 4, 3000
    kc, vc = TurboQuantCodec(d, 4, "mse", seed=5), TurboQuantCodec(d, 4, "mse", seed=6)
    k = torch.randn(1, hkv, length, d, generator=gen) * torch.linspace(0.5, 4.0, length)[None, None, :, None]
    v = torch.randn(1, hkv, length, d, generator=gen)
    v = v / v.norm(dim=-1, keepdim=True) * 3.0e4
    kp = {n: t.to(DEVICE) for n, t in kc.encode(k).items()}
    vp = {n: t.to(DEVICE) for n, t in vc.encode(v).items()}
    assert vp["norms"].float().max() > 2.9e4
    q = torch.randn(1, hkv * group, d, generator=gen).to(DEVICE, torch.bfloat16)
    ref = kernels.decode_attention_reference(q, kc, vc, kp, vp, None, None, d**-0.5)
    out = kernels.decode_attention(q, kc, vc, kp, vp, None, None, d**-0.5, out_dtype=torch.float32)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < INT8_REL_TOL and _cos(out, ref) > INT8_COS_FLOOR, _rel(out, ref)


@pytest.mark.parametrize("rows,d,n,dtype", [(1, 64, 64, torch.float32), (33, 128, 128, torch.bfloat16), (256, 80, 200, torch.float16)])
def test_rotate_rows_matches_a_float32_matmul(rows, d, n, dtype):
    """The decode queries' rotation kernel: x (any float dtype, strided rows) @ W in float32, any d and width."""
    gen = torch.Generator().manual_seed(rows + d)
    x = torch.randn(rows, d + 3, generator=gen).to(DEVICE, dtype)[:, :d]  # rows d + 3 apart
    w = torch.randn(d, n, generator=gen).to(DEVICE)
    out = kernels.rotate_rows(x, w)
    ref = x.double() @ w.double()
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    assert (out.double() - ref).abs().max() < 1e-5 * ref.abs().max()


@pytest.mark.parametrize("block_s,premerge", [(8, 0), (64, 0), (64, 16), (8, 4)])
def test_combine_kernel_merges_more_splits_than_it_reads_per_round(block_s, premerge, monkeypatch):
    """151 splits (a 1-token tail among them) merged `block_s` at a time, with exact tokens in the same softmax:
    the combine kernel's multi-round online merge matches the reference; so it does after `_tq_decode_merge_kernel`
    merged groups of `premerge` splits first (10 groups, the last of 7; 38 groups of 4, still more than 8 per round)."""
    monkeypatch.setitem(kernels.DECODE_TUNING, "combine_block_s", block_s)
    monkeypatch.setitem(kernels.DECODE_TUNING, "premerge_splits", premerge)
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_int8_keys", 0)  # exact keys and values: the merge is what is tested
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_int8_values", 0)
    gen, kc, vc, kp, vp, q, fk = _random_decode_inputs(12, b=1, hkv=2, group=4, length=150 * 32 + 1, d=64, fp_tokens=3)
    ref = kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, 64**-0.5)
    out = kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, 64**-0.5, out_dtype=torch.float32, block_t=32, num_splits=151)
    assert _rel(out, ref) < REL_TOL and _cos(out, ref) > COS_FLOOR, _rel(out, ref)


@pytest.mark.parametrize("warp_bias", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_adds_the_key_bias_like_the_reference(masked, warp_bias, monkeypatch):
    """Centered keys: the kernel adds ⟨q, R_p μ⟩ (a per-row, per-token bias) to the scores of the compressed tokens
    (the split kernel, or the LUT warp kernel where Gluon runs)."""
    calls = _bias_path(monkeypatch, warp_bias)
    gen, kc, vc, kp, vp, q, fk = _random_decode_inputs(11, b=2, hkv=2, group=4, length=301, d=128, fp_tokens=2)
    b, hq, d, length = q.shape[0], q.shape[1], q.shape[2], kp["norms"].shape[2]
    bias = (torch.randn(b, hq, length, generator=gen) * 8).to(DEVICE)
    valid = (torch.arange(length)[None, :] >= torch.tensor([0, 40])[:, None]).to(DEVICE) if masked else None
    ref = kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid, None, key_bias=bias)
    unbiased = kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid, None)
    assert _rel(unbiased, ref) > 0.1  # the bias matters at this size
    for splits in (None, 3):
        out = kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid, None, out_dtype=torch.float32, num_splits=splits, key_bias=bias)
        assert _rel(out, ref) < REL_TOL and _cos(out, ref) > COS_FLOOR
    assert calls == _expected_warp_calls(warp_bias, 2)
    with pytest.raises(ValueError, match="key_bias must be"):
        kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, d**-0.5, key_bias=bias[:, :, :-1])


@pytest.mark.parametrize("split,warp_bias", [(False, False), (False, True), (True, True)])
def test_decode_attention_adds_the_norm_bias_like_the_reference(split, warp_bias, monkeypatch):
    """Score variance: the kernel adds Σ_g norm_bias_g ‖k_g‖² (per query row and key group) to the compressed scores
    (two key groups: the split kernel; one 4-bit group: the split kernel or the LUT warp kernel)."""
    calls = _bias_path(monkeypatch, warp_bias)
    gen = torch.Generator().manual_seed(14)
    b, hkv, group, length, d = 2, 2, 4, 301, 64
    k = torch.randn(b, hkv, length, d, generator=gen) * (0.3 + 3 * torch.rand(b, hkv, length, 1, generator=gen))  # norms vary
    v = torch.randn(b, hkv, length, d, generator=gen)
    kc = _calibrated_split(d, (28, 6, 2), 8, k, 1) if split else TurboQuantCodec(d, 4, "mse", seed=1, norm_bits=8)
    vc = TurboQuantCodec(d, 4, "mse", seed=2)
    kp = {n: t.to(DEVICE) for n, t in kc.encode(k).items()}
    vp = {n: t.to(DEVICE) for n, t in vc.encode(v).items()}
    q = torch.randn(b, hkv * group, d, generator=gen).to(DEVICE, torch.bfloat16)
    fk = torch.randn(b, hkv, 3, d, generator=gen).to(DEVICE, torch.bfloat16)
    groups = 2 if split else 1
    bias = (torch.rand(b, hkv * group, groups, generator=gen) * 0.3).to(DEVICE)
    valid = (torch.arange(length)[None, :] >= torch.tensor([0, 40])[:, None]).to(DEVICE)
    ref = kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid, norm_bias=bias)
    assert _rel(kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid), ref) > 0.05  # the bias matters
    for splits in (None, 3):
        out = kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid, None, out_dtype=torch.float32, num_splits=splits, norm_bias=bias)
        assert _rel(out, ref) < REL_TOL and _cos(out, ref) > COS_FLOOR, (splits, _rel(out, ref))
    assert calls == _expected_warp_calls(warp_bias and not split, 2)
    with pytest.raises(ValueError, match="norm_bias must be"):
        kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, d**-0.5, norm_bias=bias[..., :1].expand(-1, -1, 3))


@pytest.mark.parametrize("warp_bias", [False, True])
@pytest.mark.parametrize("first,scale", [(0, 1.0), (1234, 1.3)])
def test_decode_attention_adds_the_rope_bias_inside_the_kernel(first, scale, warp_bias, monkeypatch):
    """Centered keys' ⟨q, R_p μ⟩ in factored form (RopeBias): the split kernel evaluates it per tile from the rows of
    the tile start and of the in-tile offsets, the warp path writes it out dense first (`rope_bias_dense`, the same
    angle addition); it must equal the dense [B, Hq, L] bias, here from position `first` on."""
    from tqpatch.rope import RopeBias, RopeTable

    calls = _bias_path(monkeypatch, warp_bias)
    gen, kc, vc, kp, vp, q, fk = _random_decode_inputs(13, b=2, hkv=2, group=4, length=301, d=128, fp_tokens=2)
    b, hq, d, length = q.shape[0], q.shape[1], q.shape[2], kp["norms"].shape[2]
    table = RopeTable(1e4 ** -(torch.arange(d // 2, dtype=torch.float64) / (d // 2)), scale)
    rows = max(first + length, kernels.ROPE_TABLE_MIN_ROWS)
    bias = RopeBias((torch.randn(b, hq, d, generator=gen) * 8).to(DEVICE), table.joined_range(0, rows, DEVICE), first, scale)
    valid = (torch.arange(length)[None, :] >= torch.tensor([0, 40])[:, None]).to(DEVICE)
    ref = kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid, None, key_bias=bias.dense(length))
    assert _rel(kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid), ref) > 0.1  # the bias matters
    for splits in (None, 3):
        out = kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid, None, out_dtype=torch.float32, num_splits=splits, rope_bias=bias)
        assert _rel(out, ref) < REL_TOL and _cos(out, ref) > COS_FLOOR, (splits, _rel(out, ref))
    assert calls == _expected_warp_calls(warp_bias, 2)
    with pytest.raises(ValueError, match="rope_bias must"):
        short = RopeBias(bias.coefficients, bias.table[: first + length - 1], first, scale)
        kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, d**-0.5, rope_bias=short)


@pytest.mark.parametrize("d,first,length", [(128, 0, 301), (64, 777, 64 * 8 * 2 + 5)])
def test_rope_bias_dense_kernel_matches_the_factored_bias(d, first, length):
    """`rope_bias_dense` (the warp path's dense RoPE bias, angle addition in a Triton kernel) equals `RopeBias.dense`
    (tf32 products on a GPU: within 3e-3 of the bias's scale; length spans several programs and a ragged tile)."""
    from tqpatch.rope import RopeBias, RopeTable

    gen = torch.Generator().manual_seed(d + first)
    table = RopeTable(1e4 ** -(torch.arange(d // 2, dtype=torch.float64) / (d // 2)), 1.3)
    rows = max(first + length, kernels.ROPE_TABLE_MIN_ROWS)
    bias = RopeBias((torch.randn(2, 5, d, generator=gen) * 8).to(DEVICE), table.joined_range(0, rows, DEVICE), first, 1.3)
    ref = bias.dense(length).reshape(10, length)
    out = kernels.rope_bias_dense(bias, length)
    assert out.shape == ref.shape and (out - ref).abs().max() < 3e-3 * ref.abs().max()
    with pytest.raises(ValueError, match="rope_bias.table must be"):
        kernels.rope_bias_dense(RopeBias(bias.coefficients, bias.table[: first + length - 1], first, 1.3), length)


@pytest.mark.skipif(not kernels.gluon_available(), reason="needs Triton's Gluon (CUDA, not the interpreter)")
@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("d,hkv,group,norm_bits", [(128, 2, 4, 8), (64, 3, 8, 16), (128, 1, 1, 8)])
def test_lut_warp_kernel_adds_the_rope_and_norm_biases_with_its_int8_defaults(d, hkv, group, norm_bits, ahead, monkeypatch):
    """What the `+` presets with `-sv` run: k4v4 codes, centered keys' RoPE bias and the score-variance norm bias
    together, through the LUT warp kernel with its default int8 products (INT8_REL_TOL), masked, ragged tail; the
    bias tile loaded at its step or a step ahead (`warp_bias_ahead`)."""
    from tqpatch.rope import RopeBias, RopeTable

    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_bias_ahead", ahead)
    calls = _warp_launches(monkeypatch)
    gen = torch.Generator().manual_seed(d + group)
    length = 1003
    kc = TurboQuantCodec(d, 4, "mse", seed=3, norm_bits=norm_bits)
    vc = TurboQuantCodec(d, 4, "mse", seed=4, norm_bits=norm_bits)
    scale = 0.3 + 3 * torch.rand(2, hkv, length, 1, generator=gen)
    kp = {n: t.to(DEVICE) for n, t in kc.encode(torch.randn(2, hkv, length, d, generator=gen) * scale).items()}
    vp = {n: t.to(DEVICE) for n, t in vc.encode(torch.randn(2, hkv, length, d, generator=gen)).items()}
    q = (torch.randn(2, hkv * group, d, generator=gen) / 3).to(DEVICE, torch.bfloat16)
    fk = torch.randn(2, hkv, 4, d, generator=gen).to(DEVICE, torch.bfloat16)
    table = RopeTable(1e4 ** -(torch.arange(d // 2, dtype=torch.float64) / (d // 2)), 1.0)
    rope = RopeBias((torch.randn(2, hkv * group, d, generator=gen) * 2).to(DEVICE), table.joined_range(0, 4096, DEVICE), 100, 1.0)
    nb = (torch.rand(2, hkv * group, 1, generator=gen) * 0.3).to(DEVICE)
    valid = (torch.arange(length)[None, :] >= torch.tensor([0, 300])[:, None]).to(DEVICE)
    ref = kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid, None, key_bias=rope.dense(length), norm_bias=nb)
    assert _rel(kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid), ref) > 0.1  # the biases matter
    out = kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, d**-0.5, valid, None, out_dtype=torch.float32, rope_bias=rope, norm_bias=nb)
    assert _rel(out, ref) < INT8_REL_TOL and _cos(out, ref) > INT8_COS_FLOOR, _rel(out, ref)
    assert calls == [True]


def test_decode_attention_scores_codes_with_the_code_query_and_fp_tokens_with_q(monkeypatch):
    """Query-shaped keys: compressed tokens are scored with A⁻¹q (`code_query`), full-precision ones with q (exact
    keys and values at REL_TOL; the int8 defaults: the warp test)."""
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_int8_keys", 0)
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_int8_values", 0)
    gen, kc, vc, kp, vp, q, fk = _random_decode_inputs(12, b=2, hkv=2, group=4, length=257, d=64, fp_tokens=3)
    d = q.shape[-1]
    code_q = (torch.randn(q.shape, generator=gen) * 2).to(DEVICE, torch.bfloat16)
    ref = kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, d**-0.5, code_query=code_q)
    assert _rel(kernels.decode_attention_reference(q, kc, vc, kp, vp, fk, fk, d**-0.5), ref) > 0.1
    for splits in (None, 2):
        out = kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, d**-0.5, out_dtype=torch.float32, num_splits=splits, code_query=code_q)
        assert _rel(out, ref) < REL_TOL and _cos(out, ref) > COS_FLOOR
    with pytest.raises(ValueError, match="code_query must"):
        kernels.decode_attention(q, kc, vc, kp, vp, fk, fk, d**-0.5, code_query=code_q[:, :1])


def test_decode_attention_bf16_output(monkeypatch):
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_int8_keys", 0)  # exact keys and values at REL_TOL
    monkeypatch.setitem(kernels.DECODE_TUNING, "warp_lut_int8_values", 0)
    kc = vc = TurboQuantCodec(128, 4, "mse", seed=0)
    k, v = torch.randn(2, 2, 200, 128), torch.randn(2, 2, 200, 128)
    kp = {n: t.to(DEVICE) for n, t in kc.encode(k).items()}
    vp = {n: t.to(DEVICE) for n, t in vc.encode(v).items()}
    q = torch.randn(2, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    out = kernels.decode_attention(q, kc, vc, kp, vp, None, None, 128**-0.5)
    ref = kernels.decode_attention_reference(q, kc, vc, kp, vp, None, None, 128**-0.5)
    assert out.dtype == torch.bfloat16 and _rel(out, ref) < REL_TOL


def _tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=heads * head_dim, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to(DEVICE).eval()


def _tiny_gemma3(head_dim=256):
    """Gemma-3's attention shape (1 KV head, head_dim 256, QK-norm), 4 layers of which the third is full attention and
    the others slide over 16 tokens."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
        head_dim=head_dim, sliding_window=16, query_pre_attn_scalar=head_dim, max_position_embeddings=512, attn_implementation="sdpa",
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )
    return Gemma3ForCausalLM(config).to(DEVICE).eval()


@contextlib.contextmanager
def _fused_calls():
    """Spy on the fused decode path: yields (calls, shaped, sliding_sinks), one entry per decode call and layer:
    whether the fused kernels took it, whether that layer's keys were query-shaped, and how many exact sink tokens it
    read if it is a sliding-window layer (None for full-attention layers)."""
    from tqpatch import attention

    calls, shaped, sliding_sinks = [], [], []
    original = attention._fused_attention

    def spy(*args, **kw):
        out = original(*args, **kw)
        snap = args[2]
        calls.append(out is not None)
        shaped.append(getattr(snap.layer.key_codec, "shaping", None) is not None)
        sliding_sinks.append(snap.num_sink if snap.layer.is_sliding else None)
        return out

    attention._fused_attention = spy
    try:
        yield calls, shaped, sliding_sinks
    finally:
        attention._fused_attention = original


@pytest.mark.parametrize("preset", ["k4v4", "k2v2", "k4v4+", "k2v2+", "k3v2+", "k4v4-ck", "k2v2-s4-ck-qs", "k4v4-s4-ck-qs-n8-fit40",
                                    "3.5bit+", "2.5bit", "2.5bit+", "k2.75v2.5-s3-ck-qs-n8-e4.2", "k1.8v2-s3-ck-qs-n8-e3.1-fit40", "k8v8",
                                    "k4v3-s4-ck-uv-qs-n8-e6.2-fit40", "k4v4-s4-ck-sv-tkv-qsd-n8", "k2v2-s4-ck-uv-sv-qsd-dp-n8",
                                    "k4v3-s4-ck-uv-sv-tkv-qs-n8-e6.2-fit40", "k4v4-s4-ck-sv-qsd-n8-B0k5v3",
                                    "k4v4-s4-ss-ck-sv-tkv-qsd-n8-B0k6v5-B1k3v3"])  # 4bit+ as SmolLM2's profile sets it: trellis codes of 3-6 bits
@pytest.mark.parametrize("padded", [False, True])
def test_patched_generation_uses_fused_path_and_matches_reference(preset, padded):
    import tqpatch
    from tqpatch import attention

    model = _tiny_llama()
    config = tqpatch.TurboQuantConfig.from_spec(preset).with_(residual_length=4, sink_tokens=2)
    tqpatch.patch(model, config)
    try:
        gen = torch.Generator().manual_seed(5)
        ids = torch.randint(0, 256, (2, 40), generator=gen).to(DEVICE)
        mask = torch.ones_like(ids)
        if padded:
            mask[1, :9] = 0
        kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
        with _fused_calls() as (calls, shaped, _):
            fused = model.generate(ids, **kwargs)
        with attention.fused_decode(False):
            ref = model.generate(ids, **kwargs)
    finally:
        tqpatch.unpatch(model)
    assert calls and all(calls), "decode steps did not take the fused kernel path"
    assert all(shaped) == config.shape_keys  # query-shaped keys (k4v4+): the kernel scored the codes with A⁻¹q
    assert model.config._attn_implementation == "sdpa"
    logits_f, logits_r = torch.stack(fused.logits).float(), torch.stack(ref.logits).float()
    assert _rel(logits_f, logits_r) < 2e-2
    # greedy tokens agree (near-ties aside, which random tiny models rarely produce)
    agree = (fused.sequences == ref.sequences).float().mean().item()
    assert agree >= 0.97, agree


def _teacher_forced_logits(model, ids, mask, tokens, cache=None):
    """Last-position logits [steps, B, V] of `model` fed the prompt `ids` [B, T] (left-padded by `mask`) and then
    `tokens` [B, steps] one per call, with generate's positions (the mask's running count): the same inputs for
    both decode paths, so a near-tie flipped early cannot make the rest of the sequence differ."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config) if cache is None else cache
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    step = lambda x, m, p: model(x, attention_mask=m, position_ids=p, past_key_values=cache, use_cache=True).logits[:, -1]  # noqa: E731
    logits = [step(ids, mask, positions)]
    for t in range(tokens.shape[1] - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        logits.append(step(tokens[:, t : t + 1], mask, positions))
    return torch.stack(logits).float()


@pytest.mark.parametrize("spec", ["k4v4-s4-ck-qsd-n8", "k4v4-s4-ck-qsd-dp-n8", "k2v2-s4-ck-uv-qsd-dp-n8", "k3.5v3.5-s4-ck-qs-dp-n8",
                                  "k2v2-s4-ck-uv-sv-qsd-dp-n8", "k2v2+", "k4v4-s4-ss-ck-sv-qsd-n8",
                                  "k4v3-s4-ss-ck-uv-sv-tkv-qsd-dp-n8-B0k5v2-B2k5v3-B3k3v4"])
@pytest.mark.parametrize("padded", [False, True])
def test_patched_gemma3_sliding_layers_decode_fused_with_shaped_keys(spec, padded):
    """Gemma-3 shapes (head_dim 256, 1 KV head, sliding layers over 16 tokens), 40-token prompts and 24 decode steps,
    teacher-forced: with -qsd every layer's keys are shaped (a diagonal A on the sliding layers), every decode step
    takes the fused kernels, and their logits match the PyTorch path's. The last spec is 3.5bit+ with bits per layer
    (README "Bits per layer from a KL scan"): trellis codes of 2-5 bits in sliding and full layers."""
    _check_gemma3_fused_decode(spec, padded, prompt=40)


@pytest.mark.parametrize("spec", ["k4v4+", "k2v2+"])
@pytest.mark.parametrize("padded", [False, True])
def test_gemma3_sliding_layers_decode_fused_while_they_hold_exact_sinks(spec, padded):
    """`-ss` (both presets): a 12-token prompt is shorter than the 16-token window, so the sliding layers hold their
    4 sink tokens exact through the first decode steps (exact sinks + codes in one fused step), then trim them first
    when the window moves on; the fused logits match the PyTorch path's throughout."""
    from tqpatch import TurboQuantConfig

    assert TurboQuantConfig.from_spec(spec).sliding_sinks
    sliding_sinks = _check_gemma3_fused_decode(spec, padded, prompt=12, pad=3)
    held = [n for n in sliding_sinks if n is not None]
    assert 4 in held and 0 in held, held  # fused steps with the sinks exact in a sliding layer, and after their trim


def _check_gemma3_fused_decode(spec, padded, prompt, pad=9):
    """The tiny Gemma-3 patched with `spec`, a `prompt`-token prompt (2 rows; row 1 left-padded by `pad` tokens
    if `padded`) and 24 teacher-forced decode steps: every step takes the fused kernels, and the logits match the
    PyTorch path's. Returns the exact sinks each fused call read in a sliding layer (None for full layers)."""
    import tqpatch
    from tqpatch import attention

    model = _tiny_gemma3()
    config = tqpatch.TurboQuantConfig.from_spec(spec)
    gen = torch.Generator().manual_seed(5)
    ids, tokens = torch.randint(0, 256, (2, prompt), generator=gen).to(DEVICE), torch.randint(0, 256, (2, 24), generator=gen).to(DEVICE)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :pad] = 0
    tqpatch.patch(model, config)
    try:
        with torch.no_grad():
            with _fused_calls() as (calls, shaped, sliding_sinks):
                fused = _teacher_forced_logits(model, ids, mask, tokens)
            with attention.fused_decode(False):
                ref = _teacher_forced_logits(model, ids, mask, tokens)
    finally:
        tqpatch.unpatch(model)
    assert len(calls) == 4 * 23 and all(calls), "decode steps did not take the fused kernel path"
    assert all(shaped) if config.shape_sliding_keys else (any(shaped) and not all(shaped))
    # With the score variance the 2-bit keys' paths differ by 2.3% on an H100 (1.4% without it): the bias moves these
    # logits by 6%, and the fused logits sit 2.3% from the reference with it, 5.9% from the one without (runs 97-98).
    # Trellis codes (k2v2+ since the fourteenth session) read 3.3% padded (run 108): the two paths' K/V differ a little
    # after the first step, and a Viterbi search turns a small input change into many changed codes (a 1e-3 relative
    # change moves 1.4% of 2-bit trellis coordinates, 3x the reconstruction change of Lloyd-Max codes, which move 0.07%;
    # d 256, CPU). The kernel reads identical trellis codes at REL_TOL (test_decode_attention_reads_trellis_codes).
    tolerance = 4e-2 if config.trellis_keys else 3e-2 if config.score_variance else 2e-2
    assert _rel(fused, ref) < tolerance
    cos_floor = 1 - tolerance**2 / 2 if config.trellis_keys else COS_FLOOR  # cos ≈ 1 − rel²/2: 0.9994 at run 108's 3.3%
    assert torch.nn.functional.cosine_similarity(fused.flatten(), ref.flatten(), dim=0) > cos_floor
    return sliding_sinks


@pytest.mark.parametrize("spec", ["k4v3-ev4.2", "k4v4-cv"])
def test_codecs_without_kernels_run_on_the_device_through_the_reference_path(spec):
    """Codecs the kernels cannot read (an eigen split of the values; centered values): patched CUDA decoding uses the
    PyTorch path and matches the same model on the CPU (teacher-forced: both read the same 8 tokens, so a near-tie
    cannot send the two greedy sequences apart). The prompt is 96 tokens so that the value eigenbasis is fitted on
    2 × 95 vectors > d = 64: with 30 tokens its covariance was rank-deficient, the null-space eigenvectors were set by
    float-level noise, and CUDA and CPU quantized those directions in different bases (6.4% apart on an H100, 6.5% for
    float32 vs float64 on the CPU; 3e-7 with 96 tokens)."""
    import tqpatch
    from transformers import DynamicCache

    from tqpatch.attention import kernel_codec

    gen = torch.Generator().manual_seed(7)
    ids, tokens = torch.randint(0, 256, (2, 96), generator=gen), torch.randint(0, 256, (2, 8), generator=gen)
    outputs = []
    for device in (DEVICE, "cpu"):
        model = _tiny_llama().to(device)
        tqpatch.patch(model, tqpatch.TurboQuantConfig.from_spec(spec))
        cache = DynamicCache(config=model.config)
        try:
            with torch.no_grad():
                outputs.append(_teacher_forced_logits(model, ids.to(device), torch.ones_like(ids).to(device), tokens.to(device), cache).cpu())
        finally:
            tqpatch.unpatch(model)
        for layer in cache.layers:
            assert not (kernels.supports(kernel_codec(layer.key_codec)) and kernels.supports(kernel_codec(layer.value_codec)))
    assert _rel(outputs[0], outputs[1]) < 2e-2


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6])
def test_viterbi_kernel_finds_the_reference_codes(bits):
    """The Triton trellis encoder against the PyTorch one (`trellis.viterbi_encode_reference`) on random vectors: the
    same squared error (both are exact searches), the same codes but for float near-ties; on CUDA `viterbi_encode`
    takes the kernel. Rows not a multiple of the program's vectors, and b = 6 > S = 4 (the code spans the leaving bits)."""
    from tqpatch.kernels.viterbi import viterbi_encode_triton
    from tqpatch.trellis import decode, get_trellis, viterbi_encode, viterbi_encode_reference

    book = get_trellis(bits)
    gen = torch.Generator().manual_seed(bits)
    n, t = (5, 24) if FAST else (301, 128)
    y = torch.randn(n, t, generator=gen).to(DEVICE)
    _, lut_sq, lut_m2 = book.tables(y.device)
    got = viterbi_encode_triton(y, lut_sq, lut_m2, book.bits, book.state_bits)
    ref = viterbi_encode_reference(y, book)
    assert got.dtype == torch.int64 and got.shape == (n, t) and int(got.max()) < 1 << bits
    error_got, error_ref = ((y - decode(c, book)).square().sum(-1) for c in (got, ref))
    # Both searches are exact up to float32 rounding of path costs of size ~Σ y² = t (~1e-5 relative): paths that
    # close may swap (at 6 bits, where the errors are smallest, an H100 showed it: run 105).
    assert float((error_got - error_ref).abs().max()) < 1e-5 * t
    assert float((got == ref).all(-1).float().mean()) >= 0.9
    if DEVICE == "cuda":
        assert torch.equal(viterbi_encode(y, book), got)


if os.environ.get("TQPATCH_KERNEL_TEST_VERBOSE"):  # pragma: no cover
    print("kernel tests on", DEVICE)

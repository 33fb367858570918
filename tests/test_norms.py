"""8-bit log norms (tqpatch.norms): error bound, zeros, clamping, codecs and configs that use them."""

import math

import pytest
import torch
from tiny_models import prompt, tiny_model

import tqpatch
from tqpatch.codec import make_codec
from tqpatch.norms import MARGIN, LogNormQuantizer


def test_round_trip_error_is_within_half_a_step():
    torch.manual_seed(0)
    norms = torch.exp2(torch.rand(2, 3, 500) * 3 - 1)  # 3 octaves per head
    quantizer = LogNormQuantizer()
    codes = quantizer.encode(norms)
    assert codes.dtype == torch.uint8 and codes.shape == norms.shape
    step = quantizer.step[None, :, None]
    ratio = (quantizer.decode(codes) / norms).log2().abs()
    assert bool((ratio <= step / 2 + 1e-6).all())
    # 3 + 2·MARGIN = 11 octaves in 254 steps: every norm within 2^(11/508) - 1 = 1.5%
    assert torch.allclose(quantizer.step, torch.full((3,), (3 + 2 * MARGIN) / 254), rtol=0.02)
    assert float((quantizer.decode(codes) / norms - 1).abs().max()) < 0.0155


def test_zero_norms_stay_zero_and_out_of_range_norms_are_clamped():
    quantizer = LogNormQuantizer()
    quantizer.encode(torch.tensor([[[1.0, 2.0, 0.0]]]))  # calibrates on 0..1 octaves (zeros ignored)
    norms = torch.tensor([[[0.0, 1.5, 2.0 ** (1 + MARGIN + 3), 2.0 ** (-MARGIN - 3)]]])
    decoded = quantizer.decode(quantizer.encode(norms))
    assert decoded[0, 0, 0] == 0
    assert decoded[0, 0, 1] == pytest.approx(1.5, rel=0.01)
    assert decoded[0, 0, 2] == pytest.approx(2.0 ** (1 + MARGIN), rel=0.01)  # clamped to the top of the range
    assert decoded[0, 0, 3] == pytest.approx(2.0 ** (-MARGIN), rel=0.01)  # and to the bottom


def test_heads_calibrate_separately():
    norms = torch.stack([torch.full((64,), 0.01), torch.full((64,), 100.0)])[None]  # [1, 2, 64]
    quantizer = LogNormQuantizer()
    decoded = quantizer.decode(quantizer.encode(norms))
    assert torch.allclose(decoded, norms, rtol=0.01)
    assert quantizer.low[1] - quantizer.low[0] == pytest.approx(math.log2(1e4), abs=1e-4)


@pytest.mark.parametrize("bits", [4, 2, 2.5])
def test_codec_with_8_bit_norms_is_nearly_as_accurate_as_float16(bits):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 256, 64) * torch.exp2(torch.rand(2, 4, 256, 1) * 2)  # norms over 2 octaves
    error = {}
    for norm_bits in (16, 8):
        codec = make_codec(64, bits, "mse", 0, norm_bits=norm_bits)
        parts = codec.encode(x)
        norm_parts = [name for name in parts if name.endswith("norms")]
        assert all(parts[name].dtype == (torch.uint8 if norm_bits == 8 else torch.float16) for name in norm_parts)
        error[norm_bits] = float(((codec.decode(parts, torch.float32) - x) ** 2).sum() / (x**2).sum())
    assert error[8] == pytest.approx(error[16], rel=0.02)  # ~1% norm error adds < 2% to the squared error
    assert error[8] != error[16]


def test_config_spec_and_errors():
    config = tqpatch.TurboQuantConfig.from_spec("k2.5v2.5-s4-ck-qs-n8")
    assert config.norm_bits == 8 and config.name == "k2.5v2.5-s4-ck-qs-n8"
    assert tqpatch.TurboQuantConfig.from_spec(config.name) == config
    with pytest.raises(ValueError, match=r"norm_bits must be one of \(16, 8\)"):
        tqpatch.TurboQuantConfig(norm_bits=4)
    with pytest.raises(ValueError, match="norm_bits must be one of"):
        make_codec(64, 4, "mse", 0, norm_bits=12)


def test_patched_model_stores_one_byte_norms_and_generates_like_float16_norms():
    model = tiny_model("llama")
    ids = prompt(batch=1, length=40)
    outputs, stats = {}, {}
    for norm_bits in (16, 8):
        tqpatch.patch(model, tqpatch.TurboQuantConfig(key_bits=4, value_bits=4, norm_bits=norm_bits))
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        outputs[norm_bits] = out.sequences
        stats[norm_bits] = tqpatch.cache_stats(out.past_key_values)
        tqpatch.unpatch(model)
    # one byte less per compressed K and V vector (the per-head ranges add a few bytes per layer)
    saved = stats[16].bytes - stats[8].bytes
    expected = 2 * model.config.num_key_value_heads * stats[8].compressed_tokens
    assert stats[8].compressed_tokens > 0 and expected - 200 < saved <= expected
    assert torch.equal(outputs[16][:, :42], outputs[8][:, :42])


def test_quality_presets_use_8_bit_norms():
    assert tqpatch.TurboQuantConfig.preset("k4v4+").name == "k4v4-s4-ss-ck-sv-qsd-n8"
    assert all(tqpatch.TurboQuantConfig.preset(name).norm_bits == 8 for name in ("k4v4+", "k3v2+", "k2v2+", "3.5bit+", "2.5bit+"))
    assert tqpatch.TurboQuantConfig.preset("k4v4").norm_bits == 16  # the paper-exact presets keep float16 norms


@pytest.mark.parametrize("margin", [0.0, 1.0, 2.5])
def test_a_smaller_margin_gives_a_finer_step_and_clamps_beyond_it(margin):
    torch.manual_seed(2)
    norms = torch.exp2(torch.rand(1, 2, 400) * 2)  # 2 octaves per head
    quantizer = LogNormQuantizer(margin)
    codes = quantizer.encode(norms)
    assert torch.allclose(quantizer.step, torch.full((2,), (2 + 2 * margin) / 254), rtol=0.02)
    rel = quantizer.decode(codes) / norms - 1
    assert float(rel.abs().max()) < 2 ** ((2 + 2 * margin) / 508) - 1 + 1e-4  # half a step
    wide = LogNormQuantizer()  # the default margin: a coarser step on the same norms
    assert float((wide.decode(wide.encode(norms)) / norms - 1).pow(2).mean()) > float(rel.pow(2).mean())
    beyond = torch.tensor([[[2.0 ** (2 + margin + 1)], [2.0 ** (-margin - 1)]]])  # [1, 2, 1]: head 0 above its range, head 1 below
    decoded = quantizer.decode(quantizer.encode(beyond))
    assert decoded[0, 0, 0] == pytest.approx(2.0 ** (float(quantizer.low[0]) + 254 * float(quantizer.step[0])), rel=1e-4)  # top end
    assert decoded[0, 1, 0] == pytest.approx(2.0 ** float(quantizer.low[1]), rel=1e-4)  # bottom end


def test_norm_margin_in_configs_codecs_and_specs():
    config = tqpatch.TurboQuantConfig.from_spec("k4v4-s4-ck-qs-n8m1")
    assert config.norm_margin == 1.0 and config.name == "k4v4-s4-ck-qs-n8m1"
    assert tqpatch.TurboQuantConfig.from_spec(config.name) == config
    assert tqpatch.TurboQuantConfig.from_spec("k4v4-n8").norm_margin == MARGIN
    for bits in (4, 2.5):
        codec = make_codec(64, bits, "mse", 0, norm_bits=8, norm_margin=1.5)
        quantizers = codec.norm_codes.values() if isinstance(codec.norm_codes, dict) else [codec.norm_codes]
        assert all(q.margin == 1.5 for q in quantizers)
    with pytest.raises(ValueError, match="set norm_bits=8 too"):
        tqpatch.TurboQuantConfig(norm_margin=1.0)
    with pytest.raises(ValueError, match=r"norm_margin must be a number of octaves in 0..16"):
        tqpatch.TurboQuantConfig(norm_bits=8, norm_margin=-1)
    with pytest.raises(ValueError, match="norm_margin must be"):
        LogNormQuantizer(margin=True)

"""Decode-faithful perplexity: the chunked path is exact for FP, compression is counted, sharding partitions, and SmolLM2's PPL is pinned."""

import math

import pytest
import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import tqpatch
from tqpatch.eval import perplexity as ppl_mod
from tqpatch.eval.data import default_text_file, read_text_file
from tqpatch.eval.perplexity import (
    aggregate,
    check_protocol,
    decode_perplexity,
    make_windows,
    shard_windows,
    window_nll,
)


class ByteTokenizer:
    """Bytes as token ids (no BOS): enough to drive decode_perplexity on a random model."""

    bos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return type("Enc", (), {"input_ids": list(text.encode("utf-8"))})()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return LlamaForCausalLM(config).eval()


TEXT = "The quick brown fox jumps over the lazy dog. " * 20  # 900 bytes


def plain_nll(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].float()
    return torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()


@pytest.mark.parametrize("chunk", [1, 7, 32])
def test_fp_chunked_path_equals_one_forward_pass(tiny, chunk):
    ids = torch.tensor(list(TEXT.encode())[:100])
    sums = window_nll(tiny, ids, chunk, DynamicCache(config=tiny.config))
    assert sums["predicted"] == 99 and sums["compressed_read"] == 0
    assert sums["nll_sum"] == pytest.approx(plain_nll(tiny, ids), rel=1e-3)


def test_compressed_tokens_are_counted_exactly(tiny):
    # W = 128, C = 32: before chunks 0..3 the cache holds 0, 32, 64, 96 tokens.
    result = decode_perplexity(
        tiny, ByteTokenizer(), TEXT, [tqpatch.TurboQuantConfig.preset("k2v2"), tqpatch.TurboQuantConfig.preset("k2v2", residual_length=32)],
        window=128, chunk=32, max_tokens=256, progress=False,
    )
    fp, k2, k2r = result.rows
    assert (result.windows, result.tokens) == (2, 256)
    assert fp.setting == "fp" and fp.compressed_tokens_read == 0 and fp.compressed_key_fraction == 0
    assert k2.compressed_tokens_read == 2 * (0 + 32 + 64 + 96)
    assert k2r.compressed_tokens_read == 2 * (0 + 0 + 32 + 64)  # the last 32 tokens stay exact
    # compressed (query, key) pairs / all attended pairs, per window: 32·192 / (32·192 + 4·(32·33/2))
    assert k2.compressed_key_fraction == pytest.approx(6144 / (6144 + 4 * 528))
    assert fp.predicted_tokens == k2.predicted_tokens == 2 * 127
    assert k2.bits_per_element == pytest.approx(2 + 16 / 16)  # 2-bit codes + an fp16 norm per 16-dim vector
    assert k2.compression_ratio == pytest.approx(32 / 3)
    assert fp.bits_per_element == 32.0
    assert k2.ppl != fp.ppl and k2.delta_ppl == pytest.approx(k2.ppl - fp.ppl)
    assert math.isfinite(k2.ppl) and k2.ppl > 1


def test_bits_are_pooled_over_windows_of_unequal_length(tiny):
    # Windows of 128 and 2 tokens, residual 32: the first ends with 96 compressed (3 bits: 2-bit codes + fp16 norm
    # per 16 dims) + 32 exact tokens, the second with 2 exact tokens; float32 exact tokens are 32 bits.
    result = decode_perplexity(
        tiny, ByteTokenizer(), TEXT, [tqpatch.TurboQuantConfig.preset("k2v2", residual_length=32)], window=128, chunk=32, max_tokens=130, progress=False
    )
    assert result.windows == 2
    row = result.rows[1]
    assert row.bits_per_element == pytest.approx((96 * 3 + 34 * 32) / 130)
    assert row.compression_ratio == pytest.approx(32 * 130 / (96 * 3 + 34 * 32))


def chunked_log_probs(model, ids: torch.Tensor, chunk: int, config=None) -> torch.Tensor:
    """Next-token log-probabilities [L - 1, V] of ids fed in chunks through a fresh cache (patched with config)."""
    if config is not None:
        tqpatch.patch(model, config)
    try:
        cache, out = DynamicCache(config=model.config), []
        with torch.no_grad():
            for start in range(0, len(ids), chunk):
                out.append(model(input_ids=ids[None, start : start + chunk], past_key_values=cache, use_cache=True).logits[0].float())
    finally:
        if config is not None:
            tqpatch.unpatch(model)
    return torch.log_softmax(torch.cat(out)[:-1], dim=-1)


def test_kl_to_the_baseline_is_the_mean_divergence_of_the_next_token_distributions(tiny):
    settings = [tqpatch.TurboQuantConfig.preset("k2v2"), tqpatch.TurboQuantConfig.preset("k4v4")]
    result = decode_perplexity(tiny, ByteTokenizer(), TEXT, settings, window=128, chunk=32, max_tokens=256, progress=False, kl=True)
    fp, k2, k4 = result.rows
    ids = torch.tensor(list(TEXT.encode())[:256])
    want, exact = [], []  # the reference kept in float16 as the evaluator keeps it, and in float32
    for config in settings:
        sums = [0.0, 0.0]
        for window in (ids[:128], ids[128:]):
            ref, logq = chunked_log_probs(tiny, window, 32), chunked_log_probs(tiny, window, 32, config)
            ref16 = torch.log_softmax(ref.half().float(), dim=-1)
            sums[0] += (ref16.exp() * (ref16 - logq)).sum().item()
            sums[1] += (ref.exp() * (ref - logq)).sum().item()
        want.append(sums[0] / 254)
        exact.append(sums[1] / 254)
    assert fp.kl == 0.0
    assert k2.kl == pytest.approx(want[0], rel=1e-4) and k4.kl == pytest.approx(want[1], rel=1e-4)
    assert k2.kl == pytest.approx(exact[0], abs=2e-6) and k4.kl == pytest.approx(exact[1], abs=2e-6)  # float16 rounding: ~ε²/2
    assert k2.kl > k4.kl > 0
    assert "KL (nats)" in result.table()
    assert result.to_json()["versions"] == {"torch": torch.__version__, "transformers": transformers.__version__}  # ΔPPL depends on them
    plain = decode_perplexity(tiny, ByteTokenizer(), TEXT, settings[:1], window=128, chunk=32, max_tokens=256, progress=False)
    assert plain.rows[1].kl is None and plain.rows[1].ppl == k2.ppl and "KL" not in plain.table()


def test_the_model_is_left_unpatched(tiny):
    decode_perplexity(tiny, ByteTokenizer(), TEXT, [tqpatch.TurboQuantConfig.preset("k4v4")], window=64, chunk=32, max_tokens=64, progress=False)
    assert not tqpatch.is_patched(tiny)
    tqpatch.patch(tiny, "k4v4")
    try:
        with pytest.raises(tqpatch.TQPatchError, match="unpatched model"):
            decode_perplexity(tiny, ByteTokenizer(), TEXT, [], window=64, chunk=32, progress=False)
    finally:
        tqpatch.unpatch(tiny)


@pytest.mark.parametrize("window, chunk, message", [(16, 32, "at least the chunk size"), (64, 0, "chunk must be >= 1"), (1, 1, "window must be >= 2")])
def test_protocol_errors(window, chunk, message):
    with pytest.raises(ValueError, match=message):
        check_protocol(window, chunk)


def test_windows_and_bos():
    ids = torch.arange(10)
    assert [w.tolist() for w in make_windows(ids, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [w.tolist() for w in make_windows(torch.arange(9), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail predicts nothing
    assert [w.tolist() for w in make_windows(torch.arange(5), 4, bos_id=99)] == [[99, 0, 1, 2], [99, 3, 4]]


def test_copy_windows_read_each_passage_twice():
    assert [w.tolist() for w in make_windows(torch.arange(5), 4, copy=True)] == [[0, 1, 0, 1], [2, 3, 2, 3], [4, 4]]
    assert [w.tolist() for w in make_windows(torch.arange(4), 5, bos_id=99, copy=True)] == [[99, 0, 1, 0, 1], [99, 2, 3, 2, 3]]


def test_copy_evaluation_reads_each_passage_twice(tiny):
    # --max-tokens 128 with copy: two windows of 128, each 64 text bytes then the same 64 bytes
    result = decode_perplexity(tiny, ByteTokenizer(), TEXT, [], window=128, chunk=32, max_tokens=128, progress=False, copy=True)
    ids = torch.tensor(list(TEXT.encode())[:128])
    want = sum(plain_nll(tiny, torch.cat([p, p])) for p in (ids[:64], ids[64:])) / 254
    assert (result.tokens, result.windows, result.copy) == (128, 2, True)
    assert math.log(result.rows[0].ppl) == pytest.approx(want, rel=1e-3)
    assert "passage read twice" in result.table()


@pytest.mark.parametrize("num_windows, world", [(1, 1), (4, 1), (4, 2), (5, 2), (7, 3), (2, 4)])
def test_shards_partition_the_windows(num_windows, world):
    shards = [shard_windows(num_windows, rank, world) for rank in range(world)]
    flat = sorted(i for shard in shards for i in shard)
    assert flat == list(range(num_windows))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_errors():
    with pytest.raises(ValueError, match="rank"):
        shard_windows(4, 2, 2)


def test_sharded_sums_gather_to_the_single_process_result(tiny):
    """What two processes compute on their shards, gathered, gives the same rows as one process."""
    windows = make_windows(torch.tensor(list(TEXT.encode())[:256]), 64)
    settings = [None, tqpatch.TurboQuantConfig.preset("k3v2")]
    every = [s for i, st in enumerate(settings) for s in ppl_mod._run_setting(tiny, st, windows, list(range(len(windows))), 32, i, None)]
    gathered = [
        s for i, st in enumerate(settings) for rank in (1, 0) for s in ppl_mod._run_setting(tiny, st, windows, shard_windows(len(windows), rank, 2), 32, i, None)
    ]
    one, two = aggregate(settings, every), aggregate(settings, gathered)
    for a, b in zip(one, two):
        assert (a.setting, a.predicted_tokens, a.compressed_tokens_read) == (b.setting, b.predicted_tokens, b.compressed_tokens_read)
        assert a.ppl == pytest.approx(b.ppl, rel=1e-9)


def test_hf_quantized_cache_through_the_same_protocol(tiny):
    pytest.importorskip("optimum.quanto")
    settings = [ppl_mod.HFQuantizedSetting(2, "token", residual_length=32), ppl_mod.HFQuantizedSetting(4, "channel", residual_length=32)]
    result = decode_perplexity(tiny, ByteTokenizer(), TEXT, settings, window=128, chunk=32, max_tokens=128, progress=False)
    fp, int2, int4 = result.rows
    assert int2.setting == "hf-quanto-int2-ktoken-r32" and int4.setting == "hf-quanto-int4-kchannel-r32"
    assert int2.compressed_tokens_read > 0 and int2.ppl != fp.ppl
    assert int2.bits_per_element < int4.bits_per_element < 32


# -- the real model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from tqpatch.models import load_model

    return load_model()


@pytest.fixture(scope="module")
def wikitext():
    path = default_text_file()
    if path is None:
        pytest.skip("../shared/data/wikitext-2-raw-test.txt not found beside the repo")
    return read_text_file(path)


@pytest.mark.slow
def test_smollm2_fp_chunked_path_equals_one_forward_pass(smollm2, wikitext):
    model, tokenizer = smollm2
    ids = torch.tensor(tokenizer(wikitext[:4000], add_special_tokens=False).input_ids[:256])
    sums = window_nll(model, ids, 32, DynamicCache(config=model.config))
    assert sums["nll_sum"] == pytest.approx(plain_nll(model, ids), rel=1e-3)


# Measured on CPU (float32): first 1024 WikiText-2 tokens, W = 512, C = 32 (see README, Perplexity).
# k4v4-s4-ck-qsd-n8 is k4v4+ before the tenth session (on SmolLM2, which has no sliding layers, -qsd is -qs:
# it pins as k4v4-s4-ck-qs-n8 did) and k4v4+ now k4v4-s4-ck-sv-qsd-n8; k2v2+ is k2v2-s4-ck-uv-sv-qsd-dp-n8 since the tenth session (-sv), and
# k2v2-s4-ck-uv-qsd-dp-n8 k2v2+ before it; k2v2-s4-ck-uv-qs-n8 is k2v2+ before the diagonal prior (-dp),
# k2v2-s4-ck-qs-n8 k2v2+ before unbiased values and
# k2v2-s4-ck before query shaping and 8-bit norms; k2.75v2.5-s3-ck-qs-n8 meets the quality issue's "<= 3 true bits:
# <= +5%" on SmolLM2 (8,192 tokens); -ukv / -uk / -uv: unbiased decoding (README, Unbiased decoding); 3.5bit+ is
# k4v3-s4-ck-uv-sv-qsd-dp-n8 since the eleventh session (k4v3-s4-ck-uv-qsd-dp-n8 since the eighth, k3.5v3.5-s4-ck-qsd-dp-n8
# before that); -sv adds the score variance to the compressed logits (README, Score variance in the logits); -tkv stores
# trellis codes (README, Trellis codes): k4v3-s4-ck-uv-sv-tkv-qs-n8-e6.2-fit128 meets the 3.5-bit goal over ten seeds at 8,192 tokens;
# since the fourteenth session k2v2+ is k2v2-s4-ck-uv-sv-tkv-qsd-dp-n8 and 3.5bit+ k4v3-s4-ck-uv-sv-tkv-qsd-dp-n8 (trellis codes;
# on this short text 3.5bit+ reads worse with them, 27.184 vs 27.038, where 8,192 tokens at three seeds give +0.46% vs +1.19%).
# Since the sixteenth session the + presets add -ss (sinks in sliding-window layers), which changes nothing on SmolLM2:
# these pins name the presets' specs without it. Since the eighteenth session 4bit+ takes SmolLM2's bits per layer (-Bt,
# codebooks/layer_bits/smollm2.json); the evaluator reports it by the bits it took (FOUR_BIT_PLUS), below its uniform
# spec here (27.087 vs 27.195). Since the twentieth session 3.5bit+ takes SmolLM2's bits per layer too
# (THREE_FIVE_BIT_PLUS); on this short text (one seed) it reads above its uniform spec (27.225 vs 27.184), where
# 8,192 tokens at five seeds give +0.375% vs +0.560% (README, Needle margins).
FOUR_BIT_PLUS = "k4v4-s4-ss-ck-sv-tkv-qsd-n8-B0.11.13.16.25.27.29k3v3-B2k4v5-B3.5.7.8.9.10.17.24k5v4-B6.12.22.26k4v3-B18.20.23k6v5"
THREE_FIVE_BIT_PLUS = "k4v3-s4-ss-ck-uv-sv-tkv-qsd-dp-n8-B0.1.2.6.11.12.13.15.16.22.25.27.28.29k3v3-B7.8k5v3-B17.23k5v4-B18k6v5-B20k6v4-B24k4v4"
PINNED = {FOUR_BIT_PLUS: 27.087, THREE_FIVE_BIT_PLUS: 27.225, "fp": 26.987, "k4v4": 27.085, "k2v2": 36.638, "k2v2-s4-ck-qs-n8": 33.480, "k2v2-s4-ck": 32.908,
          "k2.75v2.5-s3-ck-qs-n8": 28.431, "k2.75v2.5-s3-ck-qs-n8-e4.2": 28.190, "k2v2-s3-ck-qs-n8-e3.1": 31.509,
          "k1.8v2-s3-ck-qs-n8-e3.1-fit128": 31.410, "k2v2-s4-ck-ukv-qs-n8": 28.836, "k4v4-s4-ck-uk-qs-n8": 27.060,
          "k2v2-s4-ck-uv-qs-n8": 31.908, "k4v4-s4-ck-qsd-n8": 27.161, "k2v2-s4-ck-uv-qsd-dp-n8": 31.679,
          "k4v3-s4-ck-uv-qsd-dp-n8": 27.081, "k2v2-s4-ck-uv-sv-qsd-dp-n8": 30.659,
          "k4v4-s4-ck-sv-qsd-n8": 27.169, "k4v3-s4-ck-uv-sv-qsd-dp-n8": 27.038,
          "k4v3-s4-ck-uv-sv-tkv-qs-n8-e6.2-fit128": 27.198, "k4v4-s4-ck-sv-tkv-qsd-n8": 27.195, "k2v2-s4-ck-uv-sv-tkv-qsd-dp-n8": 28.534,
          "k4v3-s4-ck-uv-sv-tkv-qsd-dp-n8": 27.184}
MARGIN = {FOUR_BIT_PLUS: 2e-3, THREE_FIVE_BIT_PLUS: 5e-3, "fp": 1e-3, "k4v4": 5e-3, "k2v2": 0.02, "k2v2-s4-ck-qs-n8": 0.02, "k2v2-s4-ck": 0.02,
          "k2.75v2.5-s3-ck-qs-n8": 0.01, "k2.75v2.5-s3-ck-qs-n8-e4.2": 0.01, "k2v2-s3-ck-qs-n8-e3.1": 0.02,
          "k1.8v2-s3-ck-qs-n8-e3.1-fit128": 0.02, "k2v2-s4-ck-ukv-qs-n8": 0.02, "k4v4-s4-ck-uk-qs-n8": 5e-3,
          "k2v2-s4-ck-uv-qs-n8": 0.02, "k4v4-s4-ck-qsd-n8": 5e-3, "k2v2-s4-ck-uv-qsd-dp-n8": 0.02,
          "k4v3-s4-ck-uv-qsd-dp-n8": 5e-3, "k2v2-s4-ck-uv-sv-qsd-dp-n8": 0.02, "k4v4-s4-ck-sv-qsd-n8": 5e-3,
          "k4v3-s4-ck-uv-sv-qsd-dp-n8": 5e-3, "k4v3-s4-ck-uv-sv-tkv-qs-n8-e6.2-fit128": 5e-3, "k4v4-s4-ck-sv-tkv-qsd-n8": 5e-3,
          "k2v2-s4-ck-uv-sv-tkv-qsd-dp-n8": 0.02, "k4v3-s4-ck-uv-sv-tkv-qsd-dp-n8": 5e-3}  # relative


@pytest.mark.slow
def test_smollm2_perplexity_is_pinned(smollm2, wikitext):
    model, tokenizer = smollm2
    result = decode_perplexity(
        model, tokenizer, wikitext, [tqpatch.TurboQuantConfig.from_spec(name) for name in ("k4v4", "k2v2", "k4v4-s4-ck-qsd-n8", "k2v2-s4-ck-qs-n8", "k2v2-s4-ck-uv-qsd-dp-n8", "k2v2-s4-ck-uv-qs-n8", "k2v2-s4-ck", "k2.75v2.5-s3-ck-qs-n8",
                                                                                    "k2.75v2.5-s3-ck-qs-n8-e4.2", "k2v2-s3-ck-qs-n8-e3.1",
                                                                                    "k1.8v2-s3-ck-qs-n8-e3.1-fit128", "k2v2-s4-ck-ukv-qs-n8",
                                                                                    "k4v4-s4-ck-uk-qs-n8", "k4v3-s4-ck-uv-qsd-dp-n8", "k4v3-s4-ck-uv-sv-qsd-dp-n8", "k3.5v3.5-s4-ck-qsd-dp-n8",
                                                                                    "k2v2-s4-ck-uv-sv-qsd-dp-n8", "k4v4-s4-ck-sv-qsd-n8", "k4v3-s4-ck-uv-sv-tkv-qsd-dp-n8", "k4v3-s4-ck-uv-sv-tkv-qs-n8-e6.2-fit128",
                                                                                    "k4v4-s4-ck-sv-tkv-qsd-n8", "k2v2-s4-ck-uv-sv-tkv-qsd-dp-n8", "4bit+", "3.5bit+")],
        window=512, chunk=32, max_tokens=1024, progress=False,
    )
    got = {row.setting: row.ppl for row in result.rows}
    for name, value in PINNED.items():
        assert got[name] == pytest.approx(value, rel=MARGIN[name]), got
    assert got["fp"] < got["k4v4"] < got["k2v2"]
    assert got["k2v2-s4-ck"] < 0.92 * got["k2v2"] and got["k2v2-s4-ck-qs-n8"] < 0.93 * got["k2v2"]  # the quality levers at 2 bits
    assert got["k2v2-s3-ck-qs-n8-e3.1"] < 0.96 * got["k2v2-s4-ck-qs-n8"]  # the eigen split on top
    assert got["k2v2-s4-ck-uv-sv-tkv-qsd-dp-n8"] < 0.95 * got["k2v2-s4-ck-uv-sv-qsd-dp-n8"]  # k2v2+ with trellis codes: the same bytes, less loss
    assert got["k2v2-s4-ck-ukv-qs-n8"] < 0.9 * got["k2v2-s4-ck-qs-n8"]  # unbiased decoding at 2 bits (SmolLM2)
    assert got["k2v2-s4-ck-uv-qs-n8"] < 0.97 * got["k2v2-s4-ck-qs-n8"]  # unbiased values alone: the k2v2+ preset
    assert got[FOUR_BIT_PLUS] < got["k4v4-s4-ck-sv-tkv-qsd-n8"]  # -Bt
    assert got["k4v3-s4-ck-uv-qsd-dp-n8"] < 0.99 * got["k3.5v3.5-s4-ck-qsd-dp-n8"]  # 3.5bit+ now: 4-bit keys beat the 3.5 / 3.5 split
    assert got["k2v2-s4-ck-uv-sv-qsd-dp-n8"] < 0.98 * got["k2v2-s4-ck-uv-qsd-dp-n8"]  # the score variance at 2 bits
    assert all(row.compressed_tokens_read == 2 * 32 * sum(range(16)) for row in result.rows[1:3])


def test_default_text_is_labelled_by_a_relative_path():
    from tqpatch.eval.data import load_text

    if default_text_file() is None:
        pytest.skip("the shared WikiText-2 file is not beside the repo")
    _, source = load_text()
    assert not source.startswith("/") and source.endswith("wikitext-2-raw-test.txt")

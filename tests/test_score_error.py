"""eval/score_error.py: score errors of a key codec, split into what softmax ignores and what it sees."""

import torch

from tiny_models import prompt, tiny_model
from tqpatch.config import TurboQuantConfig
from tqpatch.eval.score_error import capture_queries_keys, score_errors, stored_keys


def test_captured_keys_are_the_ones_the_cache_receives():
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids = prompt(length=40)[0]
    captured = capture_queries_keys(model, ids, [0, 2])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[None], past_key_values=cache)
    for layer in (0, 2):
        assert torch.allclose(captured[layer][1], cache.layers[layer].keys, atol=1e-5)


def test_sinks_stay_exact_and_more_bits_mean_smaller_errors():
    model = tiny_model("llama")
    ids = prompt(length=96)[0]
    q, k, cos, sin, q_pre = capture_queries_keys(model, ids, [1])[1]
    assert q_pre.shape == (1, q.shape[2], q.shape[1], q.shape[3])  # [1, T, Hq, d] before RoPE
    stored = stored_keys(k, cos, sin, TurboQuantConfig.from_spec("k2v2-s4-ck"), chunk=32)
    assert stored.shape == k.shape
    assert torch.equal(stored[:, :, :4], k[:, :, :4]) and not torch.allclose(stored[:, :, 4:], k[:, :, 4:])
    rows = {r.setting: r for r in score_errors(model, ids, ["k2v2", "k4v4", "k8v8"], [1])}
    assert rows["k8v8"].total < rows["k4v4"].total < rows["k2v2"].total
    for r in rows.values():
        assert 0 < r.differential <= r.total + 1e-9  # removing each query's mean error can only lower the RMS
        assert r.attention_weighted > 0

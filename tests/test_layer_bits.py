"""eval.layer_bits: the per-layer sensitivity scan's settings and the bit allocation that reads it."""

import pytest

from tqpatch.eval.layer_bits import allocate_bits, code_distortion, parse_hold, scan_losses, scan_settings, tokens_per_layer
from tqpatch.config import TurboQuantConfig

DISTORTION = {1: 0.283, 2: 0.076, 3: 0.0204, 4: 0.00543, 5: 0.00151, 6: 0.00044}  # trellis codes, d 128


def test_scan_compresses_one_side_of_one_layer():
    specs = scan_settings("s4-ck-n8", num_layers=3, side="v")
    assert specs == ["k8v2-s4-ck-n8-L1.2", "k8v2-s4-ck-n8-L0.2", "k8v2-s4-ck-n8-L0.1"]
    config = TurboQuantConfig.from_spec(specs[1])
    assert [config.layer_bits(i, 3) for i in range(3)] == [None, (8, 2), None]
    with pytest.raises(ValueError, match="side must be one of"):
        scan_settings("", 3, "q")


def test_allocation_moves_bits_to_the_costly_sides_within_the_budget():
    key_loss, value_loss, tokens = [8.0, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2], [100, 100, 100, 100]
    result = allocate_bits(key_loss, value_loss, tokens, DISTORTION, key_bits=4, value_bits=4)
    assert result.average_bits <= 4 and result.predicted_loss < result.uniform_loss
    assert result.bits[(0, "k")] > 4 and min(result.bits.values()) >= 3
    overrides = result.overrides(4, 4)
    assert overrides[0][:2] == (0, result.bits[(0, "k")]) and all(bits != (4, 4) for _, *bits in overrides)
    assert TurboQuantConfig(layer_bits_overrides=overrides).layer_bits(0, 4) == (result.bits[(0, "k")], result.bits[(0, "v")])
    even = allocate_bits([1.0] * 4, [1.0] * 4, tokens, DISTORTION, key_bits=4, value_bits=4)
    assert set(even.bits.values()) == {4} and even.overrides(4, 4) == ()  # equal losses: nothing to move


def test_allocation_is_near_the_brute_force_optimum_and_prices_bits_by_tokens():
    """Two layers holding 400 and 100 tokens (a full and a sliding one): a bit on the short layer costs a quarter."""
    import itertools

    key_loss, value_loss, tokens = [1.0, 1.0], [0.3, 0.1], [400, 100]
    result = allocate_bits(key_loss, value_loss, tokens, DISTORTION, key_bits=4, value_bits=4, floor=0.0)
    losses = {(0, "k"): 1.0, (1, "k"): 1.0, (0, "v"): 0.3, (1, "v"): 0.1}
    sizes = {(0, "k"): 400, (1, "k"): 100, (0, "v"): 400, (1, "v"): 100}
    best = min(
        sum(losses[name] * DISTORTION[b] for name, b in zip(losses, combo)) / DISTORTION[2]
        for combo in itertools.product(range(3, 7), repeat=4)
        if sum(sizes[name] * b for name, b in zip(losses, combo)) <= 8 * 500
    )
    assert sum(sizes[name] * b for name, b in result.bits.items()) <= 8 * 500
    assert result.predicted_loss <= 1.05 * best
    assert result.bits[(1, "k")] > result.bits[(0, "k")]  # equal losses, the cheaper layer gets more bits


def test_tokens_per_layer_reads_sliding_windows():
    class Config:
        num_hidden_layers, layer_types, sliding_window = 3, ["sliding_attention", "full_attention", "sliding_attention"], 512

    assert tokens_per_layer(Config(), 2048) == [511, 2048, 511]
    assert tokens_per_layer(Config(), 256) == [256, 256, 256]


def test_allocation_can_keep_one_side_fixed():
    result = allocate_bits([8.0, 0.2, 0.2, 0.2], [9.0, 0.01, 0.01, 0.01], [100] * 4, DISTORTION, key_bits=4, value_bits=3, move="k")
    assert [result.bits[(i, "v")] for i in range(4)] == [3] * 4 and result.bits[(0, "k")] > 4
    with pytest.raises(ValueError, match="move must name the sides"):
        allocate_bits([1.0], [1.0], [1], DISTORTION, 4, 4, move="q")


def test_allocation_can_keep_every_layers_keys_at_their_bits_or_more():
    """min_key_bits=key_bits: quiet layers' keys keep their 4 bits (the values pay for the loud layer's keys)."""
    losses = [8.0, 0.01, 0.01, 0.01], [0.5, 0.5, 0.5, 0.5]
    free = allocate_bits(*losses, [100] * 4, DISTORTION, key_bits=4, value_bits=3, min_bits=2)
    kept = allocate_bits(*losses, [100] * 4, DISTORTION, key_bits=4, value_bits=3, min_bits=2, min_key_bits=4)
    assert min(free.bits[(i, "k")] for i in range(4)) < 4 and min(kept.bits[(i, "k")] for i in range(4)) == 4
    assert kept.bits[(0, "k")] > 4 and kept.average_bits <= 3.5 and free.predicted_loss <= kept.predicted_loss < kept.uniform_loss


def test_allocation_can_hold_named_layers_keys_at_their_bits():
    """hold_keys: the named quiet layers' keys keep 4 bits, the others may still drop; a layer the model lacks is an error."""
    losses = [8.0, 0.01, 0.01, 0.01], [0.5, 0.5, 0.5, 0.5]
    free = allocate_bits(*losses, [100] * 4, DISTORTION, key_bits=4, value_bits=3, min_bits=2)
    held = allocate_bits(*losses, [100] * 4, DISTORTION, key_bits=4, value_bits=3, min_bits=2, hold_keys=(2,))
    assert free.bits[(2, "k")] < 4 and held.bits[(2, "k")] >= 4
    assert min(held.bits[(i, "k")] for i in (1, 3)) < 4 and held.average_bits <= 3.5
    with pytest.raises(ValueError, match=r"hold_keys names layers the model lacks: \[7\] \(layers 0..3\)"):
        allocate_bits(*losses, [100] * 4, DISTORTION, key_bits=4, value_bits=3, hold_keys=(7,))


def test_allocation_can_hold_a_layers_keys_above_the_key_bits():
    """hold_keys={layer: bits}: a quiet layer's keys get 5 bits (Gemma-3's needle on layer 14), paid for elsewhere at the
    same average; more than max_bits is an error."""
    losses = [8.0, 0.01, 0.01, 0.01], [0.5, 0.5, 0.5, 0.5]
    free = allocate_bits(*losses, [100] * 4, DISTORTION, key_bits=4, value_bits=3, min_bits=2)
    held = allocate_bits(*losses, [100] * 4, DISTORTION, key_bits=4, value_bits=3, min_bits=2, hold_keys={2: 5})
    assert free.bits[(2, "k")] < 5 and held.bits[(2, "k")] == 5
    assert held.average_bits <= 3.5 and free.predicted_loss < held.predicted_loss
    with pytest.raises(ValueError, match=r"hold_keys asks for more than max_bits = 6: \{2: 7\}"):
        allocate_bits(*losses, [100] * 4, DISTORTION, key_bits=4, value_bits=3, min_bits=2, hold_keys={2: 7})


def test_allocation_can_hold_named_layers_values():
    """hold_values: a quiet layer's values keep the value bits (or named bits) while other quiet values drop to pay; the
    keys' holds are separate, and a layer the model lacks is an error naming hold_values."""
    losses = [0.5, 0.5, 0.5, 0.5], [8.0, 0.01, 0.01, 0.01]
    free = allocate_bits(*losses, [100] * 4, DISTORTION, key_bits=4, value_bits=3, min_bits=2)
    held = allocate_bits(*losses, [100] * 4, DISTORTION, key_bits=4, value_bits=3, min_bits=2, hold_values=(3,))
    above = allocate_bits(*losses, [100] * 4, DISTORTION, key_bits=4, value_bits=3, min_bits=2, hold_values={3: 4})
    assert free.bits[(3, "v")] < 3 and held.bits[(3, "v")] >= 3 and above.bits[(3, "v")] >= 4
    assert min(held.bits[(i, "v")] for i in (1, 2)) < 3 and held.average_bits <= 3.5 and above.average_bits <= 3.5
    assert free.predicted_loss < held.predicted_loss < above.predicted_loss
    with pytest.raises(ValueError, match=r"hold_values names layers the model lacks: \[9\] \(layers 0..3\)"):
        allocate_bits(*losses, [100] * 4, DISTORTION, key_bits=4, value_bits=3, hold_values=(9,))


def test_hold_keys_parse_layers_or_layers_with_bits():
    assert parse_hold("") == () and parse_hold("19") == (19,) and parse_hold([19]) == (19,)
    assert parse_hold("14:5,19:4") == {14: 5, 19: 4} and parse_hold(["14:5"]) == {14: 5}
    with pytest.raises(ValueError, match=r"layers, or layer:bits, separated by commas \(e.g. 19 or 14:5,19:4\); got '14:5,19'"):
        parse_hold("14:5,19")


def test_scan_losses_read_ppl_or_kl_rows(tmp_path):
    import json

    rows = [dict(setting="fp", ppl=20.0, kl=0.0), dict(setting="a", ppl=20.2, kl=0.0005), dict(setting="b", ppl=19.9, kl=0.002)]
    path = tmp_path / "scan.json"
    path.write_text(json.dumps({"rows": rows}))
    assert scan_losses(str(path)) == pytest.approx([1.0, -0.5])
    assert scan_losses(str(path), "kl") == pytest.approx([0.5, 2.0])  # millinats
    path.write_text(json.dumps({"rows": [dict(setting="fp", ppl=20.0, kl=None), dict(setting="a", ppl=20.2, kl=None)]}))
    with pytest.raises(ValueError, match="--kl"):
        scan_losses(str(path), "kl")
    with pytest.raises(ValueError, match="metric must be one of"):
        scan_losses(str(path), "mse")


def test_code_distortion_falls_about_fourfold_per_bit():
    lloyd = code_distortion(64, "lloyd-max", range(2, 5))
    assert lloyd[2] > 3 * lloyd[3] > 9 * lloyd[4] > 0
    assert lloyd[4] == pytest.approx(0.0093, rel=0.1)  # the paper's 4-bit MSE
    with pytest.raises(ValueError, match="codes must be one of"):
        code_distortion(64, "uniform", range(2, 5))


GEMMA3_KL_SETTINGS = {  # the README's Gemma-3 settings (Bits per layer from a KL scan), from the shipped scan
    ("lloyd-max", 4, 4): "k4v4-B0k3v4-B1.3.4.14.15.16k4v3-B2k5v3-B5.7.8.9.10.11.13k5v4-B12k5v5-B17k3v3",
    ("trellis", 4, 4): "k4v4-B0k3v4-B1.3.4.14.15.16k4v3-B2k5v3-B5.7.8.9.10.11.13k5v4-B12k5v5-B17k3v3",
    ("trellis", 4, 3): "k4v3-B0.1.3.4k3v3-B2k5v2-B7k4v4-B8.10.12k5v4-B9.11k5v3-B17k3v2",
}


@pytest.mark.parametrize("codes, key_bits, value_bits", list(GEMMA3_KL_SETTINGS))
def test_gemma3_kl_scan_gives_the_readme_settings(codes, key_bits, value_bits):
    """The shipped Gemma-3 KL scan (docs/data/layer_scan_4bit_*_kl_gemma3.json: each layer-side alone at 4 bits,
    held-out text) allocated as `python -m tqpatch.eval.layer_bits allocate --metric kl --scan-bits 4` does: the same
    settings the README measured, at the uniform setting's bits, with a lower predicted KL."""
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "docs" / "data"

    class Gemma3:  # Gemma-3-270M's layer pattern: every sixth layer full attention, the rest slide over 512 tokens
        num_hidden_layers, sliding_window = 18, 512
        layer_types = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)]

    keys = scan_losses(str(data / "layer_scan_4bit_keys_kl_gemma3.json"), "kl")
    values = scan_losses(str(data / "layer_scan_4bit_values_kl_gemma3.json"), "kl")
    assert len(keys) == len(values) == 18 and sum(keys) > 4 * sum(values) > 0  # keys hold most of the KL
    min_bits = 3 if (key_bits, value_bits) == (4, 4) else 2
    result = allocate_bits(keys, values, tokens_per_layer(Gemma3(), 2048), code_distortion(256, codes, range(2, 7)),
                           key_bits, value_bits, scan_bits=4, min_bits=min_bits, max_bits=6, floor=0.0)
    assert result.average_bits <= (key_bits + value_bits) / 2 and result.predicted_loss < 0.85 * result.uniform_loss
    assert TurboQuantConfig(key_bits=key_bits, value_bits=value_bits, layer_bits_overrides=result.overrides(key_bits, value_bits)).name == \
        GEMMA3_KL_SETTINGS[(codes, key_bits, value_bits)]


def test_plot_scan_writes_the_figure(tmp_path):
    from tqpatch.eval.layer_bits import plot_scan

    out = plot_scan([0.5, 1.5, 0.1], [0.2, 0.1, 0.05], ["k4v4-B1k5v3", "shipped=k4v4-B0k3v4"], str(tmp_path / "scan.png"), "t", "KL", full_layers=(1,))
    assert out.exists() and out.stat().st_size > 5000

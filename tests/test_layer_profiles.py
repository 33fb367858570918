"""Shipped bits per layer ("-Bt"): the spec, the shipped profiles, and patch() / the evaluators taking them."""

import json
import warnings

import pytest
import torch
from transformers import DynamicCache, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

import tqpatch
from tqpatch import layer_profiles
from tqpatch.config import TurboQuantConfig
from tqpatch.eval.layer_bits import tokens_per_layer
from tqpatch.eval.perplexity import decode_perplexity

from test_perplexity import TEXT, ByteTokenizer
from tiny_models import prompt, tiny_model

GEMMA3_270M = Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                               num_key_value_heads=1, head_dim=256, sliding_window=512)  # the real model's shape, no weights
SMOLLM2_135M = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, head_dim=64)


def test_bt_spec_round_trips_and_excludes_explicit_layer_bits():
    config = TurboQuantConfig.from_spec("k4v4-s4-ss-ck-sv-tkv-qsd-n8-Bt")
    assert config.tuned_layer_bits and config.name == "k4v4-s4-ss-ck-sv-tkv-qsd-n8-Bt"
    assert TurboQuantConfig.from_spec(config.name) == config
    assert layer_profiles.base_key(config) == "k4v4-tkv" and layer_profiles.base_key(TurboQuantConfig.from_spec("k4v3-tk")) == "k4v3-tk"
    with pytest.raises(ValueError, match="tuned_layer_bits .* not both"):
        TurboQuantConfig.from_spec("k4v4-Bt-B0k5v4")


def test_the_gemma3_profile_gives_the_settings_the_readme_measured():
    """Gemma-3-270M's shipped profile turns -Bt into the KL allocations the README measured: the seventeenth session's
    at 4 bits ("Bits per layer from a KL scan": +0.270% over five seeds), and at 3.5 bits the twenty-second session's,
    from a scan with the preset's own codes with layers 11 and 14's keys held at 5 bits ("A KL scan with the preset's
    own codes": +0.438% at seeds 5-9 and +0.484% over seven, and every needle FP answers at 1,024 tokens)."""
    four = layer_profiles.resolve(TurboQuantConfig.from_spec("k4v4-s4-ss-ck-sv-tkv-qsd-n8-Bt-seed3"), GEMMA3_270M)
    assert four.name == "k4v4-s4-ss-ck-sv-tkv-qsd-n8-B0k3v4-B1.3.4.14.15.16k4v3-B2k5v3-B5.7.8.9.10.11.13k5v4-B12k5v5-B17k3v3-seed3"
    three = layer_profiles.resolve(TurboQuantConfig.from_spec("k4v3-s4-ss-ck-uv-sv-tkv-qsd-dp-n8-Bt"), GEMMA3_270M)
    assert three.name == "k4v3-s4-ss-ck-uv-sv-tkv-qsd-dp-n8-B0.1.3.4k3v3-B2.17k3v2-B7.10.12k5v4-B8.9.11.13.14k5v3"
    assert layer_profiles.find_profile(SMOLLM2_135M).model == "smollm2"  # and not Gemma-3's


def test_smollm2_presets_take_the_bits_its_scans_chose():
    """4bit+ on SmolLM2-135M: the setting measured in README "Bits per layer shipped per model"; 3.5bit+: the copy
    scan's allocation with layer 19's keys held at 4 bits (README "Needle margins and a needle-driven layer scan")."""
    four = layer_profiles.resolve(TurboQuantConfig.preset("4bit+"), SMOLLM2_135M)
    assert four.name == "k4v4-s4-ss-ck-sv-tkv-qsd-n8-B0.11.13.16.25.27.29k3v3-B2k4v5-B3.5.7.8.9.10.17.24k5v4-B6.12.22.26k4v3-B18.20.23k6v5"
    three = layer_profiles.resolve(TurboQuantConfig.preset("3.5bit+"), SMOLLM2_135M)
    assert three.name == "k4v3-s4-ss-ck-uv-sv-tkv-qsd-dp-n8-B0.1.2.6.11.12.13.15.16.22.25.27.28.29k3v3-B7.8k5v3-B17.23k5v4-B18k6v5-B20k6v4-B24k4v4"
    assert three.layer_bits(19, 30) == (4, 3)  # the layer an 8k needle lookup runs through keeps 4-bit keys


def test_a_profile_can_keep_uniform_bits_on_purpose_silently(tmp_path, monkeypatch):
    """A base listed as "" keeps uniform bits without a warning (the profile's source says why)."""
    model = tiny_model("llama")
    _ship_profile_for(model, tmp_path / "llama", "", monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layer_profiles.resolve(TurboQuantConfig.from_spec("k4v4-Bt"), model.config).name == "k4v4"


@pytest.mark.parametrize("profile", layer_profiles.shipped_profiles(), ids=lambda p: p.model)
def test_shipped_profiles_are_what_their_kl_scans_allocate(profile):
    """Each shipped allocation is what `layer_bits allocate` makes with the arguments its profile records ("recipes"),
    or, where it records none (the first profiles), `--metric kl --scan-bits 4 --codes trellis` on the model's plain-text
    scan (docs/data/layer_scan_4bit_{keys,values}_kl_<model>.json) with --min-bits 3 at k4v4 and 2 at k4v3."""
    from pathlib import Path

    from tqpatch.eval.layer_bits import allocate_from_recipe

    repo = Path(__file__).resolve().parents[1]
    short = {"gemma3-270m": "gemma3", "smollm2": "smollm2"}[profile.model]
    model_config = {"gemma3_text": GEMMA3_270M, "llama": SMOLLM2_135M}[profile.match["model_type"]]
    for base, options in ((b, o) for b, o in profile.settings.items() if o):  # "": uniform bits on purpose
        uniform = TurboQuantConfig.from_spec(base)
        kb, vb = int(uniform.key_bits), int(uniform.value_bits)
        recipe = {"keys": f"docs/data/layer_scan_4bit_keys_kl_{short}.json", "values": f"docs/data/layer_scan_4bit_values_kl_{short}.json",
                  "metric": "kl", "scan_bits": 4, "codes": "trellis", "min_bits": 3 if vb == 4 else 2, "max_bits": 6, "min_key_bits": None,
                  "floor": 0.0, "move": "kv", "hold_keys": [], "window": 2048} | profile.recipes.get(base, {})
        result = allocate_from_recipe(recipe, model_config, kb, vb, root=repo)
        assert TurboQuantConfig(key_bits=kb, value_bits=vb, layer_bits_overrides=result.overrides(kb, vb)).name == f"k{kb}v{vb}-{options}"


@pytest.mark.parametrize("profile", layer_profiles.shipped_profiles(), ids=lambda p: p.model)
def test_shipped_profiles_keep_the_uniform_bits_on_their_models_layers(profile):
    """Each shipped allocation names only its model's layers and spends no more bits per cached coordinate, weighted by
    the tokens each layer holds at the end of a 2,048-token window, than the uniform setting it replaces."""
    model_config = {"gemma3_text": GEMMA3_270M, "llama": SMOLLM2_135M}[profile.match["model_type"]]
    assert profile.matches(model_config) and layer_profiles.fingerprint(model_config) == profile.match
    tokens = tokens_per_layer(model_config, 2048)
    for base, options in ((b, o) for b, o in profile.settings.items() if o):  # "": uniform bits on purpose
        uniform, config = TurboQuantConfig.from_spec(base), TurboQuantConfig.from_spec(f"{base}-{options}")
        assert config.layer_bits_overrides and max(layer for layer, _, _ in config.layer_bits_overrides) < len(tokens)
        spent = sum(n * sum(config.layer_bits(i, len(tokens))) for i, n in enumerate(tokens))
        assert spent <= sum(n * (uniform.key_bits + uniform.value_bits) for n in tokens), base


def _ship_profile_for(model, folder, options, monkeypatch):
    """A profile giving `model` these bits per layer at k4v4, in a folder patch() then reads as the shipped one."""
    folder.mkdir()
    layer_profiles.write_profile(folder / "tiny.json", "tiny", model.config, "k4v4", options, source="test")
    monkeypatch.setattr(layer_profiles, "profiles_folder", lambda: folder)


def test_patch_stores_the_profiles_bits_and_evaluators_report_them(tmp_path, monkeypatch):
    model = tiny_model("qwen3")
    _ship_profile_for(model, tmp_path / "qwen3", "B0k5v4-B1k3v3", monkeypatch)
    tqpatch.patch(model, "k4v4-Bt")
    try:
        assert tqpatch.patched_config(model).name == "k4v4-B0k5v4-B1k3v3"
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(prompt(length=64), past_key_values=cache)
        per_layer = [layer.bytes for layer in tqpatch.cache_stats(cache).layers]
        assert per_layer[0] > per_layer[2] > per_layer[1]  # 9 bits per pair of coordinates, then 8, then 6
    finally:
        tqpatch.unpatch(model)
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16)).eval()  # byte tokens
    _ship_profile_for(tiny, tmp_path / "llama", "B1k5v3", monkeypatch)
    result = decode_perplexity(tiny, ByteTokenizer(), TEXT, [TurboQuantConfig.from_spec("k4v4-Bt")], window=64, chunk=32, max_tokens=128, progress=False)
    assert [row.setting for row in result.rows][1:] == ["k4v4-B1k5v3"]


def test_a_model_without_a_profile_keeps_uniform_bits_and_says_so():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match=r"k4v4-tkv-Bt: no bits-per-layer profile matches this model \(llama, 3 layers\); storing uniform bits. Profiles: gemma3-270m"):
        tqpatch.patch(model, "k4v4-tkv-Bt")
    assert tqpatch.patched_config(model).name == "k4v4-tkv"
    tqpatch.unpatch(model)
    with pytest.warns(UserWarning, match=r"the gemma3-270m profile has no bits per layer for k2v2 \(it has k4v4-tkv, k4v3-tkv\)"):
        assert layer_profiles.resolve(TurboQuantConfig.from_spec("k2v2-Bt"), GEMMA3_270M).name == "k2v2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layer_profiles.resolve(TurboQuantConfig.from_spec("k2v2"), GEMMA3_270M).name == "k2v2"  # no -Bt: untouched


def test_write_profile_adds_settings_and_refuses_another_models_file(tmp_path):
    path = tmp_path / "smollm2.json"
    layer_profiles.write_profile(path, "smollm2", SMOLLM2_135M, "k4v4-tkv", "B0k3v3-B2k5v4")
    data = layer_profiles.write_profile(path, "smollm2", SMOLLM2_135M, "k4v3-tkv", "B1k5v3", source="scan", recipe={"min_bits": 3, "hold_keys": [19]})
    assert data["settings"] == {"k4v4-tkv": "B0k3v3-B2k5v4", "k4v3-tkv": "B1k5v3"} and json.loads(path.read_text()) == data
    profile = layer_profiles.shipped_profiles(tmp_path)[0]
    assert profile.matches(SMOLLM2_135M) and profile.recipes == {"k4v3-tkv": {"min_bits": 3, "hold_keys": [19]}}
    with pytest.raises(ValueError, match="is the profile of smollm2"):
        layer_profiles.write_profile(path, "gemma3-270m", GEMMA3_270M, "k4v4-tkv", "B0k3v3")
    with pytest.raises(ValueError, match="unknown option"):
        layer_profiles.write_profile(path, "smollm2", SMOLLM2_135M, "k4v4-tkv", "X0k3v3")

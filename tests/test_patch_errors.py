"""Clear errors for what tqpatch cannot do."""

import pytest
import torch
import transformers as tf
from transformers import DynamicCache, StaticCache

import tqpatch
from tqpatch.config import PRESETS, TurboQuantConfig
from tiny_models import prompt, tiny_model


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid presets: k8v8, k4v4, k3v2, k2v2, 3.5bit, 2.5bit, k4v4\\+, 4bit\\+, k3v2\\+, k2v2\\+, 3.5bit\\+, 2.5bit\\+"):
        TurboQuantConfig.preset("k5v5")
    with pytest.raises(ValueError, match="use a preset \\(k8v8, .*\\) or a spec"):
        tqpatch.patch(tiny_model("llama"), "fast")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(key_bits=0), r"key_bits must be a number of bits in \[1, 8\]"),
        (dict(value_bits=9), r"value_bits must be a number of bits in \[1, 8\]"),
        (dict(key_bits="4"), "key_bits"),
        (dict(key_method="qjl"), r"key_method must be one of \('mse', 'prod'\)"),
        (dict(key_method="prod", key_bits=2.5), "integer key_bits"),
        (dict(residual_length=-1), "residual_length must be a non-negative integer"),
        (dict(protected_bits=0), "protected_bits must be None"),
        (dict(protected_layers=(-1,)), "protected_layers"),
        (dict(layer_bits_overrides=((0, 9, 4),)), r"key_bits of layer 0 must be a number of bits in \[1, 8\]"),
        (dict(layer_bits_overrides=((0, "5", 4), (1, 4, 4))), r"key_bits of layer 0 must be a number of bits"),
        (dict(layer_bits_overrides=((0, 4),)), r"\(layer, key_bits, value_bits\) triples"),
        (dict(layer_bits_overrides=((2, 5, 4), (2, 3, 4))), r"lists layer\(s\) \[2\] more than once"),
        (dict(layer_bits_overrides=((2, 5, 4),), protected_layers=(2,)), r"both protected and given other bits"),
        (dict(outlier_step=5), "outlier_step must be 1, 2, 3 or 4"),
        (dict(rotation_candidates=0), "rotation_candidates must be an integer in 1..64"),
        (dict(key_bits=7.5, outlier_step=2), "needs more than 8 bits"),
        (dict(key_method="prod", unbias_keys=True), "unbias_keys is for key_method='mse'"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TurboQuantConfig(**kwargs)


def test_config_is_frozen_and_presets_override():
    config = TurboQuantConfig.preset("k3v2", residual_length=128)
    assert (config.key_bits, config.value_bits, config.residual_length) == (3, 2, 128)
    with pytest.raises(Exception):
        config.key_bits = 4


def test_two_and_three_bit_value_presets_decode_values_unbiased():
    """k3v2+, k2v2+ and 3.5bit+ (4-bit keys, 3-bit values) add unbiased values (README, Unbiased decoding and Needle in
    a haystack: better on SmolLM2 and Gemma-3); the other quality presets do not."""
    for name in ("k3v2+", "k2v2+", "3.5bit+"):
        config = TurboQuantConfig.preset(name)
        assert config.unbias_values and not config.unbias_keys and "-qsd-dp-n8" in config.name and "-s4-ss-ck-uv-" in config.name
    assert not any(TurboQuantConfig.preset(name).unbias_values for name in ("k4v4+", "2.5bit+"))
    assert TurboQuantConfig.from_spec("k2v2+") == TurboQuantConfig.from_spec("k2v2-s4-ss-ck-uv-sv-tkv-qsd-dp-n8")
    assert [name for name in ("k4v4+", "k3v2+", "k2v2+", "3.5bit+", "2.5bit+") if TurboQuantConfig.preset(name).score_variance] == ["k4v4+", "k3v2+", "k2v2+", "3.5bit+", "2.5bit+"]
    assert TurboQuantConfig.preset("3.5bit+").name == "k4v3-s4-ss-ck-uv-sv-tkv-qsd-dp-n8-Bt"


def test_4bit_plus_and_3_5bit_plus_take_the_models_bits_per_layer():
    """4bit+ (k4v4+ with trellis codes) and 3.5bit+ take the bits per layer shipped for the model (-Bt; README, Bits per
    layer shipped per model); the fast k4v4+ and the presets below 3.5 bits keep uniform bits."""
    assert TurboQuantConfig.preset("4bit+").name == "k4v4-s4-ss-ck-sv-tkv-qsd-n8-Bt"
    assert [name for name in PRESETS if PRESETS[name].tuned_layer_bits] == ["4bit+", "3.5bit+"]


def test_presets_below_four_bits_store_trellis_codes_and_k4v4_plus_stays_on_the_warp_kernel():
    """k3v2+, k2v2+, 3.5bit+ and 2.5bit+ store trellis codes in keys and values (-tkv: 27-61% less perplexity loss
    on both models, README, Trellis codes); k4v4+ keeps the Lloyd-Max codes that the warp kernel reads."""
    for name in ("4bit+", "k3v2+", "k2v2+", "3.5bit+", "2.5bit+"):
        config = TurboQuantConfig.preset(name)
        assert config.trellis_keys and config.trellis_values and "-tkv-" in config.name
    plain = TurboQuantConfig.preset("k4v4+")
    assert not plain.trellis_keys and not plain.trellis_values and plain.name == "k4v4-s4-ss-ck-sv-qsd-n8"
    assert not any(TurboQuantConfig.preset(name).trellis_keys for name in ("k4v4", "k3v2", "k2v2", "3.5bit", "2.5bit", "k8v8"))


def test_quality_presets_shape_sliding_layers_and_shrink_towards_the_diagonal():
    """Every `+` preset shapes sliding-window layers too (-qsd); k3v2+, k2v2+ and 3.5bit+ fit with the diagonal prior
    (-dp) (README, Shaping Gemma-3's sliding layers)."""
    for name in ("k4v4+", "4bit+", "k3v2+", "k2v2+", "3.5bit+", "2.5bit+"):
        config = TurboQuantConfig.preset(name)
        assert config.shape_keys and config.shape_sliding_keys
        assert config.shape_prior == ("isotropic" if name in ("k4v4+", "4bit+", "2.5bit+") else "diagonal")
        assert TurboQuantConfig.from_spec(config.name) == config


def test_patching_twice_is_refused():
    model = tiny_model("llama")
    tqpatch.patch(model)
    with pytest.raises(tqpatch.TQPatchError, match="already patched"):
        tqpatch.patch(model)
    tqpatch.unpatch(model)
    with pytest.raises(tqpatch.TQPatchError, match="not patched"):
        tqpatch.unpatch(model)


def test_model_without_attention():
    with pytest.raises(tqpatch.TQPatchError, match="no self-attention modules.*supported"):
        tqpatch.patch(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_ssm_model_is_refused():
    mamba = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, state_size=4))
    with pytest.raises(tqpatch.TQPatchError, match="supported"):
        tqpatch.patch(mamba)


def test_mla_model_is_refused():
    config = tf.DeepseekV2Config(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                                 n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=1, moe_intermediate_size=8)
    with pytest.raises(tqpatch.TQPatchError, match="multi-head latent attention"):
        tqpatch.patch(tf.DeepseekV2ForCausalLM(config))


def test_static_cache_is_refused_with_what_works():
    model = tiny_model("llama")
    tqpatch.patch(model)
    cache = StaticCache(config=model.config, max_cache_len=64)
    with pytest.raises(tqpatch.TQPatchError, match="cannot wrap StaticCache.*supported: DynamicCache"):
        with torch.no_grad():
            model(prompt(), past_key_values=cache)


def test_offloading_cache_is_refused():
    model = tiny_model("llama")
    tqpatch.patch(model)
    with pytest.raises(tqpatch.TQPatchError, match="offloading"):
        with torch.no_grad():
            model(prompt(), past_key_values=DynamicCache(config=model.config, offloading=True))


def test_head_dim_without_codebook_is_built_with_a_warning():
    from tqpatch.codebook import get_codebook

    get_codebook.cache_clear()
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=128, hidden_size=40, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1)).eval()  # head_dim 20: not shipped
    tqpatch.patch(model, "k3v2")
    with pytest.warns(UserWarning, match="tqpatch build-codebooks --dims 20 --bits 3"):
        with torch.no_grad():
            model(prompt(), past_key_values=DynamicCache(config=model.config))


def test_head_dim_with_no_possible_codebook():
    with pytest.raises(ValueError, match="head_dim must be an integer >= 3"):
        tqpatch.TurboQuantMSE(2, 4)


def test_use_cache_false_is_untouched():
    model = tiny_model("llama")
    with torch.no_grad():
        reference = model(prompt(), use_cache=False).logits
        tqpatch.patch(model, "k2v2")
        assert torch.equal(model(prompt(), use_cache=False).logits, reference)


@pytest.mark.parametrize("name", ["center_keys", "center_values", "prefill_exact", "unbias_keys", "unbias_values"])
def test_boolean_fields_are_checked(name):
    with pytest.raises(ValueError, match=f"{name} must be True or False"):
        TurboQuantConfig(**{name: 1})


@pytest.mark.parametrize("spec", ["k4v4", "k2v2-rc8", "k2.5v2-o2-s4-r128", "k3v2-prod-ckv-p2.2b8-q", "k4v4-L0.29-seed3", "k3.5v3.5",
                                  "k4v4-L18b6", "k4v4-p0.0b6-L1.18", "k2v2-s4-ck-uv-qs-n8", "k2v2-ukv", "k3v2-uk-seed1",
                                  "k4v4-s4-B0.5k5v4-B9k3.5v4", "k4v4-L1-B7k3v3"])
def test_setting_specs_round_trip_through_name(spec):
    config = TurboQuantConfig.from_spec(spec)
    assert TurboQuantConfig.from_spec(config.name) == config


def test_spec_fields():
    config = TurboQuantConfig.from_spec("k2.5v2-o2-s4-r128-ck-p1.2")
    assert (config.key_bits, config.value_bits, config.outlier_step, config.sink_tokens, config.residual_length) == (2.5, 2, 2, 4, 128)
    assert config.center_keys and not config.center_values and (config.protect_first, config.protect_last, config.protected_bits) == (1, 2, None)
    config = TurboQuantConfig.from_spec("k2v2-uv")
    assert config.unbias_values and not config.unbias_keys
    config = TurboQuantConfig.from_spec("k4v4-L1.18b6")  # protected layers at 6 bits, the others at 4
    assert (config.protected_layers, config.protected_bits, config.layer_bits(18, 30), config.layer_bits(17, 30)) == ((1, 18), 6, (6, 6), (4, 4))
    config = TurboQuantConfig.from_spec("k4v4-B9k3v4-B0.5k5v4.5")  # these layers at other bits, in any order
    assert config.layer_bits_overrides == ((0, 5, 4.5), (5, 5, 4.5), (9, 3, 4))
    assert [config.layer_bits(i, 30) for i in (0, 5, 9, 10)] == [(5, 4.5), (5, 4.5), (3, 4), (4, 4)]
    assert config.name == "k4v4-B0.5k5v4.5-B9k3v4"


def test_layers_a_setting_names_must_exist():
    with pytest.raises(tqpatch.TQPatchError, match=r"names layer\(s\) \[7\] but this model's attention layers are 0..2"):
        tqpatch.patch(tiny_model("llama"), "k4v4-B7k5v4")
    with pytest.raises(tqpatch.TQPatchError, match=r"names layer\(s\) \[9\]"):
        tqpatch.patch(tiny_model("llama"), "k4v4-L2.9")
    with pytest.raises(tqpatch.TQPatchError, match=r"layer\(s\) \[2\] are protected \(protect_first / protect_last\)"):
        tqpatch.patch(tiny_model("llama"), "k4v4-p0.1-B2k5v4")


@pytest.mark.parametrize("spec,match", [("k4v4-zz", "unknown option 'zz'"), ("fast", "unknown setting 'fast'"), ("k9v4", r"key_bits must be")])
def test_bad_specs_name_the_valid_forms(spec, match):
    with pytest.raises(ValueError, match=match):
        TurboQuantConfig.from_spec(spec)

"""`tqpatch generate` on a tiny random Llama saved to disk, and on the real SmolLM2 (slow)."""

import json

import pytest
import torch
from click.testing import CliRunner

from tqpatch.cli.main import main


def save_tiny_model(folder, seed: int = 0, **overrides):
    """A random-weight 2-layer Llama (head_dim 16, GQA 4/2) with a byte-level BPE tokenizer, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"], vocab["</s>"] = len(vocab), len(vocab) + 1
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    config = dict(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(result):
    """A non-zero exit through click (no Python exception escaped) with exactly one 'Error:' line and no traceback."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert sum(line.startswith("Error:") for line in result.output.splitlines()) == 1, result.output


def test_generate_json_on_tiny_model(tiny_model_dir):
    result = invoke("generate", "--model", tiny_model_dir, "--settings", "k8v8,k2v2", "--max-new-tokens", 40, "--prompt", "hello world, " * 6, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {r["setting"]: r for r in data["rows"]}
    assert list(rows) == ["fp32", "k8v8", "k2v2"]
    for row in rows.values():
        assert set(row) >= {"text", "new_tokens", "identical", "first_divergence", "cache_bytes", "compression_ratio", "bits_per_element", "tokens_per_second"}
        assert row["new_tokens"] == 40
    fp, k8, k2 = rows["fp32"], rows["k8v8"], rows["k2v2"]
    assert fp["identical"] and fp["compression_ratio"] == 1.0 and fp["compressed_tokens"] == 0
    assert k8["identical"] and k8["first_divergence"] is None  # 8 bits: same greedy tokens
    # Compression happened: codes, not floats, and 2 bits stores less than 8.
    assert k2["compressed_tokens"] > 0 and k2["cache_bytes"] < k8["cache_bytes"] < fp["cache_bytes"]
    assert 2 < k2["bits_per_element"] < 4 and k2["compression_ratio"] > 8


def test_generate_text_output_shows_every_setting(tiny_model_dir):
    result = invoke("generate", "--model", tiny_model_dir, "--settings", "k4v4", "--max-new-tokens", 8, "--residual-length", 4, "--key-method", "prod")
    assert result.exit_code == 0, result.output
    assert "[fp32] baseline" in result.output and "[k4v4-prod-r4]" in result.output and "tokens/s" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--settings", "k5v1x"], "unknown setting 'k5v1x': use a preset (k8v8, k4v4"),
        (["--settings", "2.5bit", "--key-method", "prod"], "needs integer key_bits"),
        (["--model", "/nonexistent/model-folder"], "not found: looked for local folder"),
        (["--model", "missing.gguf"], "does not exist"),
        (["--dtype", "float64"], "'float64' is not one of"),
    ],
)
def test_generate_bad_options_are_one_line_errors(args, message):
    result = invoke("generate", *args)
    assert result.exit_code != 0
    assert message in result.output
    assert_clean_error(result)


def test_generate_help_shows_every_option_with_default():
    result = invoke("generate", "--help")
    assert result.exit_code == 0
    for option, default in [
        ("--prompt", "Explain what a transformer architecture is in 2"),
        ("--settings", "k4v4,k3v2,k2v2"),
        ("--max-new-tokens", "64"),
        ("--residual-length", "0"),
        ("--key-method", "mse"),
        ("--device", "cpu"),
        ("--temperature", "0.0"),
    ]:
        assert option in result.output
        assert default in " ".join(result.output.split()), (option, default)


@pytest.mark.slow
def test_generate_on_smollm2():
    result = invoke("generate", "--settings", "k8v8,k2v2", "--max-new-tokens", 24, "--json")
    assert result.exit_code == 0, result.output
    rows = {r["setting"]: r for r in json.loads(result.stdout)["rows"]}
    assert rows["fp32"]["text"].startswith("A transformer architecture is")
    assert rows["k8v8"]["first_divergence"] is None or rows["k8v8"]["first_divergence"] > 8
    assert rows["k2v2"]["compression_ratio"] > 10 and rows["k2v2"]["compressed_tokens"] > 0

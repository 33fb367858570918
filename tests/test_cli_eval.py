"""`tqpatch eval ppl` on a tiny random Llama saved to disk: JSON fields, files, clean errors, --help defaults."""

import json

import pytest
from click.testing import CliRunner
from test_cli_generate import assert_clean_error, save_tiny_model

from tqpatch.cli.main import main

ROW_FIELDS = {
    "setting", "key_bits", "value_bits", "key_method", "residual_length", "ppl", "delta_ppl", "nll_sum", "predicted_tokens",
    "compressed_tokens_read", "compressed_key_fraction", "bits_per_element", "compression_ratio", "cache_bytes", "seconds", "kl",
}
RESULT_FIELDS = {"model", "text_source", "window", "chunk", "tokens", "windows", "bos_per_window", "dtype", "device", "processes", "copy", "rows", "versions"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-eval"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\r\n" * 40, encoding="utf-8")
    return path


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def test_ppl_copy_windows(tiny_model_dir, text_file):
    # 64 text tokens, each window 32 of them read twice: 2 windows of 64
    result = invoke("eval", "ppl", "--model", tiny_model_dir, "--text-file", text_file, "--settings", "k4v4", "--window", 64,
                    "--chunk", 16, "--max-tokens", 64, "--copy", "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["tokens"], data["windows"], data["copy"]) == (64, 2, True)
    assert [r["setting"] for r in data["rows"]] == ["fp", "k4v4"] and data["rows"][1]["compressed_tokens_read"] > 0


def test_ppl_json_grid_and_out_file(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "ppl.json"
    result = invoke(
        "eval", "ppl", "--model", tiny_model_dir, "--text-file", text_file, "--settings", "k4v4,k2v2", "--key-method", "mse,prod",
        "--residual-length", "0,16", "--window", 64, "--chunk", 16, "--max-tokens", 128, "--json", "--out", out, "--no-progress",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == RESULT_FIELDS and json.loads(out.read_text()) == data
    assert (data["window"], data["chunk"], data["tokens"], data["windows"], data["copy"]) == (64, 16, 128, 2, False)
    names = [r["setting"] for r in data["rows"]]
    assert names == ["fp", "k4v4", "k2v2", "k4v4-prod", "k2v2-prod", "k4v4-r16", "k2v2-r16", "k4v4-prod-r16", "k2v2-prod-r16"]
    for row in data["rows"]:
        assert set(row) == ROW_FIELDS
    rows = {r["setting"]: r for r in data["rows"]}
    # Before chunks 0..3 of a 64-token window: 0, 16, 32, 48 tokens cached; with r16 the last 16 stay exact.
    assert rows["k2v2"]["compressed_tokens_read"] == 2 * 96 and rows["k2v2-r16"]["compressed_tokens_read"] == 2 * 48
    assert rows["fp"]["compressed_tokens_read"] == 0 and rows["k2v2"]["ppl"] != rows["fp"]["ppl"]


def test_ppl_kl_reports_the_divergence_from_the_baseline(tiny_model_dir, text_file):
    args = ("eval", "ppl", "--model", tiny_model_dir, "--text-file", text_file, "--settings", "k4v4,k2v2", "--window", 64, "--chunk", 16,
            "--max-tokens", 128, "--no-progress")
    result = invoke(*args, "--kl", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["setting"]: row for row in json.loads(result.stdout)["rows"]}
    assert rows["fp"]["kl"] == 0.0 and 0 < rows["k4v4"]["kl"] < rows["k2v2"]["kl"]
    assert all(row["kl"] is None for row in json.loads(invoke(*args, "--json").stdout)["rows"])
    assert "KL (nats)" in invoke(*args, "--kl").stdout


def test_ppl_table(tiny_model_dir, text_file):
    result = invoke("eval", "ppl", "--model", tiny_model_dir, "--text-file", text_file, "--settings", "k3v2", "--window", 32, "--chunk", 8, "--max-tokens", 64)
    assert result.exit_code == 0, result.output
    assert "2 windows of 32, chunks of 8" in result.output
    assert "compressed read" in result.output and "k3v2" in result.output


def test_ppl_skip_chars_evaluates_later_text(tiny_model_dir, tmp_path):
    """--skip-chars starts the text further in (held-out text): another text gives another PPL, and the source says where."""
    path = tmp_path / "two_texts.txt"
    first, second = "The quick brown fox jumps over the lazy dog. " * 30, "Colorless green ideas sleep furiously, said nobody. " * 30
    path.write_text(first + second, encoding="utf-8")
    args = ("eval", "ppl", "--model", tiny_model_dir, "--settings", "k4v4", "--window", 32, "--chunk", 8, "--max-tokens", 64, "--json", "--no-progress")
    whole = json.loads(invoke(*args, "--text-file", path).stdout)
    later = invoke(*args, "--text-file", path, "--skip-chars", len(first))
    assert later.exit_code == 0, later.output
    later = json.loads(later.stdout)
    alone = tmp_path / "second.txt"
    alone.write_text(second, encoding="utf-8")
    assert later["rows"][0]["ppl"] == json.loads(invoke(*args, "--text-file", alone).stdout)["rows"][0]["ppl"]
    assert later["rows"][0]["ppl"] != whole["rows"][0]["ppl"]
    assert later["text_source"].endswith(f"from character {len(first)}")
    too_far = invoke(*args, "--text-file", path, "--skip-chars", 10**7)
    assert_clean_error(too_far)
    assert "cannot skip 10,000,000" in too_far.output


def test_ppl_compare_hf_quantized(tiny_model_dir, text_file):
    pytest.importorskip("optimum.quanto")
    result = invoke(
        "eval", "ppl", "--model", tiny_model_dir, "--text-file", text_file, "--settings", "k2v2", "--compare", "hf-quantized",
        "--hf-bits", "2", "--hf-key-axis", "token,channel", "--residual-length", 16, "--window", 64, "--chunk", 16, "--max-tokens", 64, "--json", "--no-progress",
    )
    assert result.exit_code == 0, result.output
    names = [r["setting"] for r in json.loads(result.stdout)["rows"]]
    assert names == ["fp", "k2v2-r16", "hf-quanto-int2-ktoken-r16", "hf-quanto-int2-kchannel-r16"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--settings", "k4v4,k9v9"], "key_bits must be a number of bits in [1, 8]"),
        (["--window", 16, "--chunk", 32], "window (16) must be at least the chunk size (32)"),
        (["--text-file", "/no/such/file.txt"], "text file /no/such/file.txt does not exist"),
        (["--key-method", "mse,qjl"], "unknown value 'qjl'; valid: mse, prod"),
        (["--residual-length", "a,b"], "expected comma-separated integers"),
        (["--settings", "2.5bit", "--key-method", "prod"], "needs integer key_bits"),
        (["--compare", "hf-quantized", "--hf-bits", "3"], "supports 2 or 4 bits"),
        (["--model", "/no/such/model"], "not found"),
    ],
)
def test_ppl_bad_options_are_one_line_errors(args, message):
    result = invoke("eval", "ppl", *args)
    assert_clean_error(result)
    assert message in result.output


def test_dataset_without_hub_is_a_clear_error(tiny_model_dir):
    result = invoke("eval", "ppl", "--model", tiny_model_dir, "--dataset", "wikitext", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert_clean_error(result)
    assert "could not load the 'wikitext' dataset" in result.output and "--text-file" in result.output


@pytest.mark.parametrize("command", ["ppl", "needle"])
def test_eval_help_shows_every_option_with_default(command):
    result = invoke("eval", command, "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    expected = {
        "ppl": ["--window INTEGER RANGE Tokens per window W (a fresh cache per window). [default: 2048;", "[default: 32;", "--max-tokens", "[default: 8192;",
                "--residual-length", "--compare", "--text-file", "--dataset", "--out", "--json", "--hf-bits", "[default: 4,2]"],
        "needle": ["--lengths", "[default: 512,1024,2048,4096]", "--depths", "[default: 0,25,50,75,100]", "[default: k4v4,k3v2,2.5bit]", "--text-file", "--out"],
    }[command]
    for piece in expected + ["--model", "--device", "[default: cpu]", "--dtype", "--device-map", "--settings"]:
        assert piece in text, piece


def test_top_level_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0 and "generate" in result.output and "eval" in result.output
    result = invoke("eval", "--help")
    assert "ppl" in result.output and "needle" in result.output

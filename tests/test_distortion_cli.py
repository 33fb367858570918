import json

from click.testing import CliRunner

from tqpatch.cli.main import main


def test_eval_distortion_writes_table_json_and_png(tmp_path):
    result = CliRunner().invoke(main, ["eval", "distortion", "-d", "64", "-n", "2000", "--bits", "1,2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "prod" in result.output and "MSE upper" in result.output
    data = json.loads((tmp_path / "distortion_d64.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"mse", "prod"}
    assert all(r["mse"] < r["mse_upper_bound"] for r in data["rows"] if r["method"] == "mse")
    png = (tmp_path / "distortion_d64.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_eval_distortion_with_trellis_codes_adds_their_rows_below_lloyd_max(tmp_path):
    result = CliRunner().invoke(main, ["eval", "distortion", "-d", "64", "-n", "1000", "--bits", "2,8", "--trellis", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = {(r["method"], r["bits"]): r["mse"] for r in json.loads((tmp_path / "distortion_d64.json").read_text())["rows"]}
    assert set(rows) == {("mse", 2), ("prod", 2), ("trellis", 2), ("mse", 8), ("prod", 8)}  # no trellis codes at 8 bits
    assert rows[("trellis", 2)] < rows[("mse", 2)] / 1.3


def test_bad_bits_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(main, ["eval", "distortion", "--bits", "9", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "1..8" in result.output and "Traceback" not in result.output


def test_build_codebooks_to_folder(tmp_path):
    result = CliRunner().invoke(main, ["build-codebooks", "--dims", "24", "--bits", "2,3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d24_b2.safetensors", "d24_b3.safetensors"]

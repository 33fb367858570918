"""Needle in a haystack: prompt construction, grid checks, the CLI's JSON and heat maps, and SmolLM2 recall."""

import json

import pytest
from click.testing import CliRunner
from test_cli_generate import assert_clean_error, save_tiny_model
from transformers import AutoTokenizer

from tqpatch.cli.main import main
from tqpatch.eval.needle import ANSWER_PREFIX, NEEDLE, QUESTION, answer_margin, build_prompt, check_grid, number_span

HAYSTACK = " ".join(f"Sentence number {i} talks about the weather in town." for i in range(1000))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-needle"))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("depth", [0, 25, 50, 100])
def test_needle_sits_at_its_depth_in_a_prompt_of_the_asked_length(tokenizer, depth):
    needle = NEEDLE.format(number=1234567)
    ids = build_prompt(tokenizer, tokenizer(HAYSTACK).input_ids, 3000, depth, needle)
    text = tokenizer.decode(ids)
    assert abs(len(ids) - 3000) <= 4
    assert text.count(needle) == 1 and text.rstrip().endswith(QUESTION)
    position = text.index(needle) / (text.index(QUESTION) - len(needle))  # fraction of the haystack before the needle
    assert abs(position - depth / 100) < 0.03, position  # a sentence is ~2% of this haystack
    before = text[: text.index(needle)].rstrip()
    assert depth == 0 or before.endswith(".")  # inserted between sentences


def test_an_answer_prefix_ends_the_prompt_which_keeps_its_length_and_needle(tokenizer):
    """`answer_prefix` is the start of the answer: its tokens end the prompt, after the question, and the prompt is
    still about the asked length with the needle once at the same place of the haystack."""
    needle = NEEDLE.format(number=1234567)
    plain = build_prompt(tokenizer, tokenizer(HAYSTACK).input_ids, 3000, 50, needle)
    primed = build_prompt(tokenizer, tokenizer(HAYSTACK).input_ids, 3000, 50, needle, ANSWER_PREFIX)
    prefix = tokenizer(ANSWER_PREFIX, add_special_tokens=False).input_ids
    assert primed[-len(prefix):] == prefix and abs(len(primed) - 3000) <= 4
    text = tokenizer.decode(primed[: -len(prefix)])
    assert text.count(needle) == 1 and text.rstrip().endswith(QUESTION)
    assert text.index(needle) <= tokenizer.decode(plain).index(needle)  # the haystack is shorter by the prefix, so its middle comes no later


@pytest.mark.parametrize(
    "lengths, depths, message",
    [([512], [-5], "depth must be a percentage in 0..100, got -5"), ([512], [101], "got 101"), ([32], [0], ">= 64 tokens"), ([9000], [0], "exceeds the model's limit of 8192")],
)
def test_grid_errors(lengths, depths, message):
    with pytest.raises(ValueError, match=message):
        check_grid(lengths, depths, 8192)


def test_needle_cli_writes_json_and_heat_maps(tiny_model_dir, tmp_path):
    text = tmp_path / "hay.txt"
    text.write_text(HAYSTACK)
    out = tmp_path / "needle"
    result = CliRunner().invoke(
        main,
        ["eval", "needle", "--model", str(tiny_model_dir), "--text-file", str(text), "--lengths", "128,256", "--depths", "0,50,100",
         "--settings", "k4v4,2.5bit", "--max-new-tokens", "4", "--answer-prefix", "The number is", "--out", str(out), "--json",
         "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["answer_prefix"] == "The number is"
    assert json.loads((out / "needle.json").read_text()) == data
    assert data["settings"] == ["fp", "k4v4", "k2.5v2.5"]
    assert data["lengths"] == [128, 256] and data["depths"] == [0.0, 50.0, 100.0]
    for name in data["settings"]:
        assert len(data["recall"][name]) == 3 and all(len(row) == 2 and set(row) <= {0, 1} for row in data["recall"][name])
        assert 0.0 <= data["mean_recall"][name] <= 1.0
    for name in ("k4v4", "k2.5v2.5"):
        png = (out / f"needle_{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
        assert data["paired"][name][0] <= sum(map(sum, data["recall"]["fp"]))  # lost: only where the baseline was right


def test_needle_trials_count_right_answers_per_cell_and_compare_with_the_baseline(tiny_model_dir, tokenizer):
    """Three needles per cell: recall counts right answers (0..3), every answer is kept, and `paired` counts the
    answers the baseline got right and a setting missed (and the reverse), checked against the kept answers.
    The baseline itself (same model, no compression) cannot lose to itself: a setting equal to it is exact."""
    from transformers import AutoModelForCausalLM

    from tqpatch.config import TurboQuantConfig
    from tqpatch.eval.needle import needle_in_haystack

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    settings = [TurboQuantConfig.from_spec("k4v4"), TurboQuantConfig.from_spec("k2v2")]
    result = needle_in_haystack(model, tokenizer, HAYSTACK, settings, [128], [0.0, 100.0], max_new_tokens=4, trials=3, progress=False)
    single = needle_in_haystack(model, tokenizer, HAYSTACK, settings[:1], [128], [0.0, 100.0], max_new_tokens=4, trials=1, progress=False)
    assert result.trials == 3 and all(len(result.answers[n][i][0]) == 3 for n in result.settings for i in range(2))
    assert [row[0][0] for row in single.answers["fp"]] == [row[0][0] for row in result.answers["fp"]]  # trial 0 = a one-trial run
    for name in ("k4v4", "k2v2"):
        assert all(0 <= v <= 3 for row in result.recall[name] for v in row)
        assert result.mean_recall[name] == sum(map(sum, result.recall[name])) / 6
        lost, gained = result.paired[name]
        assert lost - gained == sum(map(sum, result.recall["fp"])) - sum(map(sum, result.recall[name]))
    assert "needles per cell" in result.table() and "/3" in result.table()
    primed = needle_in_haystack(model, tokenizer, HAYSTACK, settings[:1], [128], [0.0, 100.0], max_new_tokens=4, progress=False,
                                answer_prefix=ANSWER_PREFIX)
    assert primed.answer_prefix == ANSWER_PREFIX and f"answers primed with {ANSWER_PREFIX!r}" in primed.table()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--depths", "0,150"], "depth must be a percentage in 0..100, got 150"),
        (["--depths", "abc"], "expected comma-separated numbers"),
        (["--lengths", "16"], ">= 64 tokens"),
        (["--settings", "fast"], "unknown setting 'fast'"),
        (["--text-file", "/no/such/haystack.txt"], "does not exist"),
    ],
)
def test_needle_bad_options_are_one_line_errors(args, message):
    result = CliRunner().invoke(main, ["eval", "needle", *args])
    assert_clean_error(result)
    assert message in result.output


@pytest.mark.slow
def test_smollm2_finds_a_short_needle(tmp_path):
    result = CliRunner().invoke(main, ["eval", "needle", "--lengths", "256", "--depths", "50", "--settings", "k4v4", "--out", str(tmp_path), "--json", "--no-progress"])
    if "not found beside the repo" in result.output:
        pytest.skip("../shared/data not present")
    assert result.exit_code == 0, result.output
    recall = json.loads(result.stdout)["recall"]
    assert recall == {"fp": [[1]], "k4v4": [[1]]}
    margins = json.loads(result.stdout)["margins"]  # both right: the baseline's confidence and k4v4's gap are > 0
    assert margins["fp"][0][0][0] > 0 and margins["k4v4"][0][0][0] > 0


def test_runs_combine_into_trials_per_cell():
    """Two one-needle runs of the same grid are one run of two needles per cell: right answers and lost / gained
    add up, answers keep both; runs of different grids are refused by name."""
    from tqpatch.eval.needle import NeedleResult, combine_runs

    def run(fp, k4, answer):
        return NeedleResult("m", "t", [1024], [0.0, 50.0], ["fp", "k4v4"], {"fp": fp, "k4v4": k4},
                            {"fp": [[[answer]], [[answer]]], "k4v4": [[[answer]], [[answer]]]}, [[1024], [1024]],
                            trials=1, paired={"k4v4": [int(fp[0][0] and not k4[0][0]), 0]})

    both = combine_runs([run([[1], [0]], [[0], [0]], "a"), run([[1], [1]], [[1], [1]], "b")])
    assert both.trials == 2 and both.recall == {"fp": [[2], [1]], "k4v4": [[1], [1]]}
    assert both.mean_recall == {"fp": 0.75, "k4v4": 0.5} and both.paired == {"k4v4": [1, 0]}
    assert both.answers["fp"][1][0] == ["a", "b"]
    assert both.margins == {}  # runs without margins (older JSON) combine without them
    with_margins = [run([[1], [0]], [[0], [0]], "a"), run([[1], [1]], [[1], [1]], "b")]
    with_margins[0].margins = {"fp": [[[2.0]], [[None]]], "k4v4": [[[-0.5]], [[None]]]}
    with_margins[1].margins = {"fp": [[[1.0]], [[3.0]]], "k4v4": [[[0.5]], [[1.5]]]}
    both = combine_runs(with_margins)
    assert both.margins["k4v4"] == [[[-0.5, 0.5]], [[None, 1.5]]]
    assert both.margin_summary("k4v4") == (3, 0.5, -0.5) and both.margin_summary("fp") == (3, 2.0, 1.0)
    assert "margin on the 3 answers fp got right: mean 0.50, smallest -0.50" in both.table()
    other = run([[1], [0]], [[0], [0]], "a")
    other.depths = [0.0, 75.0]
    with pytest.raises(ValueError, match="differ in depths"):
        combine_runs([both, other])
    primed = run([[1], [0]], [[0], [0]], "a")
    primed.answer_prefix = ANSWER_PREFIX
    with pytest.raises(ValueError, match="differ in answer_prefix"):
        combine_runs([run([[1], [0]], [[0], [0]], "a"), primed])


def test_number_span_counts_answer_tokens_up_to_the_numbers_last_digit(tokenizer):
    tokens = tokenizer("It is 1,234,567 I think.").input_ids  # byte-level: one token per character
    assert number_span(tokenizer, tokens, "1234567") == len("It is 1,234,567")
    assert number_span(tokenizer, tokens, "7654321") is None


def test_answer_margin_is_the_smallest_gap_until_the_answers_part():
    """Gaps l[r] − max other l over the reference tokens; at the first token the answers differ (gap ≤ 0) the
    reading stops, so what comes after (another path's logits) cannot count."""
    import torch

    def logits(*rows):
        return [torch.tensor(r) for r in rows]

    steps = logits([0.0, 3.0, 1.0], [2.0, 0.0, 0.5], [0.0, 0.0, 4.0])
    assert answer_margin(steps, [1, 0, 2], [1, 0, 2], 3) == pytest.approx(1.5)  # gaps 2.0, 1.5, 4.0
    assert answer_margin(steps, [1, 0, 2], [1, 0, 2], 1) == pytest.approx(2.0)  # the span ends before the smaller gap
    diverging = logits([0.0, 3.0, 1.0], [2.0, 0.0, 2.5], [9.0, 0.0, 0.0])
    assert answer_margin(diverging, [1, 2, 0], [1, 0, 2], 3) == pytest.approx(-0.5)  # step 2 is after the split: unread
    with pytest.raises(ValueError, match="span must be in 1..3"):
        answer_margin(steps, [1, 0, 2], [1, 0, 2], 4)


def test_margins_read_along_a_settings_own_path_are_the_baselines_answer_teacher_forced(tiny_model_dir, tokenizer):
    """What answer_margin reads from a setting's own greedy generation equals the gaps of the baseline's answer
    fed token by token through the patched model, up to the first token where the two answers differ; and the
    margin is > 0 exactly when the setting writes the baseline's answer."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache

    from tqpatch.config import TurboQuantConfig
    from tqpatch.eval.needle import _answer
    from tqpatch.patch import patch, unpatch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    seen = set()
    for start in range(0, 600, 100):
        ids = torch.tensor([tokenizer(HAYSTACK[start : start + 200]).input_ids])
        prefill = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :-1], use_cache=True, past_key_values=prefill)
        reference, reference_logits = _answer(model, tokenizer, ids, prefill, None, 6)
        assert answer_margin(reference_logits, reference, reference, len(reference)) >= 0  # the baseline's own confidence
        setting = TurboQuantConfig.from_spec("k2v2")
        tokens, logits = _answer(model, tokenizer, ids, prefill, setting, 6)
        cache, forced = copy.deepcopy(prefill), []
        patch(model, setting)
        try:
            with torch.no_grad():
                for token in [ids[0, -1].item()] + reference[:-1]:
                    forced.append(model(input_ids=torch.tensor([[token]]), use_cache=True, past_key_values=cache).logits[0, -1])
        finally:
            unpatch(model)
        split = next((t for t in range(len(reference)) if tokens[t] != reference[t]), len(reference) - 1)
        gaps = [forced[t][reference[t]].item() - torch.cat([forced[t][: reference[t]], forced[t][reference[t] + 1 :]]).max().item()
                for t in range(split + 1)]
        margin = answer_margin(logits, tokens, reference, len(reference))
        assert margin == pytest.approx(min(gaps), abs=1e-4)
        assert (margin > 0) == (tokens == reference)
        seen.add(tokens == reference)
    assert seen == {True, False}  # both branches ran: some answers kept, some lost


@pytest.mark.parametrize("prefix", ["", ANSWER_PREFIX])
def test_needle_margins_redraw_the_needles_a_grid_run_used(tiny_model_dir, tokenizer, monkeypatch, prefix):
    """A needle named by (seed, grid depths, depth, trial) carries the number the grid run put in that cell, and
    needle_margins answers it as the grid run did, for the baseline and the setting."""
    from transformers import AutoModelForCausalLM

    import tqpatch.eval.needle as needle_module
    from tqpatch.config import TurboQuantConfig
    from tqpatch.eval.needle_margins import NeedleRef, needle_margins

    seen = []
    build = needle_module.build_prompt
    monkeypatch.setattr(needle_module, "build_prompt", lambda tok, hay, length, depth, needle, answer_prefix="": seen.append(needle) or build(tok, hay, length, depth, needle, answer_prefix))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    setting = TurboQuantConfig.from_spec("k3v2")
    grid = needle_module.needle_in_haystack(model, tokenizer, HAYSTACK, [setting], [128], [0.0, 50.0, 100.0], max_new_tokens=4, seed=5, trials=2,
                                            progress=False, answer_prefix=prefix)
    cells = [(t, d) for t in range(2) for d in (0.0, 50.0, 100.0)]  # the grid's order: trial, then depth
    assert [NEEDLE.format(number=NeedleRef(5, (0.0, 50.0, 100.0), d, t).number()) for t, d in cells] == seen
    rows = needle_margins(model, tokenizer, HAYSTACK, [setting], [NeedleRef(5, (0.0, 50.0, 100.0), 50.0, 1)], 128, max_new_tokens=4, progress=False,
                         answer_prefix=prefix)
    assert rows[0]["baseline_answer"] == grid.answers["fp"][1][0][1]
    assert rows[0]["settings"]["k3v2"]["answer"] == grid.answers["k3v2"][1][0][1]


@pytest.mark.parametrize("text, message", [("1:0,50", "a needle is 'seed:grid depths:depth"), ("1:0,50:25", "depth 25 is not one of the grid's depths")])
def test_needle_refs_name_a_cell_of_their_grid(text, message):
    from tqpatch.eval.needle_margins import NeedleRef

    assert NeedleRef.parse("10:50,75:75:2") == NeedleRef(10, (50.0, 75.0), 75.0, 2)
    with pytest.raises(ValueError, match=message):
        NeedleRef.parse(text)


def test_margin_scan_figure_is_written(tmp_path):
    from tqpatch.eval.needle_margins import plot_margins

    path = plot_margins(["uniform", "allocation", "allocation, layer 19 keys at 4 bits"], [0.8, -1.1, 0.15], 0.04, "one needle", tmp_path / "m.png")
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_needle_set_figure_leaves_out_the_needles_the_baseline_misses(tmp_path):
    from tqpatch.eval.needle_margins import plot_needle_set

    rows = [{"seed": 1, "depth": 50.0, "trial": 0, "number": "5279348", "baseline_margin": 0.04, "settings": {"a": {"margin": -0.2, "answer": "11"}}},
            {"seed": 3, "depth": 0.0, "trial": 0, "number": "4992383", "baseline_margin": 0.2,
             "settings": {"a": {"margin": -0.1, "answer": "The number mentioned above is 4992383."}}},  # other words, same number
            {"seed": 2, "depth": 75.0, "trial": 0, "number": "1948774", "baseline_margin": None, "settings": {"a": {"margin": None, "answer": ""}}}]
    png = plot_needle_set(rows, {"a": "allocation"}, "two needles", tmp_path / "set.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    rows[0]["settings"]["b"] = {"margin": 0.3, "answer": "5279348"}  # a setting run on some needles only: blank elsewhere
    png = plot_needle_set(rows, {"a": "allocation", "b": "uniform"}, "two needles", tmp_path / "set_b.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000

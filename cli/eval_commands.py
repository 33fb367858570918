"""`tqpatch eval ppl` and `tqpatch eval needle`: thin click wrappers over tqpatch.eval.perplexity / needle."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import click

from .generate import load_or_fail, make_config, model_options, parse_presets, split_list

COMPARE = ("hf-quantized",)


def _int_list(value: str, option: str, minimum: int = 0) -> list[int]:
    try:
        items = [int(v) for v in split_list(value, option)]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}", param_hint=option) from None
    if any(v < minimum for v in items):
        raise click.BadParameter(f"values must be >= {minimum}, got {value!r}", param_hint=option)
    return items


def _choices(value: str, option: str, valid: tuple[str, ...]) -> list[str]:
    items = split_list(value, option)
    for item in items:
        if item not in valid:
            raise click.BadParameter(f"unknown value {item!r}; valid: {', '.join(valid)}", param_hint=option)
    return items


def _text(text_file, dataset):
    from tqpatch.eval.data import DataError, load_text

    try:
        return load_text(text_file, dataset)
    except DataError as exc:
        raise click.ClickException(str(exc)) from None


def _config_grid(settings: str, key_methods: str, residual_lengths: str) -> list:
    """One TurboQuantConfig per (preset, key method, residual length)."""
    presets = parse_presets(settings)
    methods = _choices(key_methods, "--key-method", ("mse", "prod"))
    residuals = _int_list(residual_lengths, "--residual-length")
    return [make_config(p, key_method=m, residual_length=r) for r, m, p in itertools.product(residuals, methods, presets)]


@click.command("ppl")
@model_options
@click.option("--settings", default="k4v4,k3v2,k2v2", help="Comma-separated settings: presets (k8v8, k4v4, k3v2, k2v2, 3.5bit, 2.5bit, k4v4+, 4bit+, k3v2+, k2v2+, 3.5bit+, 2.5bit+) or specs like k4.5v3.5-o2-s4 (TurboQuantConfig.from_spec; a spec's own -r/-prod win over --residual-length/--key-method); the uncompressed baseline is always measured first.")
@click.option("--key-method", "key_methods", default="mse", help="Comma-separated key methods (mse, prod); every preset runs with each.")
@click.option("--residual-length", "residual_lengths", default="0", help="Comma-separated full-precision windows; every preset runs with each.")
@click.option("--window", type=click.IntRange(min=2), default=2048, help="Tokens per window W (a fresh cache per window).")
@click.option("--chunk", type=click.IntRange(min=1), default=32, help="Tokens per forward call C; the cache is carried across a window's chunks.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=8192, help="Text tokens evaluated, from the start of the text.")
@click.option("--text-file", type=click.Path(path_type=Path), default=None, help="Text to evaluate [default: ../shared/data/wikitext-2-raw-test.txt beside the repo].")
@click.option("--dataset", type=click.Choice(["wikitext"]), default=None, help="Use the hub copy via `datasets` (wikitext-2-raw-v1, test split) instead of a file [default: off].")
@click.option("--skip-chars", type=click.IntRange(min=0), default=0, help="Start this many characters into the text (held-out text, e.g. 200000).")
@click.option("--copy", is_flag=True, help="Each window is a passage of W/2 text tokens read twice, so its second half is a long-range copy (what a needle lookup needs); --max-tokens counts each text token once.")
@click.option("--compare", type=click.Choice(COMPARE), default=None, help="Also run transformers' QuantizedCache (quanto backend) through the same protocol, once per --residual-length [default: off].")
@click.option("--hf-bits", default="4,2", help="With --compare: QuantizedCache bit widths (2, 4).")
@click.option("--hf-key-axis", default="token,channel", help="With --compare: key quantization axes (token = per-token groups, channel = KIVI-style per-channel).")
@click.option("--hf-group-size", type=click.IntRange(min=1), default=32, help="With --compare: quanto group size (per-channel keys need heads x tokens divisible by it).")
@click.option("--kl", is_flag=True, help="Also report each setting's mean KL divergence from the baseline's next-token distribution, nats per token (less noisy than ΔPPL at 4 bits; keeps the baseline's log-probabilities: tokens x vocabulary x 2 bytes of memory).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON result here, updated after each setting [default: no file].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option("--progress/--no-progress", default=True, help="Show a tqdm progress bar (stderr).")
def ppl(model_spec, device, dtype, device_map, settings, key_methods, residual_lengths, window, chunk, max_tokens, text_file, dataset, skip_chars, copy, compare, hf_bits, hf_key_axis, hf_group_size, kl, out_file, as_json, progress):
    """Decode-faithful perplexity: windows of W tokens fed in chunks of C through the cache under test.

    Reports per setting: PPL and ΔPPL against the baseline of the same run,
    true bits per element and compression ratio (cache_stats), and how many
    attended keys were read compressed. Under `accelerate launch`, windows
    are sharded over the processes and gathered.
    """
    from tqpatch.eval.perplexity import HFQuantizedSetting, check_protocol, decode_perplexity

    try:
        check_protocol(window, chunk)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--window/--chunk") from None
    configs = _config_grid(settings, key_methods, residual_lengths)
    if compare == "hf-quantized":
        # Options first, so a bad value is reported whether or not optimum-quanto is installed.
        bits = _int_list(hf_bits, "--hf-bits")
        if any(b not in (2, 4) for b in bits):
            raise click.BadParameter(f"QuantizedCache (quanto) supports 2 or 4 bits, got {hf_bits!r}", param_hint="--hf-bits")
        axes = _choices(hf_key_axis, "--hf-key-axis", tuple(HFQuantizedSetting.KEY_AXES))
        residuals = _int_list(residual_lengths, "--residual-length")
        try:
            import optimum.quanto  # noqa: F401
        except ImportError:
            raise click.ClickException("--compare hf-quantized needs optimum-quanto: pip install 'tqpatch[compare]'") from None
        configs += [HFQuantizedSetting(b, a, r, hf_group_size) for r in residuals for b in bits for a in axes]
    if text_file is not None and not text_file.is_file():
        raise click.BadParameter(f"text file {text_file} does not exist", param_hint="--text-file")
    text, source = _text(text_file, dataset)
    if skip_chars:
        if skip_chars >= len(text):
            raise click.BadParameter(f"the text has {len(text):,} characters; cannot skip {skip_chars:,}", param_hint="--skip-chars")
        text, source = text[skip_chars:], f"{source} from character {skip_chars}"
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1 and device_map is None:
        device = str(state.device)
    model, tokenizer = load_or_fail(model_spec, device, dtype, device_map)

    def save(result):
        if out_file is not None and state.is_main_process:
            out_file.parent.mkdir(parents=True, exist_ok=True)
            out_file.write_text(json.dumps(result.to_json(), indent=2))

    try:
        result = decode_perplexity(
            model, tokenizer, text, configs, window=window, chunk=chunk, max_tokens=max_tokens,
            model_name=model_spec or "smollm2", text_source=source, progress=progress, on_row=save, kl=kl, copy=copy,
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if state.is_main_process:
        click.echo(json.dumps(result.to_json(), indent=2) if as_json else result.table())


@click.command("needle")
@model_options
@click.option("--settings", default="k4v4,k3v2,2.5bit", help="Comma-separated settings (presets or specs, see `eval ppl --help`); the uncompressed baseline is always run first.")
@click.option("--key-method", type=click.Choice(["mse", "prod"]), default="mse", help="TurboQuant variant for keys.")
@click.option("--residual-length", type=click.IntRange(min=0), default=0, help="Most recent tokens kept in full precision.")
@click.option("--lengths", default="512,1024,2048,4096", help="Comma-separated context lengths in tokens (up to the model's limit).")
@click.option("--depths", default="0,25,50,75,100", help="Comma-separated needle depths in percent (0..100).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=24, help="Answer length in tokens.")
@click.option("--seed", type=int, default=0, help="Seeds the needle numbers.")
@click.option("--trials", type=click.IntRange(min=1), default=1, help="Needles per cell (each its own number and prefill); recall is counted per cell.")
@click.option("--answer-prefix", default="", help="End each prompt with the start of the answer, e.g. 'The special magic number is' (RULER-style), so a small model answers with the number instead of drifting back into the haystack [default: none].")
@click.option("--text-file", type=click.Path(path_type=Path), default=None, help="Haystack text [default: ../shared/data/wikitext-2-raw-test.txt beside the repo].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results/needle"), help="Folder for needle.json and one needle_<setting>.png per setting.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option("--progress/--no-progress", default=True, help="Show a tqdm progress bar (stderr).")
def needle(model_spec, device, dtype, device_map, settings, key_method, residual_length, lengths, depths, max_new_tokens, seed, trials, answer_prefix, text_file,
           out_dir, as_json, progress):
    """Needle in a haystack: exact recall over context lengths x depths, heat maps (baseline beside each setting).

    Where the baseline is right, each answer's margin (JSON "margins", in nats) is the smallest logit gap between
    the baseline's answer token and the best other token up to the number's last digit: > 0 means the setting
    wrote the baseline's answer; its size, how far the needle is from being lost."""
    from tqpatch.eval.needle import check_grid, needle_in_haystack, write_needle

    configs = [make_config(p, key_method=key_method, residual_length=residual_length) for p in parse_presets(settings)]
    length_list = _int_list(lengths, "--lengths", minimum=1)
    try:
        depth_list = [float(v) for v in split_list(depths, "--depths")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {depths!r}", param_hint="--depths") from None
    try:
        check_grid(length_list, depth_list, None)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--lengths/--depths") from None
    if text_file is not None and not text_file.is_file():
        raise click.BadParameter(f"text file {text_file} does not exist", param_hint="--text-file")
    text, source = _text(text_file, None)
    model, tokenizer = load_or_fail(model_spec, device, dtype, device_map)
    try:
        result = needle_in_haystack(
            model, tokenizer, text, configs, length_list, depth_list, max_new_tokens=max_new_tokens, seed=seed,
            model_name=model_spec or "smollm2", text_source=source, progress=progress, trials=trials,
            answer_prefix=answer_prefix,
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    paths = write_needle(result, out_dir)
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else result.table())
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}", err=True)


def register(main, eval_group) -> None:
    eval_group.add_command(ppl)
    eval_group.add_command(needle)

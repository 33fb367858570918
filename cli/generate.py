"""`tqpatch generate`: the model's own-dtype output beside each TurboQuant setting, with cache sizes and speed.

Also holds the option helpers the other model commands share (model loading
with one-sentence errors, setting lists).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import click

DEFAULT_PROMPT = "Explain what a transformer architecture is in 2 sentences."
DEFAULT_SETTINGS = "k4v4,k3v2,k2v2"


# -- shared option helpers ------------------------------------------------------------------------
def model_options(fn):
    """--model, --device, --dtype, --device-map."""
    fn = click.option("--device-map", type=click.Choice(["auto"]), default=None, help="Spread the model over the visible GPUs (accelerate) [default: off, the whole model on --device].")(fn)
    fn = click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default=None, help="Model dtype [default: float32 on CPU, bfloat16 on GPU].")(fn)
    fn = click.option("--device", default="cpu", help="Device for the model (cpu, cuda, cuda:1, mps); ignored with --device-map.")(fn)
    fn = click.option("--model", "model_spec", default=None, help="Embedded model name (smollm2, gemma3-270m), hub id, local folder or .gguf file [default: smollm2].")(fn)
    return fn


def load_or_fail(model_spec, device, dtype, device_map):
    """(model, tokenizer), or a one-sentence click error (no traceback) when the model cannot be found or loaded."""
    from tqpatch.models import ModelNotFoundError, load_model

    try:
        return load_model(model_spec, device=device, dtype=dtype, device_map=device_map)
    except ModelNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(f"could not load model {model_spec or 'smollm2'!r}: {exc}") from None


def split_list(value: str, option: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter("expected a comma-separated list, got nothing", param_hint=option)
    return items


def parse_presets(value: str, option: str = "--settings") -> list[str]:
    """Comma-separated settings: preset names or specs (TurboQuantConfig.from_spec), each checked."""
    from tqpatch.config import TurboQuantConfig

    names = split_list(value, option)
    for name in names:
        try:
            TurboQuantConfig.from_spec(name)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None
    return names


def make_config(spec: str, **overrides):
    """A setting with the CLI-wide options applied where the setting's own spec leaves the default."""
    from dataclasses import fields, replace

    from tqpatch.config import TurboQuantConfig

    config = TurboQuantConfig.from_spec(spec)
    defaults = {f.name: f.default for f in fields(TurboQuantConfig)}
    chosen = {k: v for k, v in overrides.items() if getattr(config, k) == defaults[k]}
    try:
        return replace(config, **chosen)
    except ValueError as exc:
        raise click.UsageError(f"setting {spec} with {chosen}: {exc}") from None


def prompt_ids(tokenizer, prompt: str, chat_template: bool):
    """input_ids [1, T]: the prompt as a user turn when the tokenizer has a chat template (and chat_template), else raw."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


# -- generate -----------------------------------------------------------------------------------
@dataclass
class GenerationRow:
    setting: str
    text: str
    new_tokens: int
    identical: bool  # same tokens as the baseline
    first_divergence: int | None  # index of the first generated token that differs from the baseline (None if identical)
    cache_bytes: int
    baseline_cache_bytes: int  # the same tokens' K/V in the model dtype
    compression_ratio: float
    bits_per_element: float
    compressed_tokens: int  # summed over layers
    tokens_per_second: float


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token of two sequences (the shorter length if one is a prefix), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_generation(model, tokenizer, input_ids, config, max_new_tokens: int, temperature: float, seed: int) -> tuple[list[int], dict, float]:
    """(new token ids, cache_stats totals, tokens/s) for one setting (config None = unpatched)."""
    import torch

    import tqpatch

    if config is not None:
        tqpatch.patch(model, config)
    try:
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        device = next(model.parameters()).device
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids.to(device),
                attention_mask=torch.ones_like(input_ids).to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                return_dict_in_generate=True,
                top_p=None,
                top_k=None,
                **sampling,
            )
        seconds = time.perf_counter() - start
        new = out.sequences[0, input_ids.shape[1] :].tolist()
        cache = getattr(out, "cache", None) or out.past_key_values
        stats = tqpatch.cache_stats(cache).to_json()["total"]
    finally:
        if config is not None:
            tqpatch.unpatch(model)
    return new, stats, len(new) / seconds if seconds > 0 else 0.0


def format_rows(prompt: str, rows: list[GenerationRow], width: int = 100) -> str:
    import textwrap

    lines = [f"Prompt: {prompt!r}", ""]
    baseline = rows[0]
    for row in rows:
        if row is baseline:
            verdict = "baseline"
        elif row.identical:
            verdict = f"IDENTICAL to {baseline.setting}"
        else:
            verdict = f"diverges from {baseline.setting} at generated token {row.first_divergence}"
        size = f"KV cache {row.cache_bytes / 1024:.1f} KiB ({row.bits_per_element:.2f} bits/element"
        if row is not baseline:
            size += f", {row.compression_ratio:.2f}x smaller than the same tokens uncompressed"
        lines.append(f"[{row.setting}] {verdict} | {size}) | {row.tokens_per_second:.1f} tokens/s")
        lines += textwrap.wrap(row.text.strip(), width, initial_indent="    ", subsequent_indent="    ") or ["    (empty)"]
        lines.append("")
    return "\n".join(lines).rstrip()


@click.command("generate")
@click.option("--prompt", default=DEFAULT_PROMPT, help="The user prompt.")
@model_options
@click.option("--settings", default=DEFAULT_SETTINGS, help="Comma-separated settings to compare with the uncompressed model: presets (k8v8, k4v4, k3v2, k2v2, 3.5bit, 2.5bit, k4v4+, 4bit+, k3v2+, k2v2+, 3.5bit+, 2.5bit+) or specs like k4.5v3.5-o2-s4 (see TurboQuantConfig.from_spec).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, help="Tokens to generate per setting.")
@click.option("--residual-length", type=click.IntRange(min=0), default=0, help="Most recent tokens kept in full precision.")
@click.option("--key-method", type=click.Choice(["mse", "prod"]), default="mse", help="TurboQuant variant for keys (values always mse).")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, help="0 = greedy; > 0 samples (same --seed for every setting).")
@click.option("--seed", type=int, default=0, help="Sampling seed.")
@click.option("--chat-template/--no-chat-template", default=True, help="Wrap the prompt in the tokenizer's chat template when it has one.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the side-by-side text.")
def generate(prompt, model_spec, device, dtype, device_map, settings, max_new_tokens, residual_length, key_method, temperature, seed, chat_template, as_json):
    """Generate with the uncompressed model and each TurboQuant setting; print them side by side.

    For each setting: the text, IDENTICAL or the index of the first generated
    token that differs from the baseline, the KV-cache bytes actually held
    (tqpatch.cache_stats), the compression ratio, the true bits per element,
    and tokens/s.
    """
    presets = parse_presets(settings)
    configs = [(name, make_config(name, residual_length=residual_length, key_method=key_method)) for name in presets]
    model, tokenizer = load_or_fail(model_spec, device, dtype, device_map)
    from tqpatch.layer_profiles import resolve

    configs = [(name, resolve(config, model.config)) for name, config in configs]  # "-Bt": shown as the bits it takes here
    input_ids = prompt_ids(tokenizer, prompt, chat_template)
    baseline_name = str(next(model.parameters()).dtype).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16")
    rows: list[GenerationRow] = []
    baseline_ids: list[int] = []
    for name, config in [(baseline_name, None)] + [(c.name, c) for _, c in configs]:
        new, stats, speed = run_generation(model, tokenizer, input_ids, config, max_new_tokens, temperature, seed)
        if config is None:
            baseline_ids = new
        div = first_divergence(baseline_ids, new)
        rows.append(
            GenerationRow(
                setting=name,
                text=tokenizer.decode(new, skip_special_tokens=True),
                new_tokens=len(new),
                identical=div is None,
                first_divergence=div,
                cache_bytes=stats["bytes"],
                baseline_cache_bytes=stats["baseline_bytes"],
                compression_ratio=stats["compression_ratio"],
                bits_per_element=stats["bits_per_element"],
                compressed_tokens=stats["compressed_tokens"],
                tokens_per_second=speed,
            )
        )
    if as_json:
        payload = {"prompt": prompt, "prompt_tokens": input_ids.shape[1], "model": model_spec or "smollm2", "device": str(next(model.parameters()).device), "rows": [asdict(r) for r in rows]}
        click.echo(json.dumps(payload, indent=2))
    else:
        click.echo(format_rows(prompt, rows))


def register(main, eval_group) -> None:
    main.add_command(generate)

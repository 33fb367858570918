"""Needle in a haystack: recall of a fact inserted at depths 0–100% of contexts of given lengths.

For each context length L (prompt tokens, chat template included) and depth
p ∈ [0, 100]: a haystack of WikiText text is cut so the whole prompt is about
L tokens, the needle sentence "The special magic number is N." (N a
seeded 7-digit number, different per cell) is inserted at the sentence
boundary nearest to p% of the haystack, and the model is asked for the number
(greedy, a few tokens). Exact recall: 1 if N appears in the answer, else 0.
With `trials` > 1 every cell is asked that many times, each with its own
number (and so its own prefill), and a cell's recall is the count of right
answers: one needle per cell is a coin at the edge of what a model can do.
Beside recall, each setting is compared with the baseline answer by answer:
`paired[setting]` = (answers the baseline got right and the setting missed,
the reverse).

Recall is a coin at the edge of what the model can do; the *margin* says how
far from the edge each answer is. Where the baseline is right, a setting's
margin is the smallest logit gap, over the baseline's answer tokens up to the
number's last digit, between the baseline's token and the best other token,
read along the setting's own greedy path: while the two answers agree that path
is the baseline's, and at the first token they differ the gap is ≤ 0 and the
reading stops there. So margin > 0 ⇔ the setting writes the baseline's answer
up to the number; its size (nats: a logit gap is a log-probability gap) is how
much the compression could still move the scores before the needle is lost.
The baseline's own margin is its confidence.

With an answer prefix (`answer_prefix`, e.g. ANSWER_PREFIX, as RULER primes its answers) the prompt ends with the
start of the answer, "... Answer with the number only.<model turn>The special magic number is", so a small model
that would otherwise drift back into the haystack's style (Gemma-3-270M from 2,048 tokens on: "= = =" headings)
answers with the number, and the test reads the lookup itself rather than whether the model follows the question.

The prompt is prefilled once per cell without compression; each setting then
continues from a copy of that cache, which patch() compresses as it takes it
over. With prefill_exact=True (the default) this is exactly what a patched
generate() computes: the prompt attends to itself exactly, and every
generated token reads the whole prompt from the compressed cache.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

from tqpatch.config import TurboQuantConfig
from tqpatch.layer_profiles import resolve, text_config
from tqpatch.patch import TQPatchError, is_patched, patch, unpatch
from tqpatch.eval.plotting import pyplot, save_figure

from .perplexity import cache_kwarg

NEEDLE = "The special magic number is {number}."
QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."
ANSWER_PREFIX = "The special magic number is"  # `--answer-prefix` primes the answer with it (RULER-style)
BASELINE = "fp"


@dataclass
class NeedleResult:
    model: str
    text_source: str
    lengths: list[int]
    depths: list[float]
    settings: list[str]  # baseline first
    recall: dict[str, list[list[int]]]  # setting -> [depth][length] right answers (of `trials`)
    answers: dict[str, list[list[list[str]]]]  # setting -> [depth][length][trial] generated text
    prompt_tokens: list[list[int]]  # [depth][length] actual prompt lengths (the last trial's)
    mean_recall: dict[str, float] = field(default_factory=dict)  # right answers / (cells · trials)
    trials: int = 1
    paired: dict[str, list[int]] = field(default_factory=dict)  # setting -> [lost, gained] against the baseline
    margins: dict[str, list[list[list[float | None]]]] = field(default_factory=dict)  # setting -> [depth][length][trial]
    # smallest logit gap along the baseline's right answer (module docstring); None where the baseline missed
    answer_prefix: str = ""  # the start of the answer the prompt ends with ("": none)

    def margin_summary(self, name: str) -> tuple[int, float, float] | None:
        """(answers with a margin, their mean margin, the smallest) for one setting, or None without margins."""
        values = [m for row in self.margins.get(name, []) for cell in row for m in cell if m is not None]
        return (len(values), sum(values) / len(values), min(values)) if values else None

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{self.model}: needle recall over lengths {self.lengths} x depths {self.depths} ({self.text_source})"]
        if self.trials > 1:
            lines[0] += f", {self.trials} needles per cell"
        if self.answer_prefix:
            lines[0] += f", answers primed with {self.answer_prefix!r}"
        for name in self.settings:
            versus = ""
            if name in self.paired:
                lost, gained = self.paired[name]
                versus = f"; against {self.settings[0]}: lost {lost}, gained {gained} of {len(self.lengths) * len(self.depths) * self.trials}"
            summary = self.margin_summary(name)
            if summary is not None:
                versus += f"; margin on the {summary[0]} answers {self.settings[0]} got right: mean {summary[1]:.2f}, smallest {summary[2]:.2f}"
            lines.append(f"{name:<24} mean recall {self.mean_recall[name]:.3f}{versus}")
            for d, row in zip(self.depths, self.recall[name]):
                lines.append(f"    depth {d:>5.1f}%  " + " ".join(_cell(v, self.trials).rjust(5) for v in row))
        return "\n".join(lines)


def _cell(right: int, trials: int) -> str:
    """A cell's recall as printed: 0/1 for one needle, right/trials for several."""
    return str(right) if trials == 1 else f"{right}/{trials}"


def check_grid(lengths: list[int], depths: list[float], max_length: int | None) -> None:
    if not lengths or not depths:
        raise ValueError("need at least one context length and one depth")
    for d in depths:
        if not 0 <= d <= 100:
            raise ValueError(f"depth must be a percentage in 0..100, got {d:g}")
    for n in lengths:
        if n < 64:
            raise ValueError(f"context length must be >= 64 tokens, got {n}")
        if max_length is not None and n > max_length:
            raise ValueError(f"context length {n} exceeds the model's limit of {max_length} tokens")


def _chat(tokenizer, content: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, return_dict=True)["input_ids"]
    return tokenizer(content).input_ids


def build_prompt(tokenizer, haystack_ids: list[int], length: int, depth: float, needle: str, answer_prefix: str = "") -> list[int]:
    """Prompt ids of about `length` tokens: haystack with the needle at `depth`% (snapped back to a sentence end), then
    the question, then `answer_prefix` (the start of the model's answer, after the chat template's turn marker)."""
    prefix = tokenizer(answer_prefix, add_special_tokens=False).input_ids if answer_prefix else []
    overhead = len(_chat(tokenizer, f"{needle}\n\n{QUESTION}")) + len(prefix)
    body = haystack_ids[: max(length - overhead, 0)]
    cut = round(len(body) * depth / 100)
    text_before = tokenizer.decode(body[:cut])
    end = text_before.rfind(". ")
    if end > 0 and len(text_before) - end < 400:
        text_before = text_before[: end + 1]
        text_after = tokenizer.decode(body)[end + 1 :]
    else:
        text_after = tokenizer.decode(body[cut:])
    context = f"{text_before.rstrip()} {needle} {text_after.lstrip()}".strip()
    return _chat(tokenizer, f"{context}\n\n{QUESTION}") + prefix


def draw_number(rng: random.Random, skip: int = 0) -> str:
    """The next needle number (7 digits) from `rng`, after skipping `skip` draws: a grid run draws one per cell, in
    the order trial, depth, length."""
    for _ in range(skip):
        rng.randrange(1_000_000, 10_000_000)
    return str(rng.randrange(1_000_000, 10_000_000))


def writes_number(text: str, number: str) -> bool:
    """Exact recall: `number` appears in the answer `text`, commas and spaces ignored."""
    return number in text.replace(",", "").replace(" ", "")


def number_span(tokenizer, tokens: list[int], number: str) -> int | None:
    """How many of the answer `tokens` it takes to write `number` (commas and spaces ignored), or None if they never do."""
    for k in range(1, len(tokens) + 1):
        if writes_number(tokenizer.decode(tokens[:k], skip_special_tokens=True), number):
            return k
    return None


def answer_margin(logits: list[torch.Tensor], tokens: list[int], reference: list[int], span: int) -> float:
    """Smallest logit gap min_t (l_t[r_t] − max_{v≠r_t} l_t[v]) over the first `span` reference tokens r, where
    l_t [V] are the logits of a greedy generation whose own tokens are `tokens`: read while tokens[t] == r_t, and at
    the first t where they differ (a gap ≤ 0) the reading stops. > 0 ⇔ tokens[:span] == reference[:span]."""
    if not 0 < span <= len(reference):
        raise ValueError(f"span must be in 1..{len(reference)}, got {span}")
    margin = float("inf")
    for t in range(span):
        step = logits[t].float().reshape(-1)
        others = step.clone()
        others[reference[t]] = float("-inf")
        margin = min(margin, (step[reference[t]] - others.max()).item())
        if tokens[t] != reference[t]:
            break
    return margin


@torch.no_grad()
def _answer(model, tokenizer, ids: torch.Tensor, prefill, config: TurboQuantConfig | None, max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy answer tokens continuing from a copy of `prefill` (the cache of all prompt tokens but the last), and
    the logits [V] each was chosen from."""
    cache = copy.deepcopy(prefill)
    if config is not None:
        patch(model, config)
    try:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
            **{cache_kwarg(model): cache},  # generate takes the cache under the forward's name
        )
    finally:
        if config is not None:
            unpatch(model)
    return out.sequences[0, ids.shape[1] :].tolist(), [step[0] for step in out.logits]


def haystack_tokens(tokenizer, haystack: str, length: int) -> list[int]:
    """The haystack's first tokens, enough for a prompt of `length` tokens."""
    return tokenizer(haystack[: length * 10], add_special_tokens=False).input_ids


@torch.no_grad()
def answer_needle(model, tokenizer, ids: torch.Tensor, number: str, settings: list[TurboQuantConfig | None],
                  max_new_tokens: int) -> list[tuple[str, float | None]]:
    """Prefill the prompt `ids` [1, L] once (exactly), then each setting's greedy answer text and its margin along
    the first setting's (the baseline's) answer, None where the baseline's answer lacks `number`."""
    prefill = DynamicCache(config=model.config)
    model(input_ids=ids[:, :-1], use_cache=True, **{cache_kwarg(model): prefill})
    reference, span, out = [], None, []
    for k, setting in enumerate(settings):
        tokens, logits = _answer(model, tokenizer, ids, prefill, setting, max_new_tokens)
        if k == 0:
            reference, span = tokens, number_span(tokenizer, tokens, number)
        out.append((tokenizer.decode(tokens, skip_special_tokens=True), None if span is None else answer_margin(logits, tokens, reference, span)))
    return out


def needle_in_haystack(
    model,
    tokenizer,
    haystack: str,
    settings: list[TurboQuantConfig],
    lengths: list[int],
    depths: list[float],
    max_new_tokens: int = 24,
    seed: int = 0,
    model_name: str = "",
    text_source: str = "",
    progress: bool = True,
    trials: int = 1,
    answer_prefix: str = "",
) -> NeedleResult:
    """Recall of the baseline (always first) and each setting on the lengths × depths grid, `trials` needles per
    cell (trial 0 draws the numbers a single-trial run with the same seed draws); answer_prefix: the start of the
    answer each prompt ends with (module docstring)."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if is_patched(model):
        raise TQPatchError("needle_in_haystack patches the model for each setting itself; pass an unpatched model")
    config = text_config(model.config)
    check_grid(lengths, depths, getattr(config, "max_position_embeddings", None))
    haystack_ids = haystack_tokens(tokenizer, haystack, max(lengths))
    if len(haystack_ids) < max(lengths):
        raise ValueError(f"the haystack text has {len(haystack_ids)} tokens, fewer than the longest context {max(lengths)}")
    settings = [resolve(s, model.config) for s in settings]  # "-Bt": as the bits per layer it takes on this model
    names = [BASELINE] + [s.name for s in settings]
    recall = {n: [[0] * len(lengths) for _ in depths] for n in names}
    answers = {n: [[[] for _ in lengths] for _ in depths] for n in names}
    paired = {n: [0, 0] for n in names[1:]}
    margins = {n: [[[] for _ in lengths] for _ in depths] for n in names}
    prompt_tokens = [[0] * len(lengths) for _ in depths]
    rng = random.Random(seed)
    device = next(model.parameters()).device
    cells = [(i, j) for _ in range(trials) for i in range(len(depths)) for j in range(len(lengths))]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cells) * len(names), desc="needle", unit="answer")
    try:
        for i, j in cells:
            number = draw_number(rng)
            ids = torch.tensor([build_prompt(tokenizer, haystack_ids, lengths[j], depths[i], NEEDLE.format(number=number), answer_prefix)], device=device)
            prompt_tokens[i][j] = ids.shape[1]
            right = {}
            for name, (text, margin) in zip(names, answer_needle(model, tokenizer, ids, number, [None] + list(settings), max_new_tokens)):
                answers[name][i][j].append(text)
                right[name] = writes_number(text, number)
                recall[name][i][j] += right[name]
                margins[name][i][j].append(None if margin is None else round(margin, 4))
                if name in paired:
                    paired[name][0] += right[BASELINE] and not right[name]
                    paired[name][1] += right[name] and not right[BASELINE]
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
    mean = {n: sum(map(sum, recall[n])) / (len(lengths) * len(depths) * trials) for n in names}
    return NeedleResult(model_name or type(model).__name__, text_source, list(lengths), list(depths), names, recall, answers, prompt_tokens, mean,
                        trials, paired, margins, answer_prefix)


def combine_runs(results: list[NeedleResult]) -> NeedleResult:
    """Runs of one grid with the same settings (e.g. `--seed 1` .. `--seed 4`) as one result whose needles are the
    runs' trials together: right answers and lost / gained summed per cell, answers concatenated per cell."""
    if not results:
        raise ValueError("combine_runs needs at least one result")
    first = results[0]
    for r in results[1:]:
        for name in ("model", "lengths", "depths", "settings", "answer_prefix"):
            if getattr(r, name) != getattr(first, name):
                raise ValueError(f"combine_runs: runs differ in {name}: {getattr(first, name)} vs {getattr(r, name)}")
    shape = [(i, j) for i in range(len(first.depths)) for j in range(len(first.lengths))]
    recall = {n: [[sum(r.recall[n][i][j] for r in results) for j in range(len(first.lengths))] for i in range(len(first.depths))] for n in first.settings}
    answers = {n: [[[] for _ in first.lengths] for _ in first.depths] for n in first.settings}
    with_margins = all(r.margins for r in results)  # runs from before margins were kept have none
    margins = {n: [[[] for _ in first.lengths] for _ in first.depths] for n in first.settings} if with_margins else {}
    for r in results:
        for n in first.settings:
            for i, j in shape:
                answers[n][i][j] += r.answers[n][i][j]
                if with_margins:
                    margins[n][i][j] += r.margins[n][i][j]
    trials = sum(r.trials for r in results)
    paired = {n: [sum(r.paired[n][k] for r in results) for k in range(2)] for n in first.settings[1:] if all(n in r.paired for r in results)}
    mean = {n: sum(map(sum, recall[n])) / (len(shape) * trials) for n in first.settings}
    return NeedleResult(first.model, first.text_source, list(first.lengths), list(first.depths), list(first.settings), recall, answers,
                        first.prompt_tokens, mean, trials, paired, margins, first.answer_prefix)


def plot_needle(result: NeedleResult, setting: str, path: Path) -> Path:
    """Depth × length recall heat maps: the baseline beside `setting`."""
    plt = pyplot()

    width = 3.0 + 0.9 * len(result.lengths)
    fig, axes = plt.subplots(1, 2, figsize=(2 * width, 1.8 + 0.5 * len(result.depths)), squeeze=False, layout="constrained")
    for k, (ax, name) in enumerate(zip(axes[0], (result.settings[0], setting))):
        data = result.recall[name]
        image = ax.imshow([[v / result.trials for v in row] for row in data], cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(result.lengths)), [str(n) for n in result.lengths])
        ax.set_yticks(range(len(result.depths)), [f"{d:g}%" for d in result.depths])
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, _cell(v, result.trials), ha="center", va="center", fontsize=9)
        ax.set_xlabel("context length (tokens)")
        if k == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(f"{name}: recall {result.mean_recall[name]:.2f}", fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="exact recall" if result.trials == 1 else f"exact recall ({result.trials} needles per cell)")
    fig.suptitle(f"needle in a haystack, {result.model}", fontsize=11)
    return save_figure(fig, path, dpi=110)


def write_needle(result: NeedleResult, out_dir: Path) -> dict[str, Path]:
    """needle.json and one needle_<setting>.png per compressed setting (baseline beside it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "needle.json"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2))
    for name in result.settings[1:]:
        paths[name] = plot_needle(result, name, out_dir / f"needle_{name}.png")
    return paths

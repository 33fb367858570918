"""Needle margins of chosen needles under many settings: which layer's bits a needle lookup needs.

`tqpatch eval needle` runs whole grids and answers each cell with every setting. To find why a setting loses one
needle, this module re-draws chosen needles of earlier grid runs (seed, grid depths, depth, trial: the same number
and prompt the grid run used), prefills each once, and reads the margin (eval.needle: the smallest logit gap along
the baseline's answer; > 0 ⇔ the setting writes it) of every setting. Used as a scan, e.g. an allocation with one
layer's keys raised at a time, it finds the layers a lookup runs through (README, "Needle margins").

    python -m tqpatch.eval.needle_margins --needles 1:0,25,50,75,100:50 --settings A,B --out margins.json
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from tqpatch.config import TurboQuantConfig
from tqpatch.layer_profiles import resolve

from .needle import NEEDLE, answer_needle, build_prompt, draw_number, haystack_tokens


@dataclass(frozen=True)
class NeedleRef:
    """One needle of a grid run (`eval needle --seed S --depths D --trials T`, one context length): its depth and trial."""

    seed: int
    depths: tuple[float, ...]
    depth: float
    trial: int = 0

    @classmethod
    def parse(cls, text: str) -> "NeedleRef":
        """'seed:grid depths:depth[:trial]', e.g. '1:0,25,50,75,100:50' or '10:50,75:75:2'."""
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"a needle is 'seed:grid depths:depth[:trial]', e.g. 1:0,25,50,75,100:50; got {text!r}")
        depths = tuple(float(d) for d in parts[1].split(","))
        ref = cls(int(parts[0]), depths, float(parts[2]), int(parts[3]) if len(parts) == 4 else 0)
        if ref.depth not in depths:
            raise ValueError(f"depth {ref.depth:g} is not one of the grid's depths {[f'{d:g}' for d in depths]} in {text!r}")
        return ref

    def number(self) -> str:
        """The number the grid run (one context length) put in this cell."""
        return draw_number(random.Random(self.seed), self.trial * len(self.depths) + self.depths.index(self.depth))


@torch.no_grad()
def needle_margins(model, tokenizer, haystack: str, settings: list[TurboQuantConfig], needles: list[NeedleRef], length: int,
                   max_new_tokens: int = 24, progress: bool = True, on_needle=None, answer_prefix: str = "") -> list[dict]:
    """Per needle: its number, the baseline's answer and own margin, and each setting's answer and margin (None
    where the baseline misses the number). on_needle(rows) after each needle (e.g. to save as it goes);
    answer_prefix: the start of the answer the grid run's prompts ended with (`eval needle --answer-prefix`)."""
    haystack_ids = haystack_tokens(tokenizer, haystack, length)
    settings = [resolve(s, model.config) for s in settings]
    device = next(model.parameters()).device
    rows = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(needles), desc="needle margins", unit="needle")
    for ref in needles:
        number = ref.number()
        ids = torch.tensor([build_prompt(tokenizer, haystack_ids, length, ref.depth, NEEDLE.format(number=number), answer_prefix)], device=device)
        (baseline_answer, baseline_margin), *answers = answer_needle(model, tokenizer, ids, number, [None] + settings, max_new_tokens)
        row = {"seed": ref.seed, "depths": list(ref.depths), "depth": ref.depth, "trial": ref.trial, "number": number,
               "baseline_answer": baseline_answer, "baseline_margin": baseline_margin,
               "settings": {setting.name: {"answer": text, "margin": margin} for setting, (text, margin) in zip(settings, answers)}}
        if bar is not None:
            bar.update()
        rows.append(row)
        if on_needle is not None:
            on_needle(rows)
    if bar is not None:
        bar.close()
    return rows


def plot_margins(labels: list[str], margins: list[float], baseline_margin: float, title: str, path: Path) -> Path:
    """One needle's margin per setting as horizontal bars (green: the setting writes the baseline's answer, red: it
    loses the needle), the baseline's own margin as a dashed line."""
    from .plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.28 * len(labels)), layout="constrained")
    rows = range(len(labels))[::-1]
    ax.barh(list(rows), margins, color=["tab:green" if m > 0 else "tab:red" for m in margins])
    ax.set_yticks(list(rows), labels, fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.axvline(baseline_margin, color="gray", ls="--", lw=1, label=f"FP's own margin ({baseline_margin:.2f})")
    ax.set_xlabel("margin (nats): smallest logit gap along FP's answer; < 0 loses the needle")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path, dpi=110)


def plot_needle_set(rows: list[dict], labels: dict[str, str], title: str, path: Path) -> Path:
    """Each needle's margin (x: the needle, 'seed/depth/trial') for the baseline and each setting in `labels`
    (setting name -> legend label); a point under 0 is an answer other than the baseline's, crossed out where it lacks
    the number (the needle is lost). Needles the baseline misses are left out; a setting not run on a needle, blank."""
    from .plotting import pyplot, save_figure

    plt = pyplot()
    kept = [row for row in rows if row["baseline_margin"] is not None]
    fig, ax = plt.subplots(figsize=(1.6 + 0.45 * len(kept), 4.0), layout="constrained")
    x = range(len(kept))
    ax.plot(x, [row["baseline_margin"] for row in kept], "k_", ms=14, mew=2, ls="none", label="FP (its own confidence)")
    for (name, label), marker in zip(labels.items(), "os^Dv"):
        ax.plot(x, [row["settings"][name]["margin"] if name in row["settings"] else float("nan") for row in kept], marker, ls="none", alpha=0.8,
                label=label)
    lost = [(i, row["settings"][name]["margin"]) for name in labels for i, row in enumerate(kept)
            if name in row["settings"] and row["number"] not in row["settings"][name]["answer"]]
    if lost:
        ax.plot(*zip(*lost), "kx", ms=9, ls="none", label="answer lacks the number")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(list(x), [f"{row['seed']}/{row['depth']:g}/{row['trial']}" for row in kept], rotation=60, fontsize=8)
    ax.set_xlabel("needle (seed / depth % / trial)")
    ax.set_ylabel("margin (nats); < 0: not FP's answer")
    ax.set_title(title, fontsize=10)
    fig.legend(fontsize=8, loc="outside lower center", ncol=1 + len(labels))  # below the axes, clear of the points
    return save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from tqpatch.eval.data import load_text
    from tqpatch.models import load_model

    parser = argparse.ArgumentParser(prog="python -m tqpatch.eval.needle_margins", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="embedded model name or path [default: smollm2]")
    parser.add_argument("--needles", required=True, help="space-separated needles 'seed:grid depths:depth[:trial]'")
    parser.add_argument("--settings", required=True, help="comma-separated settings (presets or specs)")
    parser.add_argument("--length", type=int, default=8192, help="the grid run's context length in tokens")
    parser.add_argument("--answer-prefix", default="", help="the grid run's --answer-prefix [default: none]")
    parser.add_argument("--out", required=True, help="JSON file, written after each needle")
    args = parser.parse_args(argv)
    try:
        needles = [NeedleRef.parse(n) for n in args.needles.split()]
        settings = [TurboQuantConfig.from_spec(s) for s in args.settings.split(",") if s]
    except ValueError as exc:
        parser.error(str(exc))
    model, tokenizer = load_model(args.model)
    text, source = load_text(None)
    head = {"model": args.model or "smollm2", "text_source": source, "length": args.length, "settings": [s.name for s in settings]}
    if args.answer_prefix:
        head["answer_prefix"] = args.answer_prefix

    def save(rows):
        Path(args.out).write_text(json.dumps({**head, "needles": rows}, indent=1))

    for row in needle_margins(model, tokenizer, text, settings, needles, args.length, on_needle=save, answer_prefix=args.answer_prefix):
        print(f"seed {row['seed']} depth {row['depth']:g} trial {row['trial']}: baseline {row['baseline_margin']}, "
              + ", ".join(f"{v['margin']}" for v in row["settings"].values()))


if __name__ == "__main__":
    main()

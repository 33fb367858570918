"""Bits per layer: measure how much each layer's keys and values cost, then spend a bit budget where it buys the most.

Scan: one setting per (layer, side) that compresses only that side of that layer at `scan_bits`, every other layer
exact (`-L...`, the other side at 8 bits), so each row's loss is that side's own s_l: its ΔPPL in % (`--metric ppl`),
or its mean KL to FP per token in millinats (`--metric kl`, from `tqpatch eval ppl --kl`; KL has no first-order term
and so far less noise than ΔPPL at 4 bits, see README "KL to FP").

Allocation: the loss of a layer-side at b bits is modelled as s_l · D(b) / D(scan_bits), D the code's unit-vector
MSE (losses of small independent errors add; a bit cuts D ~3.7×); its cost is b bits on each of n_l cached
coordinates, n_l the tokens the layer holds (a sliding-window layer holds its window). The bits minimising
Σ s_l D(b_l) / D(scan_bits) subject to Σ n_l b_l ≤ budget · Σ n_l come from a knapsack by dynamic programming over
the sides (token counts rounded up to 1/64 of the largest, so the table stays small).

Measured on Gemma-3 (README, "Bits per layer"): the allocations from a ΔPPL scan at 2 bits did not beat uniform bits
on the seed means; those from a KL scan at 4 bits cut the KL by 12-27% and beat them ("Bits per layer from a KL scan").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIDES = ("k", "v")


def scan_settings(base: str, num_layers: int, side: str, scan_bits: int = 2) -> list[str]:
    """Specs that compress only `side` ("k" or "v") of one layer at `scan_bits` (the other side at 8), one per layer.

    base: the options after 'k<K>v<V>', e.g. "s4-ck-sv-tkv-qsd-n8" (no layer options)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    head = f"k{scan_bits}v8" if side == "k" else f"k8v{scan_bits}"
    specs = []
    for layer in range(num_layers):
        exact = ".".join(str(i) for i in range(num_layers) if i != layer)
        specs.append("-".join(filter(None, [head, base, f"L{exact}" if exact else ""])))
    return specs


@dataclass
class Allocation:
    bits: dict[tuple[int, str], int]  # (layer, side) -> bits
    average_bits: float  # token-weighted over every cached coordinate (codes only)
    predicted_loss: float  # Σ s D(b) / D(scan_bits), in the scan's units
    uniform_loss: float  # the same at the uniform (key_bits, value_bits)

    def overrides(self, key_bits: int, value_bits: int) -> tuple[tuple[int, int, int], ...]:
        """`TurboQuantConfig.layer_bits_overrides` for the layers whose bits differ from (key_bits, value_bits)."""
        layers = sorted({layer for layer, _ in self.bits})
        pairs = {layer: (self.bits[(layer, "k")], self.bits[(layer, "v")]) for layer in layers}
        return tuple((layer, *pair) for layer, pair in pairs.items() if pair != (key_bits, value_bits))


def allocate_bits(
    key_loss: list[float],
    value_loss: list[float],
    tokens: list[int],
    distortion: dict[int, float],
    key_bits: int,
    value_bits: int,
    scan_bits: int = 2,
    min_bits: int = 3,
    max_bits: int = 6,
    floor: float = 0.05,
    move: str = "kv",
    min_key_bits: int | None = None,
    hold_keys: tuple[int, ...] | dict[int, int] = (),
    value_scan_bits: int | None = None,
    hold_values: tuple[int, ...] | dict[int, int] = (),
) -> Allocation:
    """Per-layer key and value bits at the token-weighted average of (key_bits, value_bits).

    key_loss, value_loss: each layer's side's loss at scan_bits (from the scan: ΔPPL % or KL), clipped below at `floor`
    (a ΔPPL scan's noise makes small losses negative); tokens: tokens each layer holds; distortion: bits -> D(bits);
    move: the sides whose bits may change ("kv", "k" or "v"); the other side keeps its uniform bits; min_key_bits: the
    keys' least bits, if not min_bits (e.g. key_bits: no layer's keys lose bits); hold_keys: layers whose keys keep at
    least key_bits, or {layer: least bits} (on SmolLM2 an 8k needle lookup runs through layer 19's keys, which both KL
    scans call quiet; on Gemma-3 a needle's answer needs layer 14's keys at 5 bits); value_scan_bits: the bits of the
    values' scan where it differs from the keys' (each side scanned near its own operating point); hold_values: the
    same as hold_keys for values (layers at least value_bits, or {layer: least bits})."""
    if not move or set(move) - set(SIDES):
        raise ValueError(f"move must name the sides to reallocate, 'kv', 'k' or 'v', got {move!r}")
    if not len(key_loss) == len(value_loss) == len(tokens):
        raise ValueError(f"one loss per layer and side and one token count per layer: got {len(key_loss)}, {len(value_loss)}, {len(tokens)}")
    held = {}  # side -> {layer: least bits}
    for side, name, hold, bits in (("k", "hold_keys", hold_keys, key_bits), ("v", "hold_values", hold_values, value_bits)):
        held[side] = dict(hold) if isinstance(hold, dict) else dict.fromkeys(hold, bits)
        if set(held[side]) - set(range(len(tokens))):
            raise ValueError(f"{name} names layers the model lacks: {sorted(set(held[side]) - set(range(len(tokens))))} (layers 0..{len(tokens) - 1})")
        if any(b > max_bits for b in held[side].values()):
            raise ValueError(f"{name} asks for more than max_bits = {max_bits}: {held[side]}")
    least_bits = {"k": min_bits if min_key_bits is None else min_key_bits, "v": min_bits}
    scanned_at = {"k": scan_bits, "v": scan_bits if value_scan_bits is None else value_scan_bits}
    missing = sorted({*range(min(least_bits.values()), max_bits + 1), *scanned_at.values()} - set(distortion))
    if missing:
        raise ValueError(f"distortion has no entry for {missing} bits")
    sides = [((layer, side), max(loss, floor), tokens[layer]) for side, losses in zip(SIDES, (key_loss, value_loss)) for layer, loss in enumerate(losses)]
    total = sum(n for _, _, n in sides)
    uniform = {name: key_bits if name[1] == "k" else value_bits for name, _, _ in sides}
    grain = max(1, max(tokens) // 64)  # token counts in units of `grain` (rounded up), so the table stays small
    units = [-(-n // grain) for _, _, n in sides]
    capacity = sum(u * uniform[name] for (name, _, _), u in zip(sides, units))  # the uniform bits' cost
    # best[c]: the least loss of the sides so far within c units of token-bits; pick[i][c]: side i's bits there
    best = np.zeros(capacity + 1)
    picks = []
    for (name, s, _), u in zip(sides, units):
        least = max(held[name[1]].get(name[0], least_bits[name[1]]), least_bits[name[1]])
        choices = np.arange(least, max_bits + 1) if name[1] in move else np.array([uniform[name]])
        options = np.full((len(choices), capacity + 1), np.inf)
        for j, b in enumerate(choices):
            cost = u * int(b)
            if cost <= capacity:
                options[j, cost:] = best[: capacity + 1 - cost] + s * distortion[int(b)] / distortion[scanned_at[name[1]]]
        picks.append((choices, options.argmin(axis=0)))
        best = options.min(axis=0)
    if not np.isfinite(best[capacity]):
        raise ValueError(f"no allocation within {min_bits}..{max_bits} bits fits the budget of k{key_bits}v{value_bits}")
    bits, c = {}, capacity
    for (name, _, _), u, (choices, pick) in reversed(list(zip(sides, units, picks))):
        b = int(choices[pick[c]])
        bits[name] = b
        c -= u * b

    def loss_of(bits: dict) -> float:
        return sum(s * distortion[bits[name]] / distortion[scanned_at[name[1]]] for name, s, _ in sides)

    def spent(bits: dict) -> int:
        return sum(n * bits[name] for name, _, n in sides)

    return Allocation(bits, spent(bits) / total, loss_of(bits), loss_of(uniform))


def allocate_from_recipe(recipe: dict, model_config, key_bits: int, value_bits: int, root: str | Path = ".") -> Allocation:
    """The allocation `allocate` makes from its arguments as a profile's "recipes" record them: the scans' paths (relative
    to `root`), "metric", "scan_bits", "value_scan_bits", "codes", "min_bits", "max_bits", "min_key_bits", "floor",
    "move", "hold_keys", "hold_values" and "window" (the tokens per layer at the end of a window of this many); recipes
    written before "value_scan_bits" and "hold_values" existed (SmolLM2's) scanned both sides at "scan_bits" and held
    no values."""
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    value_scan_bits = recipe.get("value_scan_bits")
    scanned = (recipe["scan_bits"], value_scan_bits or recipe["scan_bits"])
    least = min(recipe["min_bits"], recipe["min_key_bits"] or recipe["min_bits"], *scanned)
    distortion = code_distortion(head_dim, recipe["codes"], range(least, max(recipe["max_bits"], *scanned) + 1))
    keys, values = (scan_losses(str(Path(root) / recipe[side]), recipe["metric"]) for side in ("keys", "values"))
    return allocate_bits(keys, values, tokens_per_layer(model_config, recipe["window"]), distortion, key_bits, value_bits,
                         recipe["scan_bits"], recipe["min_bits"], recipe["max_bits"], recipe["floor"], recipe["move"],
                         recipe["min_key_bits"], parse_hold(recipe["hold_keys"]), value_scan_bits, parse_hold(recipe.get("hold_values", [])))


def parse_hold(items) -> tuple[int, ...] | dict[int, int]:
    """`--hold-keys` / `--hold-values` (and a profile recipe's "hold_keys" / "hold_values"): '19,14:5' or [19, "14:5"]
    -> layers held at the preset's bits of that side, or {layer: least bits} where any entry names its bits (layer 19
    then at key bits is given as '19:4')."""
    entries = [str(i).strip() for i in (items.split(",") if isinstance(items, str) else items) if str(i).strip()]
    try:
        if not any(":" in e for e in entries):
            return tuple(int(e) for e in entries)
        return {int(layer): int(bits) for layer, bits in (e.split(":") for e in entries)}
    except ValueError:
        raise ValueError(f"a hold is layers, or layer:bits, separated by commas (e.g. 19 or 14:5,19:4); got {items!r}") from None


def hold_list(text: str) -> list[int | str]:
    """A `--hold-keys` / `--hold-values` argument as a profile's recipe records it: '19,14:5' -> [19, "14:5"]."""
    return [int(i) if i.strip().isdigit() else i.strip() for i in text.split(",") if i.strip()]


def tokens_per_layer(model_config, window: int) -> list[int]:
    """Tokens each decoder layer holds at the end of a window: the window, or a sliding layer's window − 1."""
    from tqpatch.layer_profiles import text_config

    config = text_config(model_config)
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    sliding = getattr(config, "sliding_window", None)
    return [min(window, sliding - 1) if kind == "sliding_attention" and sliding else window for kind in types]


METRICS = ("ppl", "kl")
CODES = ("lloyd-max", "trellis")


def scan_losses(path: str, metric: str = "ppl") -> list[float]:
    """Each scan setting's loss, in order (the baseline row first in the file): ΔPPL in % ("ppl") or the mean KL to
    the baseline per token in millinats ("kl"; the scan must have run with `--kl`)."""
    import json

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    rows = json.loads(Path(path).read_text())["rows"]
    if metric == "kl":
        missing = [row["setting"] for row in rows[1:] if row.get("kl") is None]
        if missing:
            raise ValueError(f"{path} has no KL for {missing[:3]}...: run the scan with `tqpatch eval ppl --kl`")
        return [1000 * row["kl"] for row in rows[1:]]
    return [100 * (row["ppl"] / rows[0]["ppl"] - 1) for row in rows[1:]]


def code_distortion(head_dim: int, codes: str, bits: range) -> dict[int, float]:
    """bits -> D(bits), the unit-vector MSE of the code the allocation is for: Lloyd-Max codebooks or trellis codes."""
    if codes not in CODES:
        raise ValueError(f"codes must be one of {CODES}, got {codes!r}")
    if codes == "trellis":
        from tqpatch import trellis

        return {b: trellis.unit_vector_mse(head_dim, b) for b in bits}
    from tqpatch.codebook import get_codebook

    return {b: get_codebook(head_dim, b).unit_vector_mse for b in bits}


def plot_scan(key_loss: list[float], value_loss: list[float], settings: list[str], path: str, title: str, unit: str,
              full_layers: tuple[int, ...] = ()) -> Path:
    """Bars of each layer's key and value loss from a scan, and under them the key/value bits each of `settings`
    gives each layer (one row of numbers per setting, named 'label' where given as 'label=spec'); `full_layers` are
    marked on the axis."""
    from eval.plotting import pyplot, save_figure
    from tqpatch.config import TurboQuantConfig

    plt = pyplot()
    layers = np.arange(len(key_loss))
    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.bar(layers - 0.2, key_loss, 0.4, label="keys")
    ax.bar(layers + 0.2, value_loss, 0.4, label="values")
    ax.set_xticks(layers, [f"{i}\nfull" if i in full_layers else str(i) for i in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel(f"this side alone ({unit})")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left")
    top = max(max(key_loss), max(value_loss))
    step = 0.1 * top  # one row of bits under the bars
    ax.set_ylim(-step * (1 + 1.2 * len(settings)), 1.1 * top)
    ax.set_xlim(-3.2, len(layers) - 0.5)
    ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= 1.1 * top])
    for row, entry in enumerate(settings):
        label, _, spec = entry.rpartition("=")
        config = TurboQuantConfig.from_spec(spec)
        y = -step * (0.8 + 1.2 * row)
        ax.text(-3.0, y, f"{label or f'k{config.key_bits:g}v{config.value_bits:g}'} bits:", fontsize=7, va="center")
        for layer in layers:
            bits = config.layer_bits(int(layer), len(layers))
            if bits is not None:
                ax.text(layer, y, f"{bits[0]:g}/{bits[1]:g}", fontsize=7, ha="center", va="center")
    ax.axhline(0, color="black", linewidth=0.5)
    fig.tight_layout()
    return save_figure(fig, Path(path), dpi=120)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from dataclasses import replace

    from tqpatch.config import TurboQuantConfig
    from tqpatch.layer_profiles import base_key, write_profile
    from tqpatch.models import load_model

    parser = argparse.ArgumentParser(prog="python -m tqpatch.eval.layer_bits", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    scan = sub.add_parser("scan", help="print the scan's settings for one side (feed them to tqpatch eval ppl --settings)")
    scan.add_argument("--layers", type=int, required=True)
    scan.add_argument("--side", choices=SIDES, required=True)
    scan.add_argument("--base", default="s4-ck-sv-tkv-qsd-n8")
    scan.add_argument("--scan-bits", type=int, default=2)
    alloc = sub.add_parser("allocate", help="per-layer bits from the two scans' JSON; prints the setting (add the base's options)")
    alloc.add_argument("--keys", required=True)
    alloc.add_argument("--values", required=True)
    alloc.add_argument("--model", default="smollm2")
    alloc.add_argument("--window", type=int, default=2048)
    alloc.add_argument("--key-bits", type=int, required=True)
    alloc.add_argument("--value-bits", type=int, required=True)
    alloc.add_argument("--scan-bits", type=int, default=2)
    alloc.add_argument("--value-scan-bits", type=int, default=None, help="the values' scan bits, if not --scan-bits")
    alloc.add_argument("--min-bits", type=int, default=3)
    alloc.add_argument("--max-bits", type=int, default=6)
    alloc.add_argument("--min-key-bits", type=int, default=None, help="the keys' least bits (default --min-bits)")
    alloc.add_argument("--hold-keys", default="", help="comma-separated layers whose keys keep at least --key-bits, or layer:bits "
                       "with their least bits (e.g. a layer a needle lookup runs through, found with eval needle_margins)")
    alloc.add_argument("--hold-values", default="", help="the same for values: layers whose values keep at least --value-bits, or layer:bits")
    alloc.add_argument("--metric", choices=METRICS, default="ppl", help="the scans' loss: ΔPPL %% or KL (millinats)")
    alloc.add_argument("--codes", choices=CODES, default="trellis", help="the code whose D(bits) models the loss")
    alloc.add_argument("--floor", type=float, default=None, help="least loss per side (default 0.05 for ppl, 0 for kl)")
    alloc.add_argument("--move", choices=("kv", "k", "v"), default="kv", help="which sides' bits may change")
    alloc.add_argument("--write-profile", metavar="JSON", help="also add the allocation to this model's profile file (e.g. "
                       "codebooks/layer_bits/<model>.json), which settings with -Bt read")
    plot = sub.add_parser("plot", help="bars of the two scans' losses per layer, with the bits of the given settings under them")
    plot.add_argument("--keys", required=True)
    plot.add_argument("--values", required=True)
    plot.add_argument("--metric", choices=METRICS, default="kl")
    plot.add_argument("--settings", default="", help="comma-separated specs (or label=spec) whose per-layer key/value bits to print")
    plot.add_argument("--title", default="")
    plot.add_argument("--full-layers", default="", help="comma-separated full-attention layers to mark, e.g. 5,11,17")
    plot.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "plot":
        unit = "ΔPPL %" if args.metric == "ppl" else "KL, millinats per token"
        settings = [spec for spec in args.settings.split(",") if spec]
        full = tuple(int(i) for i in args.full_layers.split(",") if i)
        print(plot_scan(scan_losses(args.keys, args.metric), scan_losses(args.values, args.metric), settings, args.out, args.title, unit, full))
        return
    if args.command == "scan":
        print(",".join(scan_settings(args.base, args.layers, args.side, args.scan_bits)))
        return
    model, _ = load_model(args.model)
    recipe = {"keys": args.keys, "values": args.values, "metric": args.metric, "scan_bits": args.scan_bits, "value_scan_bits": args.value_scan_bits,
              "codes": args.codes, "min_bits": args.min_bits, "max_bits": args.max_bits, "min_key_bits": args.min_key_bits,
              "floor": args.floor if args.floor is not None else (0.05 if args.metric == "ppl" else 0.0), "move": args.move,
              "hold_keys": hold_list(args.hold_keys), "hold_values": hold_list(args.hold_values), "window": args.window}
    result = allocate_from_recipe(recipe, model.config, args.key_bits, args.value_bits)
    unit = "%" if args.metric == "ppl" else " millinats"
    print(f"uniform k{args.key_bits}v{args.value_bits}: predicted {result.uniform_loss:.3f}{unit}; "
          f"allocated: {result.average_bits:.3f} bits, predicted {result.predicted_loss:.3f}{unit}")
    allocated = TurboQuantConfig(key_bits=args.key_bits, value_bits=args.value_bits, layer_bits_overrides=result.overrides(args.key_bits, args.value_bits))
    print(allocated.name)
    if args.write_profile:
        base = base_key(replace(allocated, trellis_keys=args.codes == "trellis", trellis_values=args.codes == "trellis"))
        options = allocated.name.split("-", 1)[1] if "-" in allocated.name else ""
        if not options:
            print(f"the allocation keeps uniform bits: nothing written to {args.write_profile}")
            return
        write_profile(args.write_profile, args.model, model.config, base, options, recipe=recipe)  # the file's "source" stays as written
        print(f"{args.write_profile}: {base} = {options}")


if __name__ == "__main__":
    main()

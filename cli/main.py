"""`tqpatch` command line: a thin click layer over the library and eval/."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tqpatch.codebook import DEFAULT_TOLERANCE, SHIPPED_BITS, SHIPPED_DIMS, build_codebook, codebook_dir, save_codebook


def _int_list(ctx, param, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="tqpatch")
def main() -> None:
    """TurboQuant KV-cache compression for Hugging Face models."""


@main.command("build-codebooks")
@click.option("--dims", default=",".join(map(str, SHIPPED_DIMS)), callback=_int_list, help="Comma-separated head dimensions d.")
@click.option("--bits", default=",".join(map(str, SHIPPED_BITS)), callback=_int_list, help="Comma-separated bit widths (1..8).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Output folder [default: the shipped codebooks/ folder].")
@click.option("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="Lloyd-Max stopping tolerance (largest centroid move, units of 1/√d).")
@click.option("--trellis", is_flag=True, help="Fit the trellis codebooks (tqpatch/trellis.py) for --bits instead (one per width, any d; --dims is ignored).")
@click.option("--iterations", type=int, default=40, help="With --trellis: Viterbi + centroid rounds per codebook.")
def build_codebooks(dims: tuple[int, ...], bits: tuple[int, ...], out_dir: Path | None, tolerance: float, trellis: bool, iterations: int) -> None:
    """Solve the Lloyd-Max codebooks for each (d, bits) and write them as .safetensors."""
    from tqdm import tqdm

    if trellis:
        _build_trellis(bits, out_dir, iterations)
        return
    for b in bits:
        if b not in SHIPPED_BITS:
            raise click.BadParameter(f"bits must be in 1..8, got {b}", param_hint="--bits")
    for d in dims:
        if d < 3:
            raise click.BadParameter(f"head dimension must be >= 3, got {d}", param_hint="--dims")
    folder = out_dir or codebook_dir()
    pairs = [(d, b) for d in dims for b in bits]
    for d, b in tqdm(pairs, desc="codebooks", unit="book"):
        save_codebook(build_codebook(d, b, tolerance), folder)
    click.echo(f"wrote {len(pairs)} codebooks to {folder}")


def _build_trellis(bits: tuple[int, ...], out_dir: Path | None, iterations: int) -> None:
    from tqdm import tqdm

    from tqpatch.codebook import get_codebook
    from tqpatch.trellis import TRELLIS_BITS, TRELLIS_STATE_BITS, fit_trellis, save_trellis

    bits = tuple(b for b in bits if b in TRELLIS_BITS) if bits == SHIPPED_BITS else bits
    for b in bits:
        if b not in TRELLIS_BITS:
            raise click.BadParameter(f"trellis codes take bits in {list(TRELLIS_BITS)}, got {b}", param_hint="--bits")
    for b in bits:
        with tqdm(total=iterations, desc=f"trellis {b} bits", unit="round") as bar:
            book = fit_trellis(b, TRELLIS_STATE_BITS[b], iterations, progress=lambda i, mse: (bar.set_postfix(mse=f"{mse:.5f}"), bar.update()))
        path = save_trellis(book, out_dir)
        lloyd = get_codebook(64, b).unit_vector_mse
        click.echo(f"{path.name}: MSE {book.mse:.5f} per N(0,1) coordinate; Lloyd-Max at d 64 {lloyd:.5f} ({lloyd / book.mse:.2f}x)")


@main.group("eval")
def eval_group() -> None:
    """Measure quality: distortion, perplexity, needle in a haystack."""


@eval_group.command("distortion")
@click.option("--head-dim", "-d", type=int, default=128, help="Vector dimension d.")
@click.option("--bits", default="1,2,3,4", callback=_int_list, help="Comma-separated bit widths.")
@click.option("--num-vectors", "-n", type=int, default=20_000, help="Random unit vectors to quantize.")
@click.option("--seed", type=int, default=0, help="Seed for the vectors and the quantizers.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"), help="Folder for the JSON and PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option("--trellis", is_flag=True, help="Also TurboQuant_mse with trellis codes (1-6 bits; tqpatch/trellis.py).")
def eval_distortion(head_dim: int, bits: tuple[int, ...], num_vectors: int, seed: int, out_dir: Path, as_json: bool, trellis: bool) -> None:
    """MSE and inner-product error of TurboQuant_mse/prod vs. the paper's bounds."""
    from tqpatch.eval.distortion import measure_distortion, write_distortion

    for b in bits:
        if b not in SHIPPED_BITS:
            raise click.BadParameter(f"bits must be in 1..8, got {b}", param_hint="--bits")
    if head_dim < 3:
        raise click.BadParameter(f"head dimension must be >= 3, got {head_dim}", param_hint="--head-dim")
    result = measure_distortion(head_dim, bits, num_vectors, seed, trellis)
    paths = write_distortion(result, out_dir)
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else result.table())
    click.echo(f"wrote {paths['json']} and {paths['png']}", err=as_json)


def _register_subcommands() -> None:
    """Commands that live in their own modules (one module per command family)."""
    import importlib

    for module_name in ("tqpatch.cli.generate", "tqpatch.cli.eval_commands", "tqpatch.cli.bench"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(main, eval_group)


_register_subcommands()

if __name__ == "__main__":
    main()

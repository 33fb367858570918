"""Evaluation text: a local file, the shared WikiText-2 copy, or the `datasets` hub copy."""

from __future__ import annotations

import os
from pathlib import Path

WIKITEXT_FILE = "wikitext-2-raw-test.txt"
DATASETS = ("wikitext",)


class DataError(ValueError):
    """The text could not be loaded; the message says why and what to do."""


def default_text_file() -> Path | None:
    """The shared WikiText-2 test text when run from the repo (../shared/data beside the checkout), else None."""
    repo = Path(__file__).resolve().parents[1]
    for folder in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"):
        if (folder / WIKITEXT_FILE).is_file():
            return folder / WIKITEXT_FILE
    return None


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file; CRLF line ends become blank lines.

    The shared WikiText-2 copy has CRLF line ends and its blank lines dropped;
    `.replace("\\r\\n", "\\n\\n")` gives text close to the `datasets` copy's
    "\\n\\n".join(lines) (see ../shared/data/README.md).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    return path.read_text(encoding="utf-8").replace("\r\n", "\n\n")


def load_dataset_text(name: str) -> str:
    """The test split of a hub dataset as one string ("wikitext": wikitext-2-raw-v1, lines joined by blank lines)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)} (or pass --text-file)")
    try:
        import datasets

        data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:  # offline, hub unreachable, package missing: one clear sentence
        raise DataError(
            f"could not load the {name!r} dataset from the Hugging Face hub ({type(exc).__name__}); "
            "pass --text-file PATH instead (e.g. ../shared/data/wikitext-2-raw-test.txt)"
        ) from exc
    return "\n\n".join(data["text"])


def load_text(text_file: str | Path | None = None, dataset: str | None = None) -> tuple[str, str]:
    """(text, source label): `text_file`, else `dataset`, else the shared WikiText-2 file (labelled by its path
    relative to the working directory, so results written from the repo name no path of this machine)."""
    if text_file is not None and dataset is not None:
        raise DataError("give either a text file or a dataset, not both")
    if dataset is not None:
        return load_dataset_text(dataset), f"datasets:{dataset}"
    if text_file is None:
        text_file = default_text_file()
        if text_file is None:
            raise DataError(f"no text given and the shared {WIKITEXT_FILE} was not found beside the repo; pass --text-file PATH or --dataset wikitext")
        return read_text_file(text_file), os.path.relpath(text_file)
    return read_text_file(text_file), str(text_file)

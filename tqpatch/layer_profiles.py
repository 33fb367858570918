"""Bits per layer made for one model: shipped profiles, used by settings with `tuned_layer_bits` (spec "-Bt").

A layer-side (the keys or the values of one layer) that loses more at b bits should get more bits than one that
loses little. How much each loses depends on the model's weights, so the bits per layer are measured once per model
(`eval/layer_bits.py`: a KL scan with one layer-side at a time compressed, then the allocation that keeps the uniform
setting's bits; README, "Bits per layer from a KL scan") and shipped as a profile, one JSON file per model under
codebooks/layer_bits/:

    {"model": "gemma3-270m",
     "match": {"model_type": "gemma3_text", "num_hidden_layers": 18, ...},     # the model's config fields
     "settings": {"k4v4-tkv": "B0k3v4-B1.3.4k4v3-...", "k4v3-tkv": ""},      # base -> the -B options ("": uniform)
     "recipes": {"k4v4-tkv": {"keys": "docs/data/...json", "min_bits": 3, ...}},  # optional: base -> the
                                                          # `layer_bits allocate` arguments that made its options
     "source": "where the scan and the measurements are"}

A profile applies to a model whose config has every field in "match" (its shape: a fine-tune of the same base
shares it) and to a setting whose base, `base_key(config)` (its bits and whether its codes are trellis codes), is
listed. `resolve(config, model_config)` turns "-Bt" into the explicit `layer_bits_overrides`; where no profile
applies, it keeps uniform bits and warns, naming the profiles there are.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from .config import TurboQuantConfig

MATCH_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "sliding_window")  # a profile's "match", where set


@dataclass(frozen=True)
class LayerProfile:
    """One model's bits per layer: `settings` maps a base key ("k4v4-tkv") to its "-B..." options."""

    model: str
    match: dict
    settings: dict
    source: str = ""
    recipes: dict = field(default_factory=dict)  # base -> the allocate arguments that made it (scans, min bits, ...)

    def matches(self, model_config) -> bool:
        return all(getattr(model_config, name, None) == value for name, value in self.match.items())


def profiles_folder() -> Path:
    """codebooks/layer_bits/ (the repo's, or tqpatch/codebooks/layer_bits/ when installed)."""
    from .codebook import codebook_dir

    return codebook_dir() / "layer_bits"


@lru_cache(maxsize=None)
def _load_folder(folder: str) -> tuple[LayerProfile, ...]:
    profiles = []
    for path in sorted(Path(folder).glob("*.json")):
        data = json.loads(path.read_text())
        missing = [key for key in ("model", "match", "settings") if key not in data]
        if missing:
            raise ValueError(f"layer-bits profile {path} lacks {', '.join(missing)}")
        profiles.append(LayerProfile(data["model"], dict(data["match"]), dict(data["settings"]), data.get("source", ""), dict(data.get("recipes", {}))))
    return tuple(profiles)


def shipped_profiles(folder: str | Path | None = None) -> tuple[LayerProfile, ...]:
    return _load_folder(str(folder or profiles_folder()))


def text_config(model_config):
    """The decoder's config (a multimodal model's text_config), where layer counts and head shapes live."""
    if hasattr(model_config, "get_text_config"):
        return model_config.get_text_config(decoder=True)
    return getattr(model_config, "text_config", model_config)


def fingerprint(model_config) -> dict:
    """The fields of `MATCH_FIELDS` the model's config sets: what a profile made on this model matches."""
    config = text_config(model_config)
    return {name: getattr(config, name) for name in MATCH_FIELDS if getattr(config, name, None) is not None}


def write_profile(path: str | Path, model: str, model_config, base: str, options: str, source: str = "", recipe: dict | None = None) -> dict:
    """Add (or replace) `base`'s bits per layer ("B0k3v4-B5k5v4...") in the profile file at `path`, made for the
    model whose config is given, with the `recipe` that made them if given; returns the profile as written. A file
    made for another model is refused."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {"model": model, "match": fingerprint(model_config), "settings": {}}
    if data["match"] != fingerprint(model_config):
        raise ValueError(f"{path} is the profile of {data['model']} ({data['match']}), not of this model ({fingerprint(model_config)})")
    if options:
        TurboQuantConfig.from_spec(f"{base.split('-')[0]}-{options}")  # refuse options that do not parse
    data["settings"][base] = options
    if recipe is not None:
        data.setdefault("recipes", {})[base] = recipe
    if source:
        data["source"] = source
    path.write_text(json.dumps(data, indent=2) + "\n")
    _load_folder.cache_clear()
    return data


def base_key(config: TurboQuantConfig) -> str:
    """The part of a setting a profile is keyed by: its bits and codes, e.g. "k4v4-tkv", "k4v3-tkv", "k4v4"."""
    codes = ("k" if config.trellis_keys else "") + ("v" if config.trellis_values else "")
    return f"k{config.key_bits:g}v{config.value_bits:g}" + (f"-t{codes}" if codes else "")


def find_profile(model_config, profiles: tuple[LayerProfile, ...] | None = None) -> LayerProfile | None:
    config = text_config(model_config)
    return next((p for p in (shipped_profiles() if profiles is None else profiles) if p.matches(config)), None)


def resolve(config: TurboQuantConfig, model_config, profiles: tuple[LayerProfile, ...] | None = None) -> TurboQuantConfig:
    """`config` with "-Bt" replaced by the model's shipped bits per layer (or by uniform bits, with a warning, where
    no profile has this model and base). Settings without "-Bt" come back unchanged."""
    if not config.tuned_layer_bits:
        return config
    uniform = replace(config, tuned_layer_bits=False)
    profiles = shipped_profiles() if profiles is None else profiles
    profile = find_profile(model_config, profiles)
    if profile is None:
        shape = text_config(model_config)
        known = ", ".join(f"{p.model} ({', '.join(p.settings)})" for p in profiles) or "none"
        warnings.warn(f"{config.name}: no bits-per-layer profile matches this model ({getattr(shape, 'model_type', '?')}, "
                      f"{getattr(shape, 'num_hidden_layers', '?')} layers); storing uniform bits. Profiles: {known}. "
                      "README, 'Bits per layer shipped per model', says how to make one", stacklevel=3)
        return uniform
    options = profile.settings.get(base_key(config))
    if options is None:
        warnings.warn(f"{config.name}: the {profile.model} profile has no bits per layer for {base_key(config)} "
                      f"(it has {', '.join(profile.settings)}); storing uniform bits", stacklevel=3)
        return uniform
    if not options:  # the profile keeps uniform bits for this base on purpose (its "source" says why)
        return uniform
    overrides = TurboQuantConfig.from_spec(f"k{config.key_bits:g}v{config.value_bits:g}-{options}").layer_bits_overrides
    return replace(uniform, layer_bits_overrides=overrides)

"""Config plumbing: locate `configs/<exp>.py[:preset]`, apply `--config.a.b=v` overrides with type
checks, and fail on unknown keys (naming the closest valid one) before anything is compiled.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections as mlc

from jaxdyn.model import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigKeyError(KeyError):
    """An override names a key the config does not have."""

    def __str__(self):
        return str(self.args[0])


def resolve_config_path(spec: str) -> tuple[Path, str | None]:
    """`path[:preset]` -> (existing file, preset): cwd, then repo root, then packaged configs."""
    path, _, preset = spec.partition(":")
    tried = [Path(path), REPO_ROOT / path, Path(__file__).parent / "configs" / Path(path).name]
    for cand in tried:
        if cand.is_file():
            return cand.resolve(), preset or None
    raise FileNotFoundError(f"config {path!r} not found; tried: " + ", ".join(map(str, tried)))


def load_config(spec: str, overrides: Sequence[str] = ()) -> mlc.ConfigDict:
    """Load `get_config(preset)` from the file, apply overrides, lock the result."""
    path, preset = resolve_config_path(spec)
    root = str(path.parent.parent)
    if root not in sys.path:  # lets configs/x.py import configs.standard
        sys.path.insert(0, root)
    mod_spec = importlib.util.spec_from_file_location(f"_jaxdyn_config_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    cfg = module.get_config(preset) if preset else module.get_config()
    cfg.config_file = f"{path}{':' + preset if preset else ''}"
    apply_overrides(cfg, overrides)
    cfg.lock()
    return cfg


def all_keys(cfg: mlc.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, mlc.ConfigDict):
            keys.extend(all_keys(v, full + "."))
    return keys


def parse_value(text: str, old):
    """Parse an override string into the type of the field it replaces."""
    if isinstance(old, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(old, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"cannot parse {text!r} as {type(old).__name__}") from None
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, tuple | list) and isinstance(value, tuple | list):
        return type(old)(value)
    if old is not None and not isinstance(value, type(old)):
        raise ValueError(f"expected {type(old).__name__}, got {type(value).__name__} {text!r}")
    return value


def apply_overrides(cfg: mlc.ConfigDict, overrides: Sequence[str]) -> None:
    """`a.b=v` (or `--config.a.b=v`) items; unknown keys and wrong types raise at once."""
    valid = all_keys(cfg)
    for item in overrides:
        key, sep, text = item.removeprefix("--").removeprefix("config.").partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like --config.train.lr=3e-4")
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigKeyError(f"unknown config key {key!r}{hint}")
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        try:
            node[leaf] = parse_value(text, node[leaf])
        except (ValueError, TypeError) as e:
            raise ValueError(f"config key {key!r}: {e}") from None


def model_config(cfg: mlc.ConfigDict, vocab_size: int | None = None) -> ModelConfig:
    """The ModelConfig of an experiment config, with the vocabulary raised to fit the tokenizer."""
    d = cfg.model.to_dict()
    if vocab_size is not None and d["vocab_size"] < vocab_size:
        d["vocab_size"] = vocab_size
    return ModelConfig.from_dict(d)


def check_paths_inside(path: str, *roots: str) -> str:
    """Refuse config paths that escape the folders the user named (e.g. `../../etc`)."""
    real = os.path.realpath(path)
    if not any(real == os.path.realpath(r) or real.startswith(os.path.realpath(r) + os.sep)
               for r in roots):
        raise ValueError(f"path {path!r} resolves outside {list(roots)}")
    return real

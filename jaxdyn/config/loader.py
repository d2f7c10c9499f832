"""Config plumbing: locate `configs/<exp>.py[:preset]`, run its `get_config(preset)` and apply
`--config.a.b=v` overrides with type checks (unknown keys name the closest valid one), before
anything is written or compiled. What the keys mean is the trainer's schema
(`jaxdyn.train.schema`).
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

from jaxdyn.config.errors import ConfigKeyError, ConfigValueError

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_config_path(spec: str) -> tuple[Path, str | None]:
    """`path[:preset]` -> (file, preset): cwd, then the repo root, then packaged configs."""
    path, _, preset = spec.partition(":")
    tried = [Path(path), REPO_ROOT / path, Path(__file__).parents[1] / "configs" / Path(path).name]
    for cand in tried:
        if cand.is_file():
            return cand.resolve(), preset or None
    raise FileNotFoundError(f"config {path!r} not found; tried: " + ", ".join(map(str, tried)))


def load_config(spec: str, overrides: Sequence[str] = ()) -> mlc.ConfigDict:
    """`get_config(preset)` of the file with the overrides applied; locked."""
    path, preset = resolve_config_path(spec)
    root = str(path.parent.parent)
    if root not in sys.path:  # lets configs/x.py import configs.presets
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


def unknown_key(key: str, valid: Sequence[str], what: str = "config key") -> ConfigKeyError:
    """The error for an unknown key, naming the closest valid one."""
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigKeyError(f"unknown {what} {key!r}{hint}")


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
    if old is not None and (not isinstance(value, type(old)) or isinstance(value, bool)
                            and not isinstance(old, bool)):
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
            raise unknown_key(key, valid)
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        if isinstance(node[leaf], mlc.ConfigDict):
            raise ConfigValueError(f"config key {key!r} is a block; override its fields")
        try:
            node[leaf] = parse_value(text, node[leaf])
        except (ValueError, TypeError) as e:
            raise ConfigValueError(f"config key {key!r}: {e}") from None


def inside(root: str, path: str) -> str:
    """`path` (absolute, or relative to `root`) as an absolute path; a relative one may not
    escape `root` (e.g. `../../etc`)."""
    if os.path.isabs(path):
        return os.path.realpath(path)
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, path))
    if real != real_root and not real.startswith(real_root + os.sep):
        raise ConfigValueError(f"path {path!r} escapes the folder {root!r}")
    return real

"""Config plumbing (JAX practices §8): locate `configs/<exp>.py[:preset]`, apply
`--config.a.b=v` overrides with type checks, check every key against the trainer's schema
(naming the closest valid key), and `finalize` derived values — all before anything is written
or compiled.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections as mlc

from jaxdyn.config.errors import ConfigKeyError, ConfigValueError

from jaxdyn.model import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[2]

# Keys the trainer reads, per block. `model` is checked by ModelConfig, `data` by DataConfig;
# experiment configs may add their own top-level blocks (e.g. `mtp`), never keys in these.
SCHEMA: dict[str, tuple[str, ...]] = {
    "tokenizer": ("kind", "vocab_size"),
    "train": ("steps", "batch_size", "seq_len", "lr", "warmup_steps", "decay", "min_lr_ratio",
              "weight_decay", "b1", "b2", "eps", "clip_norm", "grad_accum", "loss_chunk",
              "z_loss", "seed", "lr_groups", "trainable", "no_decay", "lora", "stop_at_step"),
    "train.lora": ("enabled", "rank", "alpha", "targets"),
    "eval": ("every", "batches", "causal_mode"),
    "checkpoint": ("every", "keep", "async_save"),
    "log": ("every", "tensorboard", "wandb", "wandb_project"),
    "init": ("checkpoint",),
    "mesh": ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor"),
    "sample": ("prompt", "max_new_tokens", "temperature"),
    "debug": ("transfer_guard", "check_finite", "debug_nans", "strict_rank_promotion"),
}
DECAYS = ("cosine", "linear", "constant")
TOKENIZERS = ("byte", "bpe", "checkpoint")


def resolve_config_path(spec: str) -> tuple[Path, str | None]:
    """`path[:preset]` -> (file, preset): cwd, then the repo root, then packaged configs."""
    path, _, preset = spec.partition(":")
    tried = [Path(path), REPO_ROOT / path, Path(__file__).parents[1] / "configs" / Path(path).name]
    for cand in tried:
        if cand.is_file():
            return cand.resolve(), preset or None
    raise FileNotFoundError(f"config {path!r} not found; tried: " + ", ".join(map(str, tried)))


def load_config(spec: str, overrides: Sequence[str] = ()) -> mlc.ConfigDict:
    """`get_config(preset)` of the file, with overrides applied and keys checked; locked."""
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
    check_keys(cfg)
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


def _unknown(key: str, valid: Sequence[str], what: str = "config key") -> ConfigKeyError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigKeyError(f"unknown {what} {key!r}{hint}")


def check_keys(cfg: mlc.ConfigDict) -> None:
    """Every key of the trainer's blocks is known, and none is missing (typos in config files)."""
    from jaxdyn.data import DataConfig

    schema = {**SCHEMA, "data": tuple(f.name for f in dataclasses.fields(DataConfig))}
    for block, names in schema.items():
        node = cfg
        for part in block.split("."):
            if part not in node:
                raise ConfigKeyError(f"config has no block {block!r}; extend "
                                     "configs/standard.py's base_config")
            node = node[part]
        valid = [f"{block}.{n}" for n in names]
        for k in node:
            if k not in names:
                raise _unknown(f"{block}.{k}", valid)
        missing = [n for n in names if n not in node]
        if missing:
            raise ConfigKeyError(f"config block {block!r} lacks {missing}")
    known = set(schema) | {"model", "preset", "config_file"}
    for k, v in cfg.items():  # a misspelt trainer block, e.g. `chekpoint`
        if k not in known and not isinstance(v, mlc.ConfigDict | dict):
            raise _unknown(k, sorted(known))


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
            raise _unknown(key, valid)
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


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigValueError(msg)


def _check_rules(name: str, rules, pairs: bool) -> None:
    for r in rules:
        pattern = r[0] if pairs else r
        _check(not pairs or (isinstance(r, tuple | list) and len(r) == 2
                             and isinstance(r[1], int | float)),
               f"{name} entries must be (regex, multiplier) pairs, got {r!r}")
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ConfigValueError(f"{name}: bad regex {pattern!r}: {e}") from None


def finalize(cfg: mlc.ConfigDict, *, vocab_size: int | None = None,
             workdir: str | None = None) -> mlc.ConfigDict:
    """A locked copy with derived values set and every value checked (named errors).

    vocab_size: the tokenizer's; `model.vocab_size` is raised to it when smaller.
    workdir: `data.cache_dir` defaults to `<workdir>/cache`; relative paths stay inside it.
    """
    check_keys(cfg)
    out = mlc.ConfigDict(cfg.to_dict())
    t = out.train
    _check(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    _check(t.batch_size >= 1, f"train.batch_size={t.batch_size} must be >= 1")
    _check(t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0,
           f"train.batch_size={t.batch_size} must be a multiple of train.grad_accum="
           f"{t.grad_accum}")
    _check(t.seq_len <= out.model.max_position_embeddings,
           f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings="
           f"{out.model.max_position_embeddings}; lower train.seq_len or raise the limit")
    _check(t.decay in DECAYS, f"train.decay={t.decay!r}; use one of {DECAYS}")
    _check(t.lr >= 0 and t.warmup_steps >= 0 and 0 <= t.min_lr_ratio <= 1,
           "train.lr, train.warmup_steps >= 0 and train.min_lr_ratio in [0, 1]")
    _check(t.loss_chunk >= 1, f"train.loss_chunk={t.loss_chunk} must be >= 1")
    _check(0 <= t.stop_at_step <= t.steps,
           f"train.stop_at_step={t.stop_at_step} must be in [0, train.steps={t.steps}]")
    _check(not t.lora.enabled or t.lora.rank >= 1, "train.lora.rank must be >= 1")
    _check_rules("train.lr_groups", t.lr_groups, pairs=True)
    _check_rules("train.trainable", t.trainable, pairs=False)
    _check_rules("train.no_decay", t.no_decay, pairs=False)
    for key in ("eval.every", "checkpoint.every", "checkpoint.keep", "log.every"):
        block, name = key.split(".")
        _check(out[block][name] >= 1, f"{key}={out[block][name]} must be >= 1")
    _check(out.tokenizer.kind in TOKENIZERS,
           f"tokenizer.kind={out.tokenizer.kind!r}; use one of {TOKENIZERS}")
    _check(out.tokenizer.kind != "checkpoint" or bool(out.init.checkpoint),
           'tokenizer.kind="checkpoint" needs init.checkpoint (an imported model folder)')
    if vocab_size is not None and out.model.vocab_size < vocab_size:
        out.model.vocab_size = int(vocab_size)
    if workdir is not None:
        out.data.cache_dir = inside(workdir, out.data.cache_dir or "cache")
    model_config(out)  # ModelConfig's own checks (unknown field, routing options)
    out.lock()
    return out


def model_config(cfg: mlc.ConfigDict) -> ModelConfig:
    """`cfg.model` as a ModelConfig (unknown fields name the closest valid one)."""
    return ModelConfig.from_dict(cfg.model.to_dict())


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

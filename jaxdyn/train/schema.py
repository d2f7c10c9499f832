"""The typed schema of a training run's config; every default is written once, here.

A run config (`configs/<exp>.py:get_config(preset)`) is an `ml_collections.ConfigDict` of
blocks. Each block is one of the dataclasses in `BLOCKS` (the trainer's own below, the model,
data and feature blocks from their packages); `defaults()` builds a ConfigDict from their
defaults, `check(cfg)` rebuilds every block as its dataclass (unknown keys name the closest
valid one; values are checked by each dataclass) and `finalize` sets derived values.
Blocks in `FREE_BLOCKS` belong to experiment drivers, which check them themselves.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from typing import Any

import ml_collections as mlc

from jaxdyn.config.errors import ConfigKeyError, ConfigValueError
from jaxdyn.config.loader import inside, load_config
from jaxdyn.data import DataConfig
from jaxdyn.data.tokenizer import tokenizer_kinds
from jaxdyn.model import ModelConfig
from jaxdyn.model.routing.options import trained_window
from jaxdyn.multitoken.grid import DynamoOptions
from jaxdyn.multitoken.objective import MultiTokenConfig
from jaxdyn.temporal.batching import Shapes
from jaxdyn.temporal.encoders import TemporalConfig
from jaxdyn.temporal.objective import TemporalLossConfig
from jaxdyn.temporal.synth import SynthConfig

DECAYS = ("cosine", "linear", "constant")


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigValueError(msg)


def _regexes(name: str, rules, pairs: bool) -> None:
    for r in rules:
        _need(not pairs or (isinstance(r, tuple | list) and len(r) == 2
                            and isinstance(r[1], int | float)),
              f"{name} entries must be (regex, multiplier) pairs, got {r!r}")
        pattern = r[0] if pairs else r
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ConfigValueError(f"{name}: bad regex {pattern!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    # byte | bpe (trained on the train split once, saved in <workdir>/tokenizer) | checkpoint
    # (the tokenizer stored with init.checkpoint) | a fixed tokenizer a feature registers
    # (tcg_syllable: jaxdyn.temporal.tokenizer)
    kind: str = "byte"
    vocab_size: int = 258  # size of a trained BPE vocabulary (kind == "bpe")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA (Hu et al. 2021), a low-rank path x·W + (alpha/rank)·(x·A)·B inside the named
    projections (jaxdyn.model.lora); base weights are frozen unless `train.trainable` names
    them."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    objective: str = "lm"  # lm | mtp | temporal (jaxdyn.train.objectives)
    steps: int = 60  # optimizer steps
    batch_size: int = 8  # global batch (sequences per optimizer step)
    seq_len: int = 64  # tokens per row
    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 5  # linear warm-up from 0
    decay: str = "cosine"  # after warm-up: cosine | linear | constant
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.01  # AdamW decoupled decay (not on `no_decay` params)
    b1: float = 0.9  # Adam beta1
    b2: float = 0.999  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    clip_norm: float = 1.0  # global-norm clipping of trainable grads; 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is split)
    loss_chunk: int = 1024  # rows per chunk of the vocabulary-chunked cross-entropy
    z_loss: float = 0.0  # weight of the mean logsumexp² auxiliary loss
    seed: int = 0  # init, LoRA, data order and the objective's randomness
    # ((regex on param path, lr multiplier), ...): first match wins, others get 1.0. Paths look
    # like `layers/attn/q/kernel`, `embed/embedding`, `lora/layers/attn/q/a`.
    lr_groups: tuple = ()
    trainable: tuple[str, ...] = ()  # regexes of trainable params; () = the objective's
    no_decay: tuple[str, ...] = ("norm", "bias", "embed/")  # regexes exempt from decay
    lora: LoraConfig = LoraConfig()
    stop_at_step: int = 0  # > 0: save and exit at this step, keeping the schedule of `steps`

    def __post_init__(self):
        _need(self.steps >= 1, f"train.steps={self.steps} must be >= 1")
        _need(self.batch_size >= 1, f"train.batch_size={self.batch_size} must be >= 1")
        _need(self.grad_accum >= 1 and self.batch_size % self.grad_accum == 0,
              f"train.batch_size={self.batch_size} must be a multiple of train.grad_accum="
              f"{self.grad_accum}")
        _need(self.decay in DECAYS, f"train.decay={self.decay!r}; use one of {DECAYS}")
        _need(self.lr >= 0 and self.warmup_steps >= 0 and 0 <= self.min_lr_ratio <= 1,
              "train.lr, train.warmup_steps >= 0 and train.min_lr_ratio in [0, 1]")
        _need(self.loss_chunk >= 1, f"train.loss_chunk={self.loss_chunk} must be >= 1")
        _need(0 <= self.stop_at_step <= self.steps,
              f"train.stop_at_step={self.stop_at_step} must be in [0, train.steps="
              f"{self.steps}]")
        _need(not self.lora.enabled or self.lora.rank >= 1, "train.lora.rank must be >= 1")
        _regexes("train.lr_groups", self.lr_groups, pairs=True)
        _regexes("train.trainable", self.trainable, pairs=False)
        _regexes("train.no_decay", self.no_decay, pairs=False)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 20  # validate every N steps and at the end
    batches: int = 4  # validation batches; 0 = all
    causal_mode: bool = True  # routed models: also report val_causal/* (causal routers decide)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 30  # save every N steps and at the end
    keep: int = 3  # newest checkpoints kept
    async_save: bool = True  # write in the background while training goes on


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 5  # metrics every N steps and at the last
    tensorboard: bool = True  # also write <workdir>/tensorboard (tensorboardX)
    wandb: bool = False  # also log to Weights & Biases when installed
    wandb_project: str = "jaxdyn"  # W&B project name


@dataclasses.dataclass(frozen=True)
class InitConfig:
    # An imported checkpoint (`python -m conversion import HF_DIR DIR`) or a training workdir;
    # "" = from scratch. A routed model transfers a dense one; features add their parameters.
    checkpoint: str = ""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (jaxdyn/sharding.py); -1 = the remaining devices. Without -1 the first
    data·fsdp·tensor devices are used. dcn_* > 1: a hybrid mesh over slices (TPU
    multi-slice) or processes; data/fsdp/tensor are then the sizes inside one slice."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The sample printed at the end of training (max_new_tokens 0 = none)."""

    prompt: str = "def "
    max_new_tokens: int = 48
    temperature: float = 0.0


@dataclasses.dataclass(frozen=True)
class DebugConfig:
    """Fail-fast switches."""

    transfer_guard: bool = True  # implicit host<->device copies in the step are errors
    check_finite: bool = True  # NonFiniteLossError on a NaN/Inf loss (checked at log/save)
    debug_nans: bool = False  # jax_debug_nans: locate the first NaN (slow)
    strict_rank_promotion: bool = False  # jax_numpy_rank_promotion="raise"


# Blocks every run has, then blocks a feature's configs add (read by its objective).
CORE: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "tokenizer": TokenizerConfig,
    "train": TrainConfig, "eval": EvalConfig, "checkpoint": CheckpointConfig,
    "log": LogConfig, "init": InitConfig, "mesh": MeshConfig, "sample": SampleConfig,
    "debug": DebugConfig,
}
FEATURES: dict[str, type] = {
    "mtp": MultiTokenConfig, "dynamo": DynamoOptions, "temporal": TemporalConfig,
    "synth": SynthConfig, "shapes": Shapes, "temporal_loss": TemporalLossConfig,
}
BLOCKS = {**CORE, **FEATURES}
FREE_BLOCKS = ("experiment",)  # checked by the experiment driver that reads them
SCALARS = ("preset", "config_file")


def block_dict(obj) -> dict[str, Any]:
    """A block dataclass as the plain dict a ConfigDict holds."""
    if isinstance(obj, ModelConfig):
        return obj.to_dict()
    return dataclasses.asdict(obj)


def defaults(*features: str) -> mlc.ConfigDict:
    """The core blocks (and the named feature blocks) with their dataclass defaults."""
    c = mlc.ConfigDict()
    c.preset = ""
    for name in (*CORE, *features):
        c[name] = mlc.ConfigDict(block_dict(BLOCKS[name]()))
    return c


def _unknown(key: str, valid: Sequence[str]) -> ConfigKeyError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigKeyError(f"unknown config key {key!r}{hint}")


def _build(cls, name: str, values: dict):
    """`cls(**values)` with nested dataclass fields built too; unknown keys name the closest."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in values:
        if k not in fields:
            raise _unknown(f"{name}.{k}", [f"{name}.{f}" for f in fields])
    if cls is ModelConfig:
        return ModelConfig.from_dict(values)
    kw = {}
    for k, v in values.items():
        default = fields[k].default
        if dataclasses.is_dataclass(default):
            v = _build(type(default), f"{name}.{k}", dict(v))
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    try:
        return cls(**kw)
    except TypeError as e:
        raise ConfigValueError(f"config block {name!r}: {e}") from None


def check(cfg: mlc.ConfigDict) -> dict[str, Any]:
    """Every block as its dataclass ({name: instance}); raises ConfigKeyError for unknown keys
    or blocks and ConfigValueError (or the block's own error) for bad values."""
    out = {}
    for name in CORE:
        if name not in cfg:
            raise ConfigKeyError(f"config has no block {name!r}; start from "
                                 "jaxdyn.train.schema.defaults() (configs/presets.py does)")
    for name, value in cfg.items():
        if name in BLOCKS:
            out[name] = _build(BLOCKS[name], name, value.to_dict() if hasattr(value, "to_dict")
                               else dict(value))
        elif name not in FREE_BLOCKS and name not in SCALARS:
            raise _unknown(name, [*BLOCKS, *FREE_BLOCKS, *SCALARS])
    kinds = tokenizer_kinds()
    _need(out["tokenizer"].kind in kinds,
          f"tokenizer.kind={out['tokenizer'].kind!r}; use one of {kinds}")
    t, m = out["train"], out["model"]
    _need(t.seq_len <= m.max_position_embeddings,
          f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings="
          f"{m.max_position_embeddings}; lower train.seq_len or raise the limit")
    for key in ("eval.every", "checkpoint.every", "checkpoint.keep", "log.every"):
        block, field = key.split(".")
        _need(getattr(out[block], field) >= 1,
              f"{key}={getattr(out[block], field)} must be >= 1")
    return out


def load(spec: str, overrides: Sequence[str] = ()) -> mlc.ConfigDict:
    """`configs/<exp>.py[:preset]` with `--config.a.b=v` overrides, checked; locked."""
    cfg = load_config(spec, overrides)
    check(cfg)
    return cfg


def finalize(cfg: mlc.ConfigDict, *, vocab_size: int | None = None,
             workdir: str | None = None) -> mlc.ConfigDict:
    """A checked, locked copy with derived values set.

    vocab_size: the tokenizer's; `model.vocab_size` is raised to it when smaller.
    workdir: `data.cache_dir` defaults to `<workdir>/cache`; relative paths stay inside it.
    """
    check(cfg)
    _need(cfg.tokenizer.kind != "checkpoint" or bool(cfg.init.checkpoint),
          'tokenizer.kind="checkpoint" needs init.checkpoint (an imported model folder)')
    out = mlc.ConfigDict(cfg.to_dict())
    if vocab_size is not None and out.model.vocab_size < vocab_size:
        out.model.vocab_size = int(vocab_size)
    if workdir is not None:
        out.data.cache_dir = inside(workdir, out.data.cache_dir or "cache")
    check(out)
    out.lock()
    return out


def model_config(cfg: mlc.ConfigDict) -> ModelConfig:
    """`cfg.model` as a ModelConfig (unknown fields name the closest valid one).

    A DTF model's MA window is fixed here to min(ma_window, train.seq_len)
    (`routing.options.trained_window`, docs/features/routing.md §4.3)."""
    d = cfg.model.to_dict()
    if "train" in cfg:
        d["routing"] = trained_window(d.get("arch", "dense"), dict(d.get("routing") or {}),
                                      cfg.train.seq_len)
    return ModelConfig.from_dict(d)

"""Training objectives behind one interface, so the trainer never names a feature.

`make_objective(cfg)` builds the objective that `train.objective` names. An objective gives:

- `model(routing_mode)`: the decoder trunk with the feature's extensions attached;
- `extend_params(params, rng)` -> (params, report lines): the feature's own parameters added
  to a trunk tree that was initialised at random, loaded from `init.checkpoint` or transferred
  (the tree `model()` initialises has the same paths);
- `loss(model, variables, batch, rng)` -> (loss, stats, aux): `stats` holds fp32 scalars with
  at least `nll`, `accuracy` and `tokens` (validation reports their token-weighted mean) plus
  the objective's own metrics (`mtp/loss_2`, `temporal/js`, …); `aux` is the per-unit
  `{"losses", "metrics"}` of the trunk (router statistics of routed units);
- `data(tok, rows, process_index, process_count)` -> (iterator of this process's
  `rows // process_count` rows per micro-batch, with `state()`/`restore()`, and this
  process's rows of the validation batches);
- `trainable`: regexes of the trainable parameters when `train.trainable` is empty;
- `sample(params, tok)` -> text or None, printed when training ends.

`lm` (next-token prediction, dense or routed) lives here; `mtp` and `temporal` live in their
feature packages and are listed in `OBJECTIVES`.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from jaxdyn import sharding
from jaxdyn.data import text_data
from jaxdyn.decode.generate import prompt_sample
from jaxdyn.model import ModelConfig, build
from jaxdyn.model.loss import lm_loss, unit_losses
from jaxdyn.multitoken.objective import MultiTokenObjective
from jaxdyn.temporal.objective import TemporalObjective


class Objective(Protocol):
    trainable: tuple[str, ...]

    def model(self, routing_mode: str = "topk") -> Any: ...

    def extend_params(self, params: dict, rng: jax.Array) -> tuple[dict, list[str]]: ...

    def loss(self, model, variables: dict, batch: dict, rng: jax.Array
             ) -> tuple[jax.Array, dict, Any]: ...

    def data(self, tok, rows: int, process_index: int, process_count: int): ...

    def sample(self, params: dict, tok) -> str | None: ...


class LanguageModel:
    """Next-token cross-entropy (chunked over the vocabulary) plus the routed units' weighted
    auxiliary losses; text batches from `cfg.data`."""

    trainable: tuple[str, ...] = ()

    def __init__(self, cfg: mlc.ConfigDict, mcfg: ModelConfig | None = None):
        self.cfg, self.mcfg = cfg, mcfg or ModelConfig.from_dict(cfg.model.to_dict())

    def model(self, routing_mode: str = "topk"):
        return build(self.mcfg, routing_mode)

    def extend_params(self, params: dict, rng: jax.Array) -> tuple[dict, list[str]]:
        return params, []

    def loss(self, model, variables: dict, batch: dict, rng: jax.Array):
        t = self.cfg.train
        out = model.apply(variables, batch["tokens"], batch["positions"], batch["segment_ids"],
                          compute_logits=False)
        lm, stats = lm_loss(out.hidden, out.unembed, batch["tokens"], batch["segment_ids"],
                            chunk=t.loss_chunk, z_loss=t.z_loss)
        stats = {k: stats[k] for k in ("nll", "accuracy", "tokens")}
        return lm + unit_losses(out.aux), stats, out.aux

    def data(self, tok, rows: int, process_index: int, process_count: int):
        return text_data(self.cfg, tok, rows, process_index, process_count)

    def sample(self, params: dict, tok) -> str | None:
        return prompt_sample(self.cfg.sample, self.mcfg, params, tok)


def boxed_params(objective: Objective, seq_len: int = 8) -> Any:
    """The objective model's parameter shapes with their logical axes (nothing allocated)."""
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda r, t: objective.model().init(r, t)["params"],
                          jax.random.key(0), tokens)


def random_params(objective: Objective, rng: jax.Array) -> dict:
    """Random parameters of the whole objective model (trunk and feature parameters)."""
    return nn.unbox(objective.model().init(rng, jnp.zeros((1, 8), jnp.int32))["params"])


def param_shardings(objective: Objective, mesh) -> Any:
    """Shardings of the objective model's parameters by the logical-axis rules."""
    return sharding.logical_to_sharding(boxed_params(objective), mesh)


OBJECTIVES = {"lm": LanguageModel, "mtp": MultiTokenObjective, "temporal": TemporalObjective}


def make_objective(cfg: mlc.ConfigDict) -> Objective:
    name = cfg.train.objective
    if name not in OBJECTIVES:
        raise ValueError(f"train.objective={name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](cfg)

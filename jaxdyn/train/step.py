"""The one training step and the validation step, for every objective.

`make_train_step(cfg)` returns the pure `step(state, batch) -> (state, metrics)`: batch
leaves are [grad_accum, b, …]; micro-batch gradients are summed in a `lax.scan` and averaged,
then one optimizer update is applied. Frozen parameters enter the loss behind
`stop_gradient`, so their gradients are never computed. Each micro-batch gets its own key
`fold_in(fold_in(key(train.seed), step), micro)`, so a resumed run draws the same numbers.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

from jaxdyn import sharding
from jaxdyn.model.lora import scaled
from jaxdyn.model.units import flatten_aux
from jaxdyn.train.objectives import Objective, make_objective
from jaxdyn.train.optim import make_schedule, trainable_mask
from jaxdyn.train.state import TrainState, trainable_rules


def variables_of(tree: dict, cfg: mlc.ConfigDict, mask: Any = None) -> dict:
    """Model variables from the optimised tree: params (frozen ones behind stop_gradient when
    `mask` is given) and the LoRA factors scaled by alpha / rank."""
    params = tree["params"]
    if mask is not None:
        params = jax.tree.map(lambda x, k: x if k else jax.lax.stop_gradient(x), params, mask)
    out = {"params": params}
    if tree["lora"]:
        lc = cfg.train.lora
        out["lora"] = scaled(tree["lora"], lc.alpha, lc.rank)
    return out


def make_train_step(cfg: mlc.ConfigDict, objective: Objective | None = None):
    """`step(state, batch) -> (state, metrics)`; metrics are scalars (aux: per unit [U])."""
    objective = objective or make_objective(cfg)
    model = objective.model()
    schedule = make_schedule(cfg.train)
    rules = trainable_rules(cfg, objective)
    seed = cfg.train.seed

    def loss_fn(tree, batch, rng, mask):
        loss, stats, aux = objective.loss(model, variables_of(tree, cfg, mask["params"]),
                                          batch, rng)
        return loss, (stats, aux)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        mask = trainable_mask(state.params, cfg.train, rules)
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        n = jax.tree.leaves(batch)[0].shape[0]

        def micro(carry, xs):
            i, mb = xs
            (loss, (stats, aux)), g = grad_fn(state.params, mb, jax.random.fold_in(key, i), mask)
            return jax.tree.map(jnp.add, carry, g), {"loss": loss, **stats, "aux": aux}

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, outs = jax.lax.scan(micro, zeros, (jnp.arange(n), batch))
        grads = jax.tree.map(lambda g: g / n, grads)
        m = jax.tree.map(lambda x: jnp.mean(x, axis=0), outs)
        m["tokens"] = jnp.sum(outs["tokens"])
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = jax.tree.leaves(mask)
        m["grad_norm"] = optax.tree.norm(
            [g for g, k in zip(jax.tree.leaves(grads), keep, strict=True) if k])
        m["param_norm"] = optax.tree.norm(params)
        m["lr"] = schedule(state.step)
        bad = (state.nonfinite_step < 0) & ~jnp.isfinite(m["loss"])
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         nonfinite_step=jnp.where(bad, state.step + 1, state.nonfinite_step),
                         tx=state.tx)
        return new, m

    return step


def make_eval_step(cfg: mlc.ConfigDict, routing_mode: str = "topk",
                   objective: Objective | None = None):
    """`eval_step(tree, batch) -> (stats, aux)` for one [b, …] batch.

    Routed models evaluate in `routing_mode` "topk" (teacher forcing, as trained) or "causal"
    (the causal routers decide, as in generation)."""
    objective = objective or make_objective(cfg)
    model = objective.model(routing_mode)

    def eval_step(tree, batch):
        _, stats, aux = objective.loss(model, variables_of(tree, cfg), batch,
                                       jax.random.key(0))
        return stats, aux

    return eval_step


def evaluate(eval_fn, tree, batches: list[dict], mesh, prefix: str = "val") -> dict[str, float]:
    """Token-weighted loss (`nll`) and perplexity over the batches, the objective's other
    statistics and the aux metrics averaged over batches: `{prefix}/loss`, `{prefix}/ppl`,
    `{prefix}/<stat>`, `{prefix}/router/...`."""
    total, count, rows = 0.0, 0.0, []
    for b in batches:
        stats, aux = jax.device_get(eval_fn(tree, sharding.shard_batch(b, mesh)))
        total += float(stats["nll"]) * float(stats["tokens"])
        count += float(stats["tokens"])
        extra = {k: float(v) for k, v in stats.items() if k not in ("nll", "tokens")}
        rows.append({**extra, **flatten_aux(aux)})
    loss = total / max(count, 1.0)
    out = {f"{prefix}/loss": loss, f"{prefix}/ppl": math.exp(min(loss, 50.0))}
    for k in rows[0] if rows else ():
        out[f"{prefix}/{k}"] = float(np.mean([r[k] for r in rows]))
    return out

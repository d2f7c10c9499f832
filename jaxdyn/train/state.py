"""The train state and where its pieces live on the mesh.

`TrainState.params` is the optimised tree `{"params": model params, "lora": LoRA factors or
{}}`; the optimizer state mirrors the trainable part of it. Parameters are sharded by the
logical-axis rules (`jaxdyn.sharding`), optimizer moments like the parameters they mirror,
LoRA factors and scalars replicated.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from jaxdyn import sharding
from jaxdyn.model.lora import init_lora
from jaxdyn.train.init import initial_params
from jaxdyn.train.objectives import Objective, make_objective, param_shardings, random_params
from jaxdyn.train.optim import make_optimizer
from jaxdyn.train.setup import make_mesh


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken
    params: Any  # {"params": model params, "lora": LoRA factors or {}}
    opt_state: Any
    nonfinite_step: jax.Array  # first step whose loss was NaN/Inf; -1 while all are finite
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def trainable_rules(cfg: mlc.ConfigDict, objective: Objective) -> tuple[str, ...]:
    """`train.trainable`, or the objective's default when it is empty."""
    return tuple(cfg.train.trainable) or tuple(objective.trainable)


def state_shardings(mesh, param_sh: Any, tree: Any, tx, opt_state: Any) -> TrainState:
    rep = sharding.replicated(mesh)
    tree_sh = {"params": param_sh, "lora": jax.tree.map(lambda _: rep, tree["lora"])}
    masked = lambda x: isinstance(x, optax.MaskedNode)  # other LR groups' slots (lr_groups)
    opt_sh = optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, opt_state, tree_sh,
                                   transform_non_params=lambda _: rep, is_leaf=masked)
    return TrainState(step=rep, params=tree_sh, opt_state=opt_sh, nonfinite_step=rep, tx=tx)


def _lora(cfg: mlc.ConfigDict, params: Any, rng: jax.Array) -> dict:
    lc = cfg.train.lora
    return init_lora(params, lc.targets, lc.rank, rng) if lc.enabled else {}


def create_train_state(cfg: mlc.ConfigDict, rng: jax.Array, *, params: Any = None,
                       mesh=None, objective: Objective | None = None) -> TrainState:
    """Fresh state of a finalized config: `params` (else random / `init.checkpoint`), LoRA
    factors, optimizer state, all placed on `mesh` (default: `cfg.mesh`)."""
    objective = objective or make_objective(cfg)
    mesh = mesh or make_mesh(cfg)
    k_init, k_lora = jax.random.split(rng)
    if params is None:
        params = initial_params(cfg, objective, k_init, mesh)[0]
    tree = {"params": params, "lora": _lora(cfg, params, k_lora)}
    tx, _ = make_optimizer(cfg.train, tree, trainable_rules(cfg, objective))
    sh = state_shardings(mesh, param_shardings(objective, mesh), tree, tx,
                         jax.eval_shape(tx.init, tree))
    tree = {"params": sharding.shard_params(tree["params"], sh.params["params"]),
            "lora": jax.device_put(tree["lora"], sh.params["lora"])}
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(tree)
    scalar = lambda v: jax.device_put(jnp.asarray(v, jnp.int32), sh.step)
    return TrainState(step=scalar(0), params=tree, opt_state=opt_state,
                      nonfinite_step=scalar(-1), tx=tx)


def abstract_train_state(cfg: mlc.ConfigDict, rng: jax.Array, mesh,
                         objective: Objective | None = None) -> TrainState:
    """Shapes, dtypes and shardings of `create_train_state` (a restore target); allocates
    nothing and reads no init checkpoint."""
    objective = objective or make_objective(cfg)
    _, k_lora = jax.random.split(rng)

    def tree_of(r):
        params = random_params(objective, r)
        return {"params": params, "lora": _lora(cfg, params, k_lora)}

    tree = jax.eval_shape(tree_of, rng)
    tx, _ = make_optimizer(cfg.train, tree, trainable_rules(cfg, objective))
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    state = TrainState(step=scalar, params=tree, opt_state=jax.eval_shape(tx.init, tree),
                       nonfinite_step=scalar, tx=tx)
    sh = state_shardings(mesh, param_shardings(objective, mesh), tree, tx, state.opt_state)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        state, sh)

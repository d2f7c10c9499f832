"""Where a run's first parameters come from: random, `init.checkpoint` (an import folder or a
training workdir, either layer layout) or a dense checkpoint transferred into a routed model;
then the objective adds its own parameters (heads, adapters). Mismatches raise a named error
before anything is compiled or written.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from jaxdyn.checkpoint import (
    load_model,
    load_params,
    model_params_shapes,
    params_shapes,
    sharded_target,
)
from jaxdyn.model import (
    ModelConfig,
    dense_to_routed,
    init_params,
    param_shardings,
    stack_layers,
    unstack_layers,
)
from jaxdyn.model.routing.transfer import FREE_FIELDS
from jaxdyn.train.objectives import Objective, random_params
from jaxdyn.train.objectives import param_shardings as objective_shardings
from jaxdyn.train.schema import model_config


class CheckpointMismatchError(ValueError):
    """`init.checkpoint` holds a model that does not fit the configured one."""




def _source(path: str) -> tuple[ModelConfig, Any, Any]:
    """(cfg, param shapes, loader) of an import folder or a training workdir. `loader(target)`
    reads the params; a target tree of sharded ShapeDtypeStructs makes orbax read each
    device's slice straight into its shard (no full copy on any device)."""
    cfg_path = os.path.join(path, "model_config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"init.checkpoint {path!r} has no model_config.json; import a "
                                "Hugging Face folder with `python -m conversion import`")
    icfg = ModelConfig.load(cfg_path)
    if os.path.isdir(os.path.join(path, "params")):
        return icfg, params_shapes(os.path.join(path, "params")), \
            lambda target=None: load_params(os.path.join(path, "params"), target)
    return icfg, model_params_shapes(path), \
        lambda target=None: load_model(path, target=target)[1]


def check_init_checkpoint(cfg: mlc.ConfigDict) -> None:
    """Fail before compiling when `init.checkpoint` cannot initialise the configured model."""
    if not cfg.init.checkpoint:
        return
    path = cfg.init.checkpoint
    if not os.path.isdir(path):
        raise FileNotFoundError(f"init.checkpoint {path!r} is not a folder")
    icfg = ModelConfig.load(os.path.join(path, "model_config.json")) \
        if os.path.exists(os.path.join(path, "model_config.json")) else _source(path)[0]
    mcfg = model_config(cfg)
    free = set(FREE_FIELDS) if icfg.arch == "dense" else FREE_FIELDS - {"arch", "routing"}
    a, b = icfg.to_dict(), mcfg.to_dict()
    diff = {k: (a[k], b[k]) for k in a if k not in free and a[k] != b[k]}
    if diff:
        raise CheckpointMismatchError(
            f"init.checkpoint {path!r} holds a {icfg.family}/{icfg.arch} model that does not "
            f"match the configured {mcfg.family}/{mcfg.arch}: {diff} (checkpoint, configured); "
            "set those model fields to the checkpoint's model_config.json")


def initial_params(cfg: mlc.ConfigDict, objective: Objective, rng: jax.Array,
                   mesh: jax.sharding.Mesh) -> tuple[Any, list[str]]:
    """(params, report): random, or the trunk loaded from `init.checkpoint` (same
    architecture, either layer layout) or transferred from a dense one into a routed model,
    then the objective's own parameters added (`objective.extend_params`).

    Parameters are created in their rules-table shardings: random init runs under
    `jit(out_shardings=...)` and checkpoints are restored by orbax onto sharded
    ShapeDtypeStruct targets, so no device ever holds a full copy of a sharded tensor."""
    k_trunk, k_ext = jax.random.split(rng)
    if not cfg.init.checkpoint:
        with jax.set_mesh(mesh):
            params = jax.jit(lambda r: random_params(objective, r),
                             out_shardings=objective_shardings(objective, mesh))(k_trunk)
        return params, ["init: random (no init.checkpoint)"]
    params, report = load_trunk(cfg, k_trunk, mesh)
    params, more = objective.extend_params(params, k_ext)
    return params, report + more


def load_trunk(cfg: mlc.ConfigDict, rng: jax.Array, mesh) -> tuple[Any, list[str]]:
    """The decoder trunk's parameters from `init.checkpoint` (see `initial_params`)."""
    mcfg = model_config(cfg)
    p_sh = param_shardings(mcfg, mesh)
    check_init_checkpoint(cfg)
    icfg, shapes, load = _source(cfg.init.checkpoint)
    if mcfg.arch != "dense" and icfg.arch == "dense":
        params, rep = dense_to_routed(icfg, load(), mcfg, rng)
        return params, [f"init from {cfg.init.checkpoint}: {rep}"]
    want = jax.eval_shape(lambda r: init_params(mcfg, r), rng)
    relayout = stack_layers if mcfg.scan_layers else unstack_layers
    shape_of = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)
    other = jax.eval_shape(lambda r: init_params(mcfg.replace(scan_layers=not mcfg.scan_layers),
                                                 r), rng)
    names = set(want) | set(other)  # the trunk's top-level names in either layer layout
    trunk = lambda t: {k: v for k, v in t.items() if k in names}  # drop feature subtrees
    shapes = trunk(shapes)
    got = jax.eval_shape(relayout, shapes)
    if shape_of(want) != shape_of(got):
        raise CheckpointMismatchError(f"init.checkpoint {cfg.init.checkpoint!r}: parameter "
                                      "shapes differ from the configured model's")
    dtype = jnp.dtype(mcfg.param_dtype)
    if shape_of(shapes) == shape_of(want):  # same layer layout: read shards in place
        params = trunk(load(sharded_target(shapes, p_sh, dtype)))
    else:  # other layout: read in the stored layout's shardings, relayout on the devices
        stored = mcfg.replace(scan_layers=not mcfg.scan_layers)
        raw = trunk(load(sharded_target(shapes, param_shardings(stored, mesh), dtype)))
        with jax.set_mesh(mesh):
            params = jax.jit(relayout, out_shardings=p_sh)(raw)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return params, [f"init from {cfg.init.checkpoint}: loaded {len(jax.tree.leaves(params))} "
                    f"tensors ({n / 1e6:.2f}M params)"]


def dense_transfer_source(cfg: mlc.ConfigDict) -> tuple[ModelConfig, Any] | None:
    """(dense config, dense params) when this run transfers a dense `init.checkpoint` into a
    routed model, else None. Reads the checkpoint once more (the trainer logs the dense
    first-batch loss from it, docs/features/routing.md, and frees it again)."""
    mcfg = model_config(cfg)
    if not cfg.init.checkpoint or mcfg.arch == "dense":
        return None
    icfg, _, load = _source(cfg.init.checkpoint)
    if icfg.arch != "dense":
        return None
    return icfg, jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(icfg.param_dtype)), load())



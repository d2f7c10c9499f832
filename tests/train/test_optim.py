"""Optimizer rules: frozen params never move, LR groups scale updates, no-decay, LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdyn.model import init_params, tiny
from jaxdyn.model.lora import init_lora
from jaxdyn.train import schema
from jaxdyn.train.optim import FROZEN, group_labels, make_optimizer


def train_cfg(**kw):
    cfg = schema.load("configs/standard.py:tiny")
    with cfg.unlocked():
        for k, v in kw.items():
            node = cfg.train
            *parents, leaf = k.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = v
    return cfg.train


def one_step(tc, tree):
    tx, _ = make_optimizer(tc, tree, tc.trainable)
    grads = jax.tree.map(jnp.ones_like, tree)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    return optax.apply_updates(tree, updates)


def test_frozen_params_unchanged_and_groups_scale():
    params = init_params(tiny(), jax.random.key(0))
    tree = {"params": params, "lora": {}}
    tc = train_cfg(trainable=("layers/mlp",), lr_groups=(("mlp/down", 10.0),), warmup_steps=0,
                   weight_decay=0.0, clip_norm=0.0)
    labels = group_labels(tree, tc, tc.trainable)
    assert labels["params"]["embed"]["embedding"] == FROZEN
    new = one_step(tc, tree)
    np.testing.assert_array_equal(new["params"]["embed"]["embedding"], params["embed"]["embedding"])
    old_mlp, new_mlp = params["layers"]["mlp"], new["params"]["layers"]["mlp"]
    d_up = jnp.abs(new_mlp["up"]["kernel"] - old_mlp["up"]["kernel"])
    d_down = jnp.abs(new_mlp["down"]["kernel"] - old_mlp["down"]["kernel"])
    # Adam's first step moves every weight by lr (sign of the gradient): 10x for the group.
    np.testing.assert_allclose(d_down.mean() / d_up.mean(), 10.0, rtol=1e-3)


def test_no_decay_rules():
    params = {"norm": {"scale": jnp.ones(4)}, "w": {"kernel": jnp.ones(4)}}
    tc = train_cfg(weight_decay=0.5, warmup_steps=0, clip_norm=0.0, no_decay=("norm",), lr=0.1)
    tx, _ = make_optimizer(tc, {"params": params, "lora": {}})
    tree = {"params": params, "lora": {}}
    zero = jax.tree.map(jnp.zeros_like, tree)
    updates, _ = tx.update(zero, tx.init(tree), tree)
    assert float(jnp.abs(updates["params"]["norm"]["scale"]).max()) == 0.0
    assert float(jnp.abs(updates["params"]["w"]["kernel"]).max()) > 0.0


def test_lora_trains_only_factors():
    params = init_params(tiny(), jax.random.key(0))
    tc = train_cfg(**{"lora.enabled": True, "lora.rank": 4, "warmup_steps": 0})
    lora = init_lora(params, tc.lora.targets, tc.lora.rank, jax.random.key(1))
    new = one_step(tc, {"params": params, "lora": lora})
    jax.tree.map(np.testing.assert_array_equal, new["params"], params)  # base frozen
    assert float(jnp.abs(new["lora"]["layers"]["attn"]["q"]["b"]).max()) > 0


def test_trainable_rules_freeze_the_rest():
    params = init_params(tiny(), jax.random.key(0))
    tc = train_cfg(warmup_steps=0)
    tx, _ = make_optimizer(tc, {"params": params, "lora": {}}, trainable=("^unembed/",))
    tree = {"params": params, "lora": {}}
    new = optax.apply_updates(tree, tx.update(jax.tree.map(jnp.ones_like, tree),
                                              tx.init(tree), tree)[0])
    moved = jax.tree.map(lambda a, b: bool((a != b).any()), new["params"], params)
    assert moved.pop("unembed") == {"kernel": True} and not any(jax.tree.leaves(moved))

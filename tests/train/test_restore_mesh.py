"""Restore on another mesh (docs/training.md): a train state saved on 8 devices comes back
exactly on 4, 2 and 1 devices, and parameter checkpoints (imports, training workdirs) are read
straight into the target shardings, each device reading only its slice."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn import sharding
from jaxdyn.checkpoint import Checkpointer, load_model, save_params
from jaxdyn.model import param_shardings, unstack_layers
from jaxdyn.train import abstract_train_state, create_train_state, make_objective, schema
from jaxdyn.train.init import initial_params

OVERRIDES = ["--config.tokenizer.kind=byte", "--config.train.batch_size=8",
             "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def cfg():
    return schema.finalize(schema.load("configs/standard.py:tiny", OVERRIDES))


@pytest.fixture(scope="module")
def fresh(cfg):
    """Random params created sharded on a 2x2x2 mesh (one jitted init shared by the tests)."""
    return initial_params(cfg, make_objective(cfg), KEY, sharding.make_mesh(2, 2, 2))[0]


@pytest.fixture(scope="module")
def saved(cfg, fresh, tmp_path_factory):
    """A workdir whose step-3 checkpoint was written from a 2x2x2 mesh (non-trivial moments)."""
    state = create_train_state(cfg, KEY, params=fresh, mesh=sharding.make_mesh(2, 2, 2))
    bump = lambda x: x * 1.5 + 0.25 if jnp.issubdtype(x.dtype, jnp.floating) else x + 3
    state = jax.tree.map(bump, state)  # elementwise: shardings kept, moments no longer zero
    work = tmp_path_factory.mktemp("work")
    schema.model_config(cfg).save(str(work / "model_config.json"))
    ckpt = Checkpointer(str(work / "checkpoints"), async_save=False)
    ckpt.save(3, state, {"epoch": 0}, {"step": 3, "lora_alpha": 32.0, "lora_rank": 16})
    ckpt.close()
    assert len(state.params["params"]["embed"]["embedding"].sharding.device_set) == 8
    return str(work), jax.device_get(state)


def _assert_in_shardings(tree, shardings):
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
        want = s.shard_shape(x.shape)
        assert all(sh.data.shape == want for sh in x.addressable_shards)  # only its slice


@pytest.mark.parametrize("sizes", [(1, 2, 2), (1, 2, 1), (1, 1, 1)], ids=["4dev", "2dev", "1dev"])
def test_state_saved_on_8_devices_restores_exactly_on_fewer(cfg, saved, sizes):
    work, host = saved
    n = int(np.prod(sizes))
    mesh = sharding.make_mesh(*sizes, devices=jax.devices()[:n])
    target = abstract_train_state(cfg, KEY, mesh)
    ckpt = Checkpointer(os.path.join(work, "checkpoints"), async_save=False)
    state, data, meta = ckpt.restore(3, target)
    ckpt.close()
    assert data == {"epoch": 0} and meta["step"] == 3
    _assert_in_shardings(state, jax.tree.map(lambda t: t.sharding, target))
    assert {d.id for x in jax.tree.leaves(state) for d in x.sharding.device_set} == \
        {d.id for d in jax.devices()[:n]}
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(host), strict=True):
        np.testing.assert_array_equal(a, b)


def test_workdir_params_load_into_shardings(cfg, saved):
    """`init.checkpoint` = a training workdir: params restored shard by shard (no optimizer)."""
    work, host = saved
    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    p_sh = param_shardings(schema.model_config(cfg), mesh)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          host.params["params"])
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, p_sh)
    _, params, _ = load_model(work, target=target)
    _assert_in_shardings(params, p_sh)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), host.params["params"])


@pytest.mark.parametrize("layout", ["scanned", "unrolled"])
def test_import_loads_straight_into_sharded_layout(cfg, fresh, tmp_path, layout):
    """An imported checkpoint (`model_config.json` + `params/`, either layer layout) becomes
    the trainer's initial params already in the rules-table shardings of the mesh."""
    mcfg = schema.model_config(cfg)
    ref = jax.device_get(fresh)
    stored = ref if layout == "scanned" else unstack_layers(ref)
    save_params(str(tmp_path / "params"), stored)
    mcfg.replace(scan_layers=layout == "scanned").save(str(tmp_path / "model_config.json"))
    over = schema.finalize(schema.load("configs/standard.py:tiny",
                                       [*OVERRIDES, f"--config.init.checkpoint={tmp_path}"]))
    mesh = sharding.make_mesh(2, 2, 2)
    params, report = initial_params(over, make_objective(over), KEY, mesh)
    assert "loaded" in report[0]
    _assert_in_shardings(params, param_shardings(mcfg, mesh))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), ref)


def test_random_init_is_created_sharded_and_mesh_independent(cfg, fresh):
    mesh = sharding.make_mesh(2, 2, 2)
    _assert_in_shardings(fresh, param_shardings(schema.model_config(cfg), mesh))
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    single = initial_params(cfg, make_objective(cfg), KEY, one)[0]
    assert len(jax.tree.leaves(single)[0].sharding.device_set) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(fresh), jax.device_get(single))

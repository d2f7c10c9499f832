"""Sharding rules: shardings derive from logical axes; sharded forward equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxdyn import sharding
from jaxdyn.model import build, init_params, param_shardings, tiny


def test_rules_table_covers_every_parameter_axis():
    from jaxdyn.model import abstract_params
    names = {n for n, _ in sharding.RULES}
    specs = jax.tree.leaves(
        __import__("flax.linen", fromlist=["x"]).get_partition_spec(abstract_params(tiny())),
        is_leaf=lambda s: isinstance(s, P))
    used = {a for s in specs for a in s if a is not None}
    assert used <= names, used - names


def test_mesh_sizes_and_errors():
    mesh = sharding.make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh(data=3, fsdp=2, tensor=2)


def test_mesh_axes_are_auto_and_rules_keep_sequence_whole():
    """Auto axes (Explicit would turn logical constraints into assertions); `length` is never
    sharded, so routed blocks gather/scatter along the sequence on one device."""
    from jax.sharding import AxisType

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    assert tuple(mesh.axis_types) == (AxisType.Auto,) * 3
    rules = dict(sharding.RULES)
    assert rules["length"] is None and rules["batch"] == ("data", "fsdp")


def test_hybrid_mesh_needs_one_granule_per_dcn_entry():
    """dcn sizes count slices/processes: 1 process cannot be 2 DCN groups (clear error);
    dcn all 1 is the plain mesh; ICI -1 resolves per slice."""
    with pytest.raises(ValueError, match="dcn sizes must equal the number of processes"):
        sharding.make_mesh(data=-1, fsdp=2, dcn=(2, 1, 1))
    with pytest.raises(ValueError, match="3 positive ints"):
        sharding.make_mesh(dcn=(0, 1, 1))
    assert dict(sharding.make_mesh(1, -1, 2, dcn=(1, 1, 1)).shape) == {
        "data": 1, "fsdp": 4, "tensor": 2}


def test_param_shardings_follow_rules_and_replicate_indivisible():
    cfg = tiny("qwen2", num_kv_heads=1, num_heads=4)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sh = param_shardings(cfg, mesh)
    assert sh["layers"]["attn"]["q"]["kernel"].spec == P(None, "fsdp", "tensor", None)
    assert sh["layers"]["attn"]["k"]["kernel"].spec == P(None, "fsdp", None, None)  # K=1
    assert sh["layers"]["mlp"]["down"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert sh["embed"]["embedding"].spec == P("tensor", "fsdp")


def test_sharded_forward_equals_single_device():
    cfg = tiny("qwen2")
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, cfg.vocab_size)
    apply = jax.jit(lambda p, t: build(cfg).apply({"params": p}, t).logits)
    ref = apply(params, tokens)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh), sharding.rules_context():
        p_sh = sharding.shard_params(params, param_shardings(cfg, mesh))
        t_sh = sharding.shard_batch({"t": np.asarray(tokens)}, mesh)["t"]
        out = apply(p_sh, t_sh)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert jnp.issubdtype(out.dtype, jnp.floating)

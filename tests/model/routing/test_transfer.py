"""Dense -> MoD/DTF transfer (docs/features/routing.md) and scanned/unrolled layouts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn.model import (
    TransferError,
    build,
    dense_to_routed,
    init_params,
    stack_layers,
    tiny,
    unstack_layers,
)
from jaxdyn.model.routing.transfer import same_tree, tree_paths

SMALL = dict(hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
             vocab_size=128, num_layers=4)
DENSE = tiny("qwen2", **SMALL)


@functools.cache
def params_for(cfg):
    return jax.jit(lambda r: init_params(cfg, r))(jax.random.key(0))


def logits(cfg, p, t):
    return jax.jit(lambda p, t: build(cfg).apply({"params": p}, t).logits)(p, t)


TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, SMALL["vocab_size"])


@functools.cache
def _unrolled_dense_logits():
    d = DENSE.replace(scan_layers=False)
    return np.asarray(logits(d, unstack_layers(params_for(DENSE)), TOKENS))


def test_stack_unstack_roundtrip():
    p = params_for(DENSE)
    u = unstack_layers(p)
    assert "layers" not in u and {"layers_0", "layers_3"} <= set(u)
    assert same_tree(stack_layers(u), p)
    assert same_tree(unstack_layers(u), u) and same_tree(stack_layers(p), p)


@pytest.mark.parametrize("src_scan,dst_scan", [(True, True), (False, False), (True, False)])
def test_mod_transfer_at_full_capacity_reproduces_dense(src_scan, dst_scan):
    dense_p = params_for(DENSE)
    src = dense_p if src_scan else unstack_layers(dense_p)
    cfg = DENSE.replace(arch="mod", routing={"capacity": 1.0, "gate": "ones"},
                        scan_layers=dst_scan)
    p, report = dense_to_routed(DENSE.replace(scan_layers=src_scan), src, cfg,
                                jax.random.key(5))
    n_dense = len(jax.tree.leaves(unstack_layers(dense_p)))
    assert len(report.loaded) == n_dense  # every pretrained tensor consumed (once)
    assert report.sources["layers_1/routed/mlp/up/kernel"] == "layers_3/mlp/up/kernel"
    assert report.sources["layers_0/dense/attn/q/kernel"] == "layers_0/attn/q/kernel"
    assert str(report).startswith(f"loaded {n_dense} tensors; new parameters")
    assert {"router/w", "predictor/fc1", "predictor/fc2"} <= {
        n.split("/", 1)[1] for n in report.new}
    assert tree_paths(p) == tree_paths(params_for(cfg))
    ref = logits(DENSE, dense_p, TOKENS)
    got = logits(cfg, p, TOKENS)
    if dst_scan:  # XLA fuses a 2-layer scan body differently from 1-layer ones
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    else:
        np.testing.assert_array_equal(got, _unrolled_dense_logits())


@pytest.mark.parametrize("every,offset", [(1, 0), (4, 0), (4, 2)])
def test_mod_transfer_follows_the_routed_layer_layout(every, offset):
    """route_every/route_offset move the routed layer; dense layer n·j + p feeds position p."""
    cfg = DENSE.replace(arch="mod", routing={"capacity": 1.0, "gate": "ones",
                                             "route_every": every, "route_offset": offset},
                        scan_layers=False)
    p, report = dense_to_routed(DENSE, params_for(DENSE), cfg, jax.random.key(5))
    assert len(report.loaded) == len(jax.tree.leaves(unstack_layers(params_for(DENSE))))
    routed_layers = sorted({int(src.split("/")[0].removeprefix("layers_"))
                            for dst, src in report.sources.items() if "/routed/" in dst})
    assert routed_layers == list(range(offset, 4, every))
    if every == 4:  # the three dense positions are named dense, dense_1, dense_2 in order
        dense_pos = [q for q in range(4) if q != offset]
        for i, q in enumerate(dense_pos):
            name = "dense" if i == 0 else f"dense_{i}"
            assert report.sources[f"layers_0/{name}/mlp/up/kernel"] == f"layers_{q}/mlp/up/kernel"
    np.testing.assert_array_equal(logits(cfg, p, TOKENS), _unrolled_dense_logits())


def test_dtf_transfer_with_saturated_gate_reproduces_dense():
    """With γ = 1 and G ≡ 1 (gate='ce', huge o_ce and β_ce), a DTF pair is exactly
    Block_dyn(Block_dec(H)): the transferred model equals the dense one."""
    cfg = DENSE.replace(arch="dtf", routing={"capacity": 1.0, "gate": "ce"}, scan_layers=False)
    dense_p = params_for(DENSE)
    p, report = dense_to_routed(DENSE, dense_p, cfg, jax.random.key(5))
    assert len(report.loaded) == len(jax.tree.leaves(unstack_layers(dense_p)))
    assert report.sources["layers_1/dec/attn_norm/scale"] == "layers_2/attn_norm/scale"
    assert report.sources["layers_1/dyn/mlp/down/kernel"] == "layers_3/mlp/down/kernel"
    new_kinds = {n.split("/", 1)[1] for n in report.new}
    assert new_kinds == {"beta_ce", "beta_cu", "o_ce", "m_cu", "prior/w1", "prior/w2",
                         "prior/w3", "prior_norm/scale", "predictor/fc1", "predictor/fc2"}
    for j in range(2):
        p[f"layers_{j}"] = {**p[f"layers_{j}"], "beta_ce": jnp.float32(30.0),
                            "o_ce": jnp.float32(1e30)}
    out = jax.jit(lambda p, t: build(cfg).apply({"params": p}, t))(p, TOKENS)
    np.testing.assert_array_equal(out.aux["metrics"]["G_min"], [1.0, 1.0])
    np.testing.assert_array_equal(out.logits, _unrolled_dense_logits())


@pytest.mark.parametrize("arch", ["mod", "dtf"])
def test_scanned_and_unrolled_routed_models_agree(arch):
    cfg = DENSE.replace(arch=arch)
    p = params_for(cfg)
    a = jax.jit(lambda p, t: build(cfg).apply({"params": p}, t))(p, TOKENS)
    u = cfg.replace(scan_layers=False)
    b = jax.jit(lambda p, t: build(u).apply({"params": p}, t))(unstack_layers(p), TOKENS)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5, rtol=0)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5),
                 a.aux, b.aux)


def test_transfer_errors_name_the_offenders():
    dense_p = unstack_layers(params_for(DENSE))
    cfg = DENSE.replace(arch="dtf", scan_layers=False)
    missing = {**dense_p, "layers_2": {k: v for k, v in dense_p["layers_2"].items()
                                       if k != "mlp_norm"}}
    with pytest.raises(TransferError, match=r"layers_1/dec/mlp_norm/scale"):
        dense_to_routed(DENSE, missing, cfg, jax.random.key(0))
    extra = {**dense_p, "lm_bias": {"b": jnp.zeros(3)}}
    with pytest.raises(TransferError, match=r"not consumed: \['lm_bias/b'\]"):
        dense_to_routed(DENSE, extra, cfg, jax.random.key(0))
    with pytest.raises(TransferError, match="hidden_size"):
        dense_to_routed(DENSE, dense_p, cfg.replace(hidden_size=64), jax.random.key(0))
    with pytest.raises(TransferError, match="source must be a dense"):
        dense_to_routed(cfg, dense_p, cfg, jax.random.key(0))


@pytest.mark.parametrize("arch", ["mod", "dtf"])
def test_every_routed_param_has_logical_axes_from_the_rules(arch):
    import flax.linen as nn

    from jaxdyn.model import abstract_params
    from jaxdyn.sharding import RULES

    boxed = abstract_params(DENSE.replace(arch=arch))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda b: isinstance(b, nn.Partitioned))
    assert leaves and all(isinstance(b, nn.Partitioned) for b in leaves)
    names = {r for r, _ in RULES}
    for b in leaves:
        assert len(b.names) == b.value.ndim and set(b.names) <= names, b.names


def _hf_model(model_type: str, folder: str):
    """A tiny random Hugging Face decoder (4 layers), saved to `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=64, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)
    kw.update(dict(hidden_act="gelu", rotary_pct=0.25) if model_type == "gpt_neox" else
              dict(num_key_value_heads=1, tie_word_embeddings=False))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw),
                                             attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms and biases non-trivial too
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name and name.endswith("weight")
                    else 0.02 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("model_type", ["qwen2", "gpt_neox"])
def test_dtf_from_a_converted_hf_checkpoint_uses_every_pretrained_tensor(tmp_path, model_type):
    """Convert a Hugging Face model, transfer it into a DTF: every converted tensor lands, bit
    for bit, in exactly one DTF tensor, and with γ = 1 and G ≡ 1 the DTF reproduces the
    PyTorch model's logits (so each tensor also landed in the right block)."""
    import torch

    import conversion
    from jaxdyn.model.routing.transfer import traverse_util

    hf = _hf_model(model_type, str(tmp_path))
    dense_cfg, dense_p = conversion.from_hf(str(tmp_path))
    cfg = dense_cfg.replace(arch="dtf", routing={"capacity": 1.0, "gate": "ce"},
                            scan_layers=False)
    p, report = dense_to_routed(dense_cfg, dense_p, cfg, jax.random.key(3))
    src = {"/".join(k): v for k, v in traverse_util.flatten_dict(unstack_layers(dense_p)).items()}
    dst = {"/".join(k): v for k, v in traverse_util.flatten_dict(p).items()}
    assert sorted(report.sources.values()) == sorted(src)  # each dense tensor exactly once
    for target, source in report.sources.items():
        np.testing.assert_array_equal(dst[target], src[source])
    assert set(dst) == set(report.sources) | set(report.new)
    assert all(n.split("/", 1)[1].startswith(("prior", "predictor", "beta_", "o_ce", "m_cu"))
               for n in report.new)

    for j in range(2):  # saturate the gate: G = S_CE = σ(softplus(30)·(… + log 1e30)) = 1
        p[f"layers_{j}"] = {**p[f"layers_{j}"], "beta_ce": jnp.float32(30.0),
                            "o_ce": jnp.float32(1e30)}
    ids = np.random.default_rng(0).integers(0, 128, (2, 12))
    out = jax.jit(lambda p, t: build(cfg).apply({"params": p}, t))(p, ids)
    np.testing.assert_array_equal(out.aux["metrics"]["G_min"], [1.0, 1.0])
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(out.logits, ref, atol=1e-4, rtol=1e-4)

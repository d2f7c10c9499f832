"""Routing pictures, and the CLIs (generate, visualize) on MoD/DTF training workdirs."""

import functools

import jax
import numpy as np
import pytest

from jaxdyn.config import loader as configlib
from jaxdyn.data.tokenizer import byte_tokenizer
from jaxdyn.decode import generate as gen
from jaxdyn.model import build, init_params, tiny
from jaxdyn.model.routing.options import capacity_k
from jaxdyn.train.loop import train_and_evaluate
from jaxdyn.train.metrics import read_metrics
from jaxdyn.viz import routing as vis

SMALL = dict(hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
             vocab_size=258, num_layers=4)
TEXT = "def route(x):\n    return top_k(x)"
FAST = ["--config.data.max_documents=60", "--config.train.batch_size=4",
        "--config.train.seq_len=32", "--config.log.tensorboard=false",
        "--config.checkpoint.async_save=false", "--config.sample.max_new_tokens=0",
        "--config.mesh.data=1", "--config.train.steps=2", "--config.eval.every=100",
        "--config.log.every=1"]
# Routing spec §8: the aux metrics every routed unit must log (per layer and averaged).
CAUSAL = ("causal_loss", "causal_acc", "causal_precision", "causal_recall")
SPEC_METRICS = {
    "mod": ("selected_frac", "router_logit_mean", "router_logit_std", "gate_mean", "gate_std",
            "aux_bce", "z_loss", *CAUSAL),
    "dtf": ("selected_frac", *(f"{v}_{s}" for v in ("S_CE", "S_CU", "G")
                               for s in ("mean", "std", "min", "max")),
            "D_st_mean", "D_ch_mean", "beta_ce_raw", "beta_ce_eff", "beta_cu_raw",
            "beta_cu_eff", "o_ce", "m_cu", "prior_loss", *CAUSAL),
}
LOSSES = {"mod": ("router_bce", "router_z", "causal_router"), "dtf": ("prior", "causal_router")}


@functools.cache
def model(arch):
    cfg = tiny("qwen2", arch=arch, **SMALL)
    return cfg, jax.jit(lambda r: init_params(cfg, r))(jax.random.key(0))


@functools.cache
def forward(cfg, mode="topk"):
    return jax.jit(lambda p, t: build(cfg, mode).apply({"params": p}, t))


@pytest.mark.parametrize("arch", ["mod", "dtf"])
def test_topk_picture_matches_the_models_own_routing(arch):
    cfg, params = model(arch)
    tokens = byte_tokenizer().encode(TEXT)
    T, k = len(tokens), capacity_k(0.5, len(tokens))
    r = vis.routing_decisions(cfg, params, tokens)
    assert r["gate"].shape == r["selected"].shape == (2, T) and r["layers"] == [1, 3]
    for u in range(2):  # exactly the k largest gates (σ(r) is monotone in r, G is the score)
        assert r["selected"][u].sum() == k
        g, m = r["gate"][u], r["selected"][u]
        assert g[m].min() >= g[~m].max()
    # The unrolled copy read here equals the scanned model's own aux metrics.
    aux = forward(cfg)(params, np.asarray([tokens])).aux["metrics"]
    name = "G_mean" if arch == "dtf" else "gate_mean"
    np.testing.assert_allclose(r["gate"].mean(axis=1), aux[name], rtol=1e-5)
    np.testing.assert_allclose(r["selected"].mean(axis=1), aux["selected_frac"], rtol=1e-6)

    fig = vis.routing_figure(cfg, params, tokens, byte_tokenizer())
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), r["gate"])
    marked = np.asarray(ax.collections[0].get_offsets())  # (t, u) of each outlined cell
    assert sorted(map(tuple, marked.astype(int))) == sorted(
        (t, u) for u, t in zip(*np.nonzero(r["selected"]), strict=True))
    assert [t.get_text() for t in ax.get_xticklabels()][:4] == ["d", "e", "f", "␣"]


@pytest.mark.parametrize("arch", ["mod", "dtf"])
def test_causal_picture_shows_the_causal_router_decisions(arch):
    cfg, params = model(arch)
    tokens = byte_tokenizer().encode(TEXT)
    r = vis.routing_decisions(cfg, params, tokens, mode="causal")
    aux = forward(cfg, "causal")(params, np.asarray([tokens])).aux["metrics"]
    np.testing.assert_allclose(r["selected"].mean(axis=1), aux["selected_frac"], rtol=1e-6)
    # The decision is σ(c) >= 0.5 of the causal predictor, not the top-k mask.
    assert not np.array_equal(r["selected"], vis.routing_decisions(cfg, params, tokens)[
        "selected"])


def test_clear_errors():
    dense = tiny("qwen2", **SMALL)
    with pytest.raises(ValueError, match="routed model"):
        vis.routing_decisions(dense, model("mod")[1], [1, 2, 3])
    cfg, params = model("mod")
    with pytest.raises(ValueError, match="mode="):
        vis.routing_decisions(cfg, params, [1, 2, 3], mode="dense")
    with pytest.raises(ValueError, match="non-empty"):
        vis.routing_decisions(cfg, params, [])
    with pytest.raises(ValueError, match="context"):
        vis.routing_decisions(cfg, params, [1] * (cfg.max_position_embeddings + 1))


@pytest.fixture
def fast_compile():
    """Most XLA optimisations off (JAX practices §10) for the CLI smoke test: it checks files,
    logged metrics and that the CLI prints what `generate` returns, no reference numerics."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.mark.parametrize("spec", ["configs/mod.py:tiny", "configs/dtf.py:tiny"])
def test_generate_and_visualize_clis_on_a_training_workdir(tmp_path, spec, capsys, fast_compile):
    """`python -m jaxdyn.generate` and `python -m jaxdyn.viz.routing` on a routed workdir."""
    workdir = str(tmp_path / "run")
    train_and_evaluate(configlib.load_config(spec, FAST), workdir)
    capsys.readouterr()
    arch = spec.split("/")[1][:3]
    rows = read_metrics(workdir)
    for split in ("train", "val"):  # every spec metric, per routed layer and averaged
        row = [r for r in rows if r["split"] == split][-1]
        for name in SPEC_METRICS[arch]:
            per_layer = [row[f"{split}/router/layer_{j}/{name}"] for j in range(2)]
            assert row[f"{split}/router/{name}"] == pytest.approx(np.mean(per_layer)), name
        for name in LOSSES[arch]:
            assert np.isfinite(row[f"{split}/router/loss_{name}"]), name
    gen.main(["--checkpoint", workdir, "--prompt", "def ", "--max_new_tokens", "6"])
    out = capsys.readouterr()
    assert out.out.startswith("=== 'def '\n") and "tokens; prefill" in out.err
    cfg, params, tok = gen.load_for_inference(workdir)
    assert cfg.arch == arch
    # The CLI's continuation is the greedy causal-mode continuation of these parameters.
    res = gen.generate(cfg, params, [tok.encode("def ")], 6, eos_id=tok.eos_id)
    new = res.tokens[0][:-1] if res.tokens[0][-1] == tok.eos_id else res.tokens[0]
    assert out.out == f"=== 'def '\n{tok.decode(new)}\n"

    png = str(tmp_path / "routing.png")
    assert vis.main(["--checkpoint", workdir, "--text", TEXT, "--out", png]) == png
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

"""Pictures of a run: the routing figure and its text twin, the dashboard, and the commands
(`python -m jaxdyn.viz`, `python -m jaxdyn.generate`) on MoD / DTF training workdirs."""

import functools
import json

import jax
import numpy as np
import pytest

from jaxdyn.checkpoint import load_for_inference
from jaxdyn.cli import generate as gen_cli
from jaxdyn.cli import viz as viz_cli
from jaxdyn.config import loader as configlib
from jaxdyn.data.tokenizer import byte_tokenizer
from jaxdyn.decode.generate import generate
from jaxdyn.model import build, init_params, tiny
from jaxdyn.model.routing.options import capacity_k
from jaxdyn.train.loop import train_and_evaluate
from jaxdyn.train.metrics import read_metrics
from jaxdyn.viz import dashboard as dash
from jaxdyn.viz import routing as vis

SMALL = dict(hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
             vocab_size=258, num_layers=4)
TEXT = "def route(x):\n    return top_k(x)"
FAST = ["--config.data.max_documents=60", "--config.train.batch_size=4",
        "--config.train.seq_len=32", "--config.log.tensorboard=false",
        "--config.checkpoint.async_save=false", "--config.sample.max_new_tokens=0",
        "--config.mesh.data=1", "--config.train.steps=2", "--config.eval.every=100",
        "--config.log.every=1"]
# docs/features/routing.md: the aux metrics every routed unit must log (per layer and averaged).
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
ROUTED_PANELS = ["loss (last value in brackets)", "learning rate", "throughput",
                 "fraction of tokens processed per routed layer"]


@functools.cache
def model(arch):
    cfg = tiny("qwen2", arch=arch, **SMALL)
    return cfg, jax.jit(lambda r: init_params(cfg, r))(jax.random.key(0))


@functools.cache
def forward(cfg, mode="topk"):
    return jax.jit(lambda p, t: build(cfg, mode).apply({"params": p}, t))


def text_marks(picture: str, labels: list[str]) -> np.ndarray:
    """[U, T] bool read back from a `routing_text` picture: True where a layer row repeats the
    token's label, False where it is blank (anything else fails)."""
    lines = picture.split("\n")[2:]  # after the two heading lines
    blocks = [b.split("\n") for b in "\n".join(lines).split("\n\n")]
    pad = blocks[0][0].index(labels[0])  # where the text starts in a row
    U = len(blocks[0]) - 1
    marks, t0 = [[] for _ in range(U)], 0
    for block in blocks:
        assert block[0].startswith("tokens")
        width = len(block[0]) - pad
        rows = [row.ljust(pad + width)[pad:] for row in block[1:]]
        col, t = 0, t0
        while col < width:
            lab = labels[t]
            for u, row in enumerate(rows):
                cell = row[col:col + len(lab)]
                assert cell in (lab, " " * len(lab)), (u, t, cell, lab)
                marks[u].append(cell == lab)
            col, t = col + len(lab), t + 1
        t0 = t
    assert t0 == len(labels)
    return np.asarray(marks)


@pytest.mark.parametrize("arch", ["mod", "dtf"])
def test_topk_picture_matches_the_models_own_routing(arch):
    cfg, params = model(arch)
    tok = byte_tokenizer()
    tokens = tok.encode(TEXT)
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

    fig = vis.routing_figure(cfg, params, tokens, tok)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), r["gate"])
    marked = np.asarray(ax.collections[0].get_offsets())  # (t, u) of each outlined cell
    assert sorted(map(tuple, marked.astype(int))) == sorted(
        (t, u) for u, t in zip(*np.nonzero(r["selected"]), strict=True))
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[:4] == ["d", "e", "f", "␣"]

    # The text picture marks exactly the tokens the figure outlines, at any wrap width.
    for width in (100, 24):
        picture = vis.routing_text(cfg, params, tokens, tok, width=width)
        assert picture.startswith(f"{arch.upper()} routing (top-k, k={k} of {T})")
        assert all(len(line) <= width for line in picture.split("\n")[2:])
        np.testing.assert_array_equal(text_marks(picture, labels), r["selected"])
    rows = picture.split("\n")
    assert rows[2].startswith("tokens") and rows[3].startswith(f"layer 1 {k / T:4.0%}  ")


@pytest.mark.parametrize("arch", ["mod", "dtf"])
def test_causal_picture_shows_the_causal_router_decisions(arch):
    cfg, params = model(arch)
    tok = byte_tokenizer()
    tokens = tok.encode(TEXT)
    r = vis.routing_decisions(cfg, params, tokens, mode="causal")
    aux = forward(cfg, "causal")(params, np.asarray([tokens])).aux["metrics"]
    np.testing.assert_allclose(r["selected"].mean(axis=1), aux["selected_frac"], rtol=1e-6)
    # The decision is σ(c) >= 0.5 of the causal predictor, not the top-k mask.
    assert not np.array_equal(r["selected"], vis.routing_decisions(cfg, params, tokens)[
        "selected"])
    picture = vis.routing_text(cfg, params, tokens, tok, mode="causal")
    assert "causal router decisions" in picture.split("\n")[0]
    np.testing.assert_array_equal(text_marks(picture, vis.token_labels(tok, tokens)),
                                  r["selected"])


def test_text_picture_aligns_wide_and_multi_character_tokens():
    labels = ["def", "␣", "名前", "(", "\\n", "x"]
    sel_UT = np.array([[1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1]], bool)
    out = vis.text_picture(labels, sel_UT, ["a", "b"])
    assert out.split("\n") == ["tokens  def␣名前(\\nx",
                               "a       def 名前 \\n",
                               "b          ␣    (  x"]
    # Wrapped on token boundaries; a label wider than the room gets a row of its own.
    out = vis.text_picture(labels, sel_UT, ["a", "b"], width=11)
    assert [b.split("\n")[0] for b in out.split("\n\n")] == [
        "tokens  def", "tokens  ␣", "tokens  名前", "tokens  (\\n", "tokens  x"]
    with pytest.raises(ValueError, match="rows 2, tokens 6"):
        vis.text_picture(labels, sel_UT[:, :3], ["a", "b"])
    assert vis.token_labels(byte_tokenizer(), [0, 13, 9]) == ["\\x00", "\\r", "\\t"]


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


def test_dashboard_of_a_dense_run_and_of_no_run(tmp_path, capsys):
    """A dense run: loss, lr and throughput panels, no router ones; from metrics.jsonl only."""
    rows = [{"step": s, "split": "train", "train/loss": 5.0 - s, "train/lr": 1e-3,
             **({"train/tokens_per_sec": 1000.0, "train/mfu": 0.01} if s > 1 else {})}
            for s in (1, 2, 3)]
    rows.append({"step": 3, "split": "val", "val/loss": 2.5, "val/ppl": None})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = dash.dashboard_figure(read_metrics(str(tmp_path)))
    assert [ax.get_title() for ax in fig.axes] == ROUTED_PANELS[:3]
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["train/loss (2)",
                                                                  "val/loss (2.5)"]
    assert viz_cli.main(["--workdir", str(tmp_path)]) == [str(tmp_path / "dashboard.png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dashboard.png", "metrics.jsonl"]
    assert "no model_config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="train first"):
        viz_cli.main(["--workdir", str(tmp_path / "nothing")])


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("spec", ["configs/mod.py:tiny", "configs/dtf.py:tiny"])
@pytest.mark.slow
def test_generate_and_visualize_clis_on_a_training_workdir(tmp_path, spec, capsys):
    """`python -m jaxdyn.generate` and `python -m jaxdyn.viz` on a routed workdir."""
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
    gen_cli.main(["--checkpoint", workdir, "--prompt", "def ", "--max_new_tokens", "6"])
    out = capsys.readouterr()
    assert out.out.startswith("=== 'def '\n") and "tokens; prefill" in out.err
    cfg, params, tok = load_for_inference(workdir)
    assert cfg.arch == arch
    # The CLI's continuation is the greedy causal-mode continuation of these parameters.
    res = generate(cfg, params, [tok.encode("def ")], 6, eos_id=tok.eos_id)
    new = res.tokens[0][:-1] if res.tokens[0][-1] == tok.eos_id else res.tokens[0]
    assert out.out == f"=== 'def '\n{tok.decode(new)}\n"

    # The dashboard: one PNG with every panel, router health included.
    fig = dash.dashboard_figure(rows)
    gate = "DTF G" if arch == "dtf" else "MoD gate"
    assert [ax.get_title() for ax in fig.axes] == [
        *ROUTED_PANELS, f"{gate}: mean ± std per routed layer",
        "causal router vs top-k (mean over routed layers)"]
    loss_lines = [ln.get_label().split(" ")[0] for ln in fig.axes[0].get_lines()]
    assert loss_lines == ["train/loss", "val/loss", "val_causal/loss"]
    sel_lines = [ln.get_label().split(" (")[0] for ln in fig.axes[3].get_lines()]
    assert sel_lines == ["layer_0 top-k", "layer_0 causal", "layer_1 top-k", "layer_1 causal"]

    written = viz_cli.main(["--workdir", workdir, "--text", TEXT, "--width", "60"])
    assert written == [f"{workdir}/dashboard.png", f"{workdir}/routing.png"]
    assert all(map(is_png, written))
    out = capsys.readouterr().out
    labels = vis.token_labels(tok, tok.encode(TEXT))
    picture = out[:out.index("\n\n" + written[0])]
    np.testing.assert_array_equal(text_marks(picture, labels), vis.routing_decisions(
        cfg, params, tok.encode(TEXT))["selected"])
    assert out.endswith("\n".join(written) + "\n")

    pics = tmp_path / "pics"
    assert viz_cli.main(["--checkpoint", workdir, "--mode", "causal", "--out", str(pics)]) == [
        str(pics / "routing.png")]
    assert "causal router decisions" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="non-empty"):
        viz_cli.main(["--checkpoint", workdir, "--text", "", "--out", str(pics)])

"""Standard vs MoD vs DTF at matched capacity on the built-in corpus.

    python -m jaxdyn.experiments compare --preset cpu --out runs/compare   # ≈10 min on 2 cores
    python -m jaxdyn.experiments compare --preset tiny --steps 20           # smoke run
    python -m jaxdyn.experiments compare --preset small                     # hours on CPU

Trains the three models with identical data, seed, optimizer and layer shapes (the dense
baseline gets the routed models' layer count; MoD and DTF share γ), then writes `results.md` /
`results.json` (final validation loss under causal routing — as in generation — and under
top-k routing, which can see later tokens' router scores; training FLOPs, tokens/s) and
`val_loss.png`
(validation loss against step and against training FLOPs). Extra `--config.…` flags apply to
all three runs.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jaxdyn.train import flops, schema  # noqa: E402
from jaxdyn.train.loop import train_and_evaluate  # noqa: E402
from jaxdyn.train.metrics import read_metrics  # noqa: E402

RUNS = (("standard", "configs/standard.py"), ("mod", "configs/mod.py"),
        ("dtf", "configs/dtf.py"))
# Comparison presets: (config preset, overrides applied to every run).
PRESETS = {
    "tiny": ("tiny", []),
    # The README table: byte-level tiny shapes (4 layers), 600 steps of 8×64 tokens.
    "cpu": ("tiny", ["--config.train.steps=600", "--config.train.warmup_steps=30",
                     "--config.eval.every=100", "--config.eval.batches=8",
                     "--config.log.every=50", "--config.checkpoint.every=1000",
                     "--config.sample.max_new_tokens=0", "--config.log.tensorboard=false"]),
    "small": ("small", []),
}


def matched_configs(preset: str, overrides: list[str]) -> dict:
    """{name: locked config} of the three runs; the dense baseline takes the routed models'
    layer count (and no `model.routing.*` overrides), and every field but
    `model.arch`/`model.routing` must then agree."""
    if preset not in PRESETS:
        raise ValueError(f"unknown compare preset {preset!r}; choose one of {sorted(PRESETS)}")
    base, extra = PRESETS[preset]
    routed = {name: schema.load(f"{path}:{base}", [*extra, *overrides])
              for name, path in RUNS[1:]}
    layers = {c.model.num_layers for c in routed.values()}
    if len(layers) != 1:
        raise ValueError(f"MoD and DTF presets {base!r} differ in num_layers: {layers}")
    dense_overrides = [o for o in overrides if not o.startswith("--config.model.routing.")]
    cfgs = {"standard": schema.load(
        f"{RUNS[0][1]}:{base}", [*extra, *dense_overrides,
                                 f"--config.model.num_layers={layers.pop()}"]), **routed}
    cap = {cfgs[n].model.routing.capacity for n in ("mod", "dtf")}
    if len(cap) != 1:
        raise ValueError(f"MoD and DTF run at different capacities {cap}; pass "
                         "--config.model.routing.capacity=… to match them")
    ref = cfgs["standard"].to_dict()
    for name in ("mod", "dtf"):
        got = cfgs[name].to_dict()
        diff = sorted(f"{sec}.{k}" for sec in ("model", "train", "data", "tokenizer")
                      for k in ref[sec] if sec != "model" or k not in ("arch", "routing")
                      if k not in ("no_decay", "lr_groups") and ref[sec][k] != got[sec][k])
        if diff:
            raise ValueError(f"{name} differs from the dense baseline in {diff}")
    return cfgs


def run_all(preset: str, out: str, overrides: list[str]) -> list[dict]:
    """Train the three matched runs into `out/<name>`; one result row each."""
    os.makedirs(out, exist_ok=True)
    rows = []
    for name, cfg in matched_configs(preset, overrides).items():
        workdir = os.path.join(out, name)
        last = train_and_evaluate(cfg, workdir)
        mcfg = schema.model_config(cfg)
        per_tok = flops.train_flops_per_token(mcfg, cfg.train.seq_len)
        tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
        val = [r for r in read_metrics(workdir) if r["split"] == "val"]
        rows.append({"model": name, "capacity": mcfg.routing_options.get("capacity", 1.0),
                     "val_loss": last.get("val/loss"),
                     "val_causal_loss": last.get("val_causal/loss", last.get("val/loss")),
                     "train_tflops": per_tok["model"] * tokens
                     / 1e12, "flop_ratio": per_tok["model"] / per_tok["dense_equivalent"],
                     "tokens_per_sec": last.get("train/tokens_per_sec"),
                     "curve": [(r["step"], r["val/loss"]) for r in val],
                     "flops_per_step": per_tok["model"] * tokens / cfg.train.steps})
    return rows


def write_results(rows: list[dict], out: str) -> str:
    lines = ["| model | capacity | final val loss (causal) | final val loss (top-k) | "
             "train FLOPs (T) | FLOP ratio | tokens/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['capacity']} | {r['val_causal_loss']:.4f} | "
                     f"{r['val_loss']:.4f} | "
                     f"{r['train_tflops']:.3f} | {r['flop_ratio']:.3f} | "
                     f"{r['tokens_per_sec']:,.0f} |")
    table = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in rows:
        steps = [s for s, _ in r["curve"]]
        losses = [v for _, v in r["curve"]]
        axes[0].plot(steps, losses, marker=".", label=r["model"])
        axes[1].plot([s * r["flops_per_step"] / 1e12 for s in steps], losses, marker=".",
                     label=r["model"])
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training TFLOPs")
    for ax in axes:
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "val_loss.png"), dpi=100)
    plt.close(fig)
    return table

"""`python -m jaxdyn.viz.dashboard --workdir DIR`: PNG curves from `metrics.jsonl` (never from memory)."""

from __future__ import annotations

import argparse
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jaxdyn.train.metrics import read_metrics  # noqa: E402

PANELS = {
    "loss": ("train/loss", "val/loss"),
    "lr": ("train/lr",),
    "throughput": ("train/tokens_per_sec",),
    "mfu": ("train/mfu",),
}


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_workdir(workdir: str, out_dir: str | None = None) -> list[str]:
    rows = read_metrics(workdir)
    if not rows:
        raise FileNotFoundError(f"no metrics.jsonl with rows in {workdir}; train first")
    out_dir = out_dir or os.path.join(workdir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    # Aux metrics averaged over routed layers, e.g. train/router/G_mean (not per layer).
    aux = [k for k in keys if re.match(r"(train|val)/router/(?!layer_)", k)]
    panels = dict(PANELS)
    for k in aux:
        panels["aux_" + k.split("/", 2)[2]] = (k,)
    written = []
    for name, wanted in panels.items():
        present = [k for k in wanted if k in keys]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in present:
            xs, ys = series(rows, k)
            ax.plot(xs, ys, label=k, marker="." if len(xs) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
        path = os.path.join(out_dir, f"{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m jaxdyn.viz.dashboard")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", default=None, help="folder for the PNGs (default WORKDIR/plots)")
    args = ap.parse_args()
    for p in plot_workdir(args.workdir, args.out):
        print(p)


if __name__ == "__main__":
    main()

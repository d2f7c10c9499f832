"""One dashboard PNG per training workdir, drawn from `metrics.jsonl` alone (never from memory,
so it works on a run that is still going, finished, or copied from another machine).

Panels, each drawn when its metrics were logged: loss (train, val, and val_causal for routed
runs: the causal routers deciding, as in generation), learning rate, throughput with MFU, and
for MoD / DTF runs the router's health: the fraction of tokens each routed layer processed, the
gate's mean ± std per layer (MoD σ(r), DTF G), and the causal router's accuracy, precision and
recall against the top-k choice.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable

# pyplot-free: Figure.savefig renders with Agg itself, so no backend is set for the process (a
# notebook importing this keeps its own) and there is no global figure state to close.
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from jaxdyn.config import paths
from jaxdyn.train.metrics import read_metrics

Rows = list[dict]


def series(rows: Rows, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the rows that logged it (null = non-finite: skipped)."""
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def routed_layers(rows: Rows) -> list[int]:
    """Indices i of the `train/router/layer_{i}/…` metrics (one per routed layer); [] if dense."""
    found = {int(m.group(1)) for r in rows for k in r
             if (m := re.match(r"train/router/layer_(\d+)/", k))}
    return sorted(found)


def _line(ax: Axes, rows: Rows, key: str, label: str | None = None, fmt: str = ".4g",
          **kw) -> None:
    xs, ys = series(rows, key)
    if xs:
        ax.plot(xs, ys, label=f"{label or key} ({ys[-1]:{fmt}})",
                marker="." if len(xs) < 30 else None, **kw)


def _loss(ax: Axes, rows: Rows) -> None:
    ax.set_title("loss (last value in brackets)")
    for k in ("train/loss", "val/loss", "val_causal/loss"):
        _line(ax, rows, k)


def _lr(ax: Axes, rows: Rows) -> None:
    ax.set_title("learning rate")
    _line(ax, rows, "train/lr")


def _throughput(ax: Axes, rows: Rows) -> None:
    """Tokens/s; MFU is proportional to it within a run, so it is a second scale on the right
    rather than a second line."""
    ax.set_title("throughput")
    _line(ax, rows, "train/tokens_per_sec", "tokens/s", ",.0f")
    both = [(r["train/tokens_per_sec"], r["train/mfu"]) for r in rows
            if r.get("train/tokens_per_sec") and r.get("train/mfu") is not None]
    if both:
        pct = 100 * both[-1][1] / both[-1][0]  # MFU % per token/s
        right = ax.secondary_yaxis("right", functions=(lambda x: x * pct, lambda y: y / pct))
        right.set_ylabel(f"MFU % (last {100 * both[-1][1]:.3g})")
    elif not series(rows, "train/tokens_per_sec")[0]:
        _line(ax, rows, "train/mfu", "MFU")


def _selected(ax: Axes, rows: Rows) -> None:
    """Per routed layer: top-k in training (flat at the capacity) and the causal router's
    choice on the validation batches (what generation processes)."""
    ax.set_title("fraction of tokens processed per routed layer")
    for i in routed_layers(rows):
        _line(ax, rows, f"train/router/layer_{i}/selected_frac", f"layer_{i} top-k",
              color=f"C{i}", linestyle="--")
        _line(ax, rows, f"val_causal/router/layer_{i}/selected_frac", f"layer_{i} causal (val)",
              color=f"C{i}")


def _gate(ax: Axes, rows: Rows) -> None:
    """Gate mean ± std per routed layer: a std collapsing to 0 means the router stopped
    telling tokens apart."""
    name = "G" if any("train/router/G_mean" in r for r in rows) else "gate"
    ax.set_title(f"{'DTF G' if name == 'G' else 'MoD gate'}: mean ± std per routed layer")
    for i in routed_layers(rows):
        key = f"train/router/layer_{i}/{name}"
        pts = [(r["step"], r[key + "_mean"], r.get(key + "_std") or 0.0) for r in rows
               if r.get(key + "_mean") is not None]
        if not pts:
            continue
        xs, mean, std = (list(p) for p in zip(*pts, strict=True))
        ax.plot(xs, mean, color=f"C{i}", label=f"layer_{i} ({mean[-1]:.3g} ± {std[-1]:.2g})")
        ax.fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)],
                        [m + s for m, s in zip(mean, std, strict=True)], color=f"C{i}",
                        alpha=0.2)


def _causal(ax: Axes, rows: Rows) -> None:
    """The causal router (generation-time decisions) scored against the top-k choice."""
    ax.set_title("causal router vs top-k (mean over routed layers)")
    for m in ("acc", "precision", "recall"):
        _line(ax, rows, f"train/router/causal_{m}", f"train {m}")
    _line(ax, rows, "val/router/causal_acc", "val acc", linestyle="--")


# (draw, the metric keys it needs: drawn when any logged key matches).
PANELS: tuple[tuple[Callable[[Axes, Rows], None], str], ...] = (
    (_loss, r"(train|val|val_causal)/loss$"),
    (_lr, r"train/lr$"),
    (_throughput, r"train/(tokens_per_sec|mfu)$"),
    (_selected, r"(train|val_causal)/router/layer_\d+/selected_frac$"),
    (_gate, r"train/router/layer_\d+/(G|gate)_mean$"),
    (_causal, r"(train|val)/router/causal_(acc|precision|recall)$"),
)


def panels_for(rows: Rows) -> list[Callable[[Axes, Rows], None]]:
    """The PANELS these rows have data for, in order."""
    keys = {k for r in rows for k, v in r.items() if v is not None}
    return [draw for draw, needs in PANELS if any(re.match(needs, k) for k in keys)]


def dashboard_figure(rows: Rows, title: str = "") -> Figure:
    """The dashboard of these metrics rows (`read_metrics`) as a Figure: one axes per panel
    with data, two columns."""
    panels = panels_for(rows)
    if not panels:
        raise ValueError("no loss, lr, throughput or router metrics in these rows")
    ncols = 2
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(12, 0.6 + 3.2 * nrows))
    for n, draw in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, n + 1)
        draw(ax, rows)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def dashboard(workdir: str, out: str | None = None) -> str:
    """Write the dashboard of `workdir` to `out` (default `workdir/dashboard.png`); its path.
    Either may be on an object store (`gs://…`): the PNG is then uploaded as one object."""
    rows = read_metrics(workdir)
    if not rows:
        raise FileNotFoundError(f"no metrics.jsonl with rows in {workdir!r}; train first")
    out = out or paths.join(workdir, "dashboard.png")
    last = max(r["step"] for r in rows)
    name = paths.absolute(workdir).rstrip("/").rsplit("/", 1)[-1]
    layers = routed_layers(rows)
    kind = f", {len(layers)} routed layers" if layers else ""
    fig = dashboard_figure(rows, f"{name}: step {last}{kind}")
    save_figure(fig, out, dpi=100)
    return out


def save_figure(fig, out: str, dpi: int) -> None:
    """`fig` as a PNG at `out`, written whole (temp + rename locally, one upload to a store)."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    paths.write_atomic(out, buf.getvalue())

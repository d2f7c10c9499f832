"""Which tokens each routed layer of a MoD / DTF model processed, and the gate values
(docs/features/routing.md): as a matplotlib figure (`routing_figure`) and as plain text for a
terminal (`routing_text`). `python -m jaxdyn.viz` draws both for a workdir or checkpoint.

The picture comes from the model's own forward pass: every routed unit sows its gate and top-k
mask (`intermediates/…/routing`, and `decision` in causal mode), read here from an unrolled
copy of the model (`nn.scan` drops sown values). Figure: one row per routed layer, one column
per token; the colour is the gate (MoD σ(r) or r, DTF G), an outline marks the tokens the layer
processed. Text: the tokens on one row, then one row per routed layer that repeats the tokens
it processed and leaves blanks where it skipped them (no colour needed).

Dimension legend: U routed units (one routed layer each), T tokens.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure  # pyplot-free: no GUI backend, nothing to close

from jaxdyn.model import ModelConfig, build, routing_opts, unstack_layers
from jaxdyn.model.routing.options import routed_k, unit_slots

GATE_NAME = {"mod": "gate (MoD router)", "dtf": "G = S_CE ∨ S_CU"}
ROUTED_SLOT = {"mod": "routed", "dtf": "dyn"}  # the unit's routed sub-layer
MODES = ("topk", "causal")


@functools.lru_cache(maxsize=8)
def _sown_forward(cfg: ModelConfig, mode: str):
    """Jitted unrolled forward returning (output, sown intermediates)."""
    model = build(cfg, routing_mode=mode)
    return jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["intermediates"]))


def routing_decisions(cfg: ModelConfig, params: Any, tokens: Sequence[int],
                      mode: str = "topk") -> dict[str, Any]:
    """Gate values and processed tokens of every routed layer for one token sequence.

    Returns `gate` [U, T] (fp32), `selected` [U, T] (bool; the top-k mask in `topk` mode, the
    causal router's decisions in `causal` mode), `layers` (index of each routed layer in the
    dense numbering) and `metrics` (the model's per-unit aux metrics, [U] each).
    """
    if cfg.arch not in GATE_NAME:
        raise ValueError(f"the checkpoint holds an arch={cfg.arch!r} model; routing pictures "
                         "need a routed model (arch 'mod' or 'dtf')")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    tokens_1T = jnp.asarray(np.asarray(tokens, np.int32).reshape(1, -1))
    T = tokens_1T.shape[1]
    if T == 0:
        raise ValueError("no tokens to visualise; give a non-empty text")
    if T > cfg.max_position_embeddings:
        raise ValueError(f"{T} tokens exceed the model's context of "
                         f"{cfg.max_position_embeddings}; give a shorter text")
    out, state = _sown_forward(cfg.replace(scan_layers=False, remat_policy="none"), mode)(
        unstack_layers(params), tokens_1T)
    inter = state["intermediates"]
    slots = unit_slots(cfg)
    n_units = cfg.num_layers // len(slots)
    gate, selected = [], []
    for j in range(n_units):
        unit = inter[f"layers_{j}"]
        routing = unit["routing"][0]
        gate.append(np.asarray(routing["gate"], np.float32)[0])
        chosen = unit["decision"][0] if mode == "causal" else routing["topk"]
        selected.append(np.asarray(chosen, bool)[0])
    return {"gate": np.stack(gate), "selected": np.stack(selected),
            "layers": [len(slots) * j + slots[ROUTED_SLOT[cfg.arch]] for j in range(n_units)],
            "metrics": jax.tree.map(np.asarray, out.aux["metrics"])}


def token_labels(tok, tokens: Sequence[int]) -> list[str]:
    """One short printable label per token: spaces as ␣, newlines and tabs as \\n and \\t,
    other control characters escaped, a token that decodes to nothing as <id>."""
    labels = []
    for t in tokens:
        s = tok.decode([int(t)])
        s = s.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t")
        s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
        labels.append(s if s else f"<{int(t)}>")
    return labels


def _how(cfg: ModelConfig, mode: str, T: int) -> str:
    return (f"top-k, k={routed_k(routing_opts(cfg), T)} of {T}" if mode == "topk"
            else "causal router decisions")


def routing_figure(cfg: ModelConfig, params: Any, tokens: Sequence[int], tok,
                   mode: str = "topk") -> Figure:
    """The routing picture of `tokens` (see the module docstring) as a matplotlib Figure."""
    r = routing_decisions(cfg, params, tokens, mode)
    gate_UT, sel_UT = r["gate"], r["selected"]
    U, T = gate_UT.shape
    fig = Figure(figsize=(max(6.0, 0.22 * T + 2.5), 1.6 + 0.55 * U))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(gate_UT, aspect="auto", cmap="viridis", interpolation="nearest")
    uu, tt = np.nonzero(sel_UT)
    ax.scatter(tt, uu, marker="s", s=70, facecolors="none", edgecolors="red", linewidths=1.2,
               label="processed")
    ax.set_yticks(range(U), [f"layer {layer} ({sel_UT[u].mean():.0%})"
                             for u, layer in enumerate(r["layers"])])
    ax.set_xticks(range(T), token_labels(tok, tokens), rotation=90, fontsize=7)
    ax.set_title(f"{cfg.arch.upper()} routing ({_how(cfg, mode, T)}); red = processed",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label=GATE_NAME[cfg.arch], fraction=0.03, pad=0.01)
    fig.tight_layout()
    return fig


def columns(s: str) -> int:
    """Terminal columns of `s`: wide (East Asian) characters take 2, combining marks 0."""
    return sum(0 if unicodedata.combining(c) else
               2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)


def text_picture(labels: Sequence[str], selected_UT: np.ndarray, row_names: Sequence[str],
                 width: int = 100) -> str:
    """Plain-text routing picture: a `tokens` row with every label, then one row per routed
    layer that repeats the labels of the tokens it processed (`selected_UT[u, t]`) and blanks
    out the skipped ones, column-aligned; wrapped into blocks of at most `width` columns."""
    selected_UT = np.asarray(selected_UT, bool)
    if selected_UT.shape != (len(row_names), len(labels)):
        raise ValueError(f"selected {selected_UT.shape} must be [rows {len(row_names)}, "
                         f"tokens {len(labels)}]")
    names = ["tokens", *row_names]
    pad = max(map(len, names)) + 2
    room = max(width - pad, 1)
    blocks, start = [], 0
    while start < len(labels):  # greedy wrap on token boundaries
        stop, used = start, 0
        while stop < len(labels) and (stop == start or used + columns(labels[stop]) <= room):
            used += columns(labels[stop])
            stop += 1
        rows = ["".join(labels[start:stop])]
        for sel_T in selected_UT:
            rows.append("".join(lab if sel_T[t] else " " * columns(lab)
                                for t, lab in enumerate(labels[start:stop], start)))
        blocks.append("\n".join(f"{n:<{pad}}{r}".rstrip() for n, r in zip(names, rows,
                                                                            strict=True)))
        start = stop
    return "\n\n".join(blocks)


def routing_text(cfg: ModelConfig, params: Any, tokens: Sequence[int], tok,
                 mode: str = "topk", width: int = 100) -> str:
    """The routing picture of `tokens` as plain text for a terminal: a heading, then
    `text_picture` with one row per routed layer (its index and the share it processed)."""
    r = routing_decisions(cfg, params, tokens, mode)
    sel_UT = r["selected"]
    names = [f"layer {layer} {sel_UT[u].mean():4.0%}" for u, layer in enumerate(r["layers"])]
    head = (f"{cfg.arch.upper()} routing ({_how(cfg, mode, len(tokens))}); each layer row keeps "
            "the tokens\nthat layer processed and blanks out those it skipped (␣ = space, "
            "\\n = newline)")
    return head + "\n" + text_picture(token_labels(tok, tokens), sel_UT, names, width)

"""Generation conditioned on a date and a causal graph (temporal spec §1, issue 6 "Use").

    python -m jaxdyn.generate --checkpoint DIR --prompt "Who leads Vornex: A, B or C?" \
        --time 2025-06-02 --graph graph.json

    from jaxdyn.temporal.generate import load_temporal, generate_conditioned
    model = load_temporal("runs/temporal/checkpoint")
    text = generate_conditioned(model, "Question: Who leads Vornex: … Answer:", "2025-06-02",
                                graph_json)

A temporal checkpoint folder holds `model_config.json`, `temporal_config.json` (the
`TemporalConfig`, the batch `Shapes` and the tokenizer name) and `params/` (backbone and
`temporal/...`), written by `save_temporal`. The graph file uses the record schema's graph
(`{"nodes": [...], "edges": [...]}`), optionally with `"query_nodes"` (subject first), or is a
whole TCG-Synth record. Decoding is greedy and recomputes the padded [1, T] window per token
(static shapes, one compile): the temporal checkpoints are tiny models.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdyn.model import ModelConfig
from jaxdyn.temporal import adapters as tm
from jaxdyn.temporal.batching import Shapes, empty_graph_arrays, fill_graph, make_graph, tokenize
from jaxdyn.temporal.synth import t_years
from jaxdyn.temporal.tokenizer import tokenizer

TEMPORAL_JSON = "temporal_config.json"
TOKENIZER = "tcg_syllable"  # jaxdyn.temporal.tokenizer


@dataclasses.dataclass(frozen=True)
class TemporalModel:
    cfg: ModelConfig
    tcfg: tm.TemporalConfig
    shapes: Shapes
    params: Any


def save_temporal(path: str, cfg: ModelConfig, tcfg: tm.TemporalConfig, shapes: Shapes,
                  params) -> None:
    """Write a temporal checkpoint folder (params atomically via orbax, configs as JSON)."""
    from jaxdyn.checkpoint import save_params

    os.makedirs(path, exist_ok=True)
    save_params(os.path.join(path, "params"), jax.device_get(params))
    cfg.save(os.path.join(path, "model_config.json"))
    meta = {"temporal": dataclasses.asdict(tcfg), "shapes": dataclasses.asdict(shapes),
            "tokenizer": TOKENIZER}
    tmp = os.path.join(path, TEMPORAL_JSON + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(path, TEMPORAL_JSON))


def is_temporal_checkpoint(path: str) -> bool:
    return os.path.exists(os.path.join(path, TEMPORAL_JSON))


def load_temporal(path: str) -> TemporalModel:
    """Read a folder written by `save_temporal` (clear error for anything else)."""
    from jaxdyn.checkpoint import load_params

    if not is_temporal_checkpoint(path):
        raise FileNotFoundError(f"{path!r} has no {TEMPORAL_JSON}: --time/--graph need a "
                                "temporal checkpoint (python -m jaxdyn.experiments.temporal "
                                "writes one to <out>/checkpoint)")
    with open(os.path.join(path, TEMPORAL_JSON)) as f:
        meta = json.load(f)
    if meta.get("tokenizer") != TOKENIZER:
        raise ValueError(f"unsupported tokenizer {meta.get('tokenizer')!r} in {path}")
    t = meta["temporal"]
    t["adapter_layers"] = None if t["adapter_layers"] is None else tuple(t["adapter_layers"])
    cfg = ModelConfig.load(os.path.join(path, "model_config.json"))
    return TemporalModel(cfg, tm.TemporalConfig(**t), Shapes(**meta["shapes"]),
                         load_params(os.path.join(path, "params")))


def parse_date(date: str) -> str:
    try:
        return dt.date.fromisoformat(date).isoformat()
    except ValueError:
        raise ValueError(f"--time {date!r} is not a date; give YYYY-MM-DD, e.g. 2025-06-02"
                         ) from None


def read_graph(graph: str | dict) -> tuple[dict, list[str] | None]:
    """(graph, query_nodes or None) from a path, a record or a bare graph dict."""
    if isinstance(graph, str):
        with open(graph) as f:
            graph = json.load(f)
    query = graph.get("query_nodes")
    g = graph.get("graph", graph)
    if not isinstance(g, dict) or "nodes" not in g or "edges" not in g:
        raise ValueError("the graph must be {\"nodes\": [...], \"edges\": [...]} (record "
                         "schema, temporal spec §11.3) or a record holding one under \"graph\"")
    return g, query


def infer_query(graph: dict, prompt: str) -> list[str]:
    """Nodes named in the prompt, in order of first mention (used when none are given)."""
    hits = [(prompt.find(n["name"]), n["id"]) for n in graph["nodes"] if n["name"] in prompt]
    return [i for _, i in sorted(hits)]


@functools.lru_cache(maxsize=8)
def _next_token_fn(cfg: ModelConfig, tcfg: tm.TemporalConfig, use_time: bool,
                   use_graph: bool):
    model = tm.build(cfg, tcfg)

    @jax.jit
    def next_token(params, tokens_1T, last, tau_1, graph):
        cond = {"time": tau_1 if use_time else None, "graph": graph if use_graph else None}
        out = model.apply({"params": params}, tokens_1T, compute_logits=False,
                          conditioning=cond)
        h_D = out.hidden[0, last]
        return jnp.argmax(h_D @ out.unembed.astype(h_D.dtype))
    return next_token


def generate_conditioned(model: TemporalModel, prompt: str, time: str | None = None,
                         graph: str | dict | None = None, max_new_tokens: int = 16,
                         stop: str = "\n") -> str:
    """Greedy continuation of `prompt` at date `time` (YYYY-MM-DD) given `graph` (path/dict).

    Without `graph` the GNN pathway is off; without both, this is the base model. The graph's
    edges are activated at `time`, so a graph needs a time.
    """
    sh = model.shapes
    if graph is not None and time is None:
        raise ValueError("a graph is activated at a date: give --time YYYY-MM-DD with --graph")
    arr = empty_graph_arrays(1, sh)
    date = "2020-01-01" if time is None else parse_date(time)
    if graph is not None:
        g, query = read_graph(graph)
        fill_graph(arr, 0, g, query if query is not None else infer_query(g, prompt), date, sh)
    tau = np.asarray([tm.years_to_tau(t_years(date))], np.float32)
    ids = tokenize(prompt)
    T = min(sh.seq_len, model.cfg.max_position_embeddings)
    if not ids or len(ids) >= T:
        raise ValueError(f"prompt has {len(ids)} tokens; give 1..{T - 1}")
    step = _next_token_fn(model.cfg, model.tcfg, time is not None, graph is not None)
    g_tuple = make_graph(arr)
    buf = np.zeros((1, T), np.int32)
    buf[0, :len(ids)] = ids
    n, new = len(ids), []
    while len(new) < max_new_tokens and n < T:
        tok = int(step(model.params, buf, jnp.int32(n - 1), tau, g_tuple))
        new.append(tok)
        buf[0, n] = tok
        n += 1
        text = tokenizer().decode(new)
        if stop and stop in text:
            return text[:text.index(stop)]
    return tokenizer().decode(new)


def cli(args) -> None:
    """`python -m jaxdyn.generate --checkpoint DIR --prompt … --time … --graph …` (greedy)."""
    from jaxdyn.decode.generate import read_prompts, truncate_at_stop

    if (args.temperature or 0.0) != 0.0 or args.top_k or (args.top_p or 1.0) != 1.0 or \
            getattr(args, "mode", "plain") != "plain":
        raise SystemExit("temporal generation is greedy, plain mode; drop --temperature/"
                         "--top_k/--top_p/--mode")
    try:
        model = load_temporal(args.checkpoint)
        for text in read_prompts(args.prompt, args.prompts):
            out = generate_conditioned(model, text, args.time, args.graph, args.max_new_tokens)
            print(f"=== {text!r} @ {args.time} graph={args.graph}\n"
                  f"{truncate_at_stop(out, args.stop)[0]}")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None

"""Generation conditioned on a date and a causal graph (temporal adapters).

    python -m jaxdyn.generate --checkpoint DIR --prompt "Who leads Vornex: A, B or C?" \
        --time 2025-06-02 --graph graph.json

    from jaxdyn.temporal.generate import load_temporal, generate_conditioned
    model = load_temporal("runs/temporal-tiny")
    text = generate_conditioned(model, "Question: Who leads Vornex: … Answer:", "2025-06-02",
                                graph_json)

A temporal checkpoint is a training workdir of the `temporal` objective (its `config.json`
holds the `temporal` and `shapes` blocks; its tokenizer is the one it saved in `tokenizer/`) or
a model folder (`model_config.json` + `params/`) with `temporal_config.json` (`TemporalConfig`,
batch `Shapes`, the tokenizer's kind and fingerprint) and that tokenizer's files, written by
`save_temporal`. Prompt, node names and output go through the checkpoint's tokenizer. The
graph file uses the record schema's graph (`{"nodes": [...], "edges": [...]}`), optionally with
`"query_nodes"` (subject first), or is a whole TCG-Synth record. Decoding is greedy and
recomputes the padded [1, T] window per token (static shapes, one compile): the temporal
checkpoints are tiny models.
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

from jaxdyn.checkpoint import load_model, save_params
from jaxdyn.data.tokenizer import FIXED, Tokenizer, TokenizerNotFoundError, load_tokenizer
from jaxdyn.model import ModelConfig
from jaxdyn.temporal import adapters as tm
from jaxdyn.temporal.batching import Shapes, empty_graph_arrays, fill_graph, make_graph
from jaxdyn.temporal.tokens import TokenizerMismatchError, check_vocab, resolve
from jaxdyn.temporal.world import t_years

TEMPORAL_JSON = "temporal_config.json"


@dataclasses.dataclass(frozen=True)
class TemporalModel:
    cfg: ModelConfig
    tcfg: tm.TemporalConfig
    shapes: Shapes
    params: Any
    tok: Tokenizer = dataclasses.field(default_factory=resolve)  # prompts, names, output


def save_temporal(path: str, cfg: ModelConfig, tcfg: tm.TemporalConfig, shapes: Shapes,
                  params, tok: Tokenizer | None = None) -> None:
    """Write a model folder (`model_config.json` + `params/`, as `conversion import` does)
    with the tokenizer the model was trained with (`tok`; None: the syllable one) and the
    `temporal_config.json` that makes it a temporal checkpoint."""
    tok = resolve(tok)
    check_vocab(tok, cfg.vocab_size, "the model")
    os.makedirs(path, exist_ok=True)
    save_params(os.path.join(path, "params"), jax.device_get(params))
    cfg.save(os.path.join(path, "model_config.json"))
    tok.save(path)
    meta = {"temporal": dataclasses.asdict(tcfg), "shapes": dataclasses.asdict(shapes),
            "tokenizer": tok.kind, "tokenizer_fingerprint": tok.fingerprint()}
    tmp = os.path.join(path, TEMPORAL_JSON + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(path, TEMPORAL_JSON))


def is_temporal_checkpoint(path: str) -> bool:
    """A folder with `temporal_config.json`, or a workdir trained with the adapters on."""
    if os.path.exists(os.path.join(path, TEMPORAL_JSON)):
        return True
    run = _run_config(path)
    return bool(run) and run.get("train", {}).get("objective") == "temporal" and \
        "temporal" in run


def _run_config(path: str) -> dict:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _saved_tokenizer(path: str, kind: str | None, fingerprint: str | None) -> Tokenizer:
    """The tokenizer stored with the checkpoint, checked against the recorded `kind` (None:
    any) and `fingerprint`. A fixed kind without a fingerprint (folders and workdirs from
    before tokenizers were recorded) needs no stored files."""
    try:
        tok = load_tokenizer(path)
    except TokenizerNotFoundError as e:
        if kind in FIXED and not fingerprint:
            return FIXED[kind]()
        raise TokenizerMismatchError(f"temporal checkpoint {path!r} was trained with a "
                                     f"{kind or 'checkpoint'!r} tokenizer that is not stored "
                                     f"with it ({e}); copy its tokenizer files there") from e
    if (kind is not None and tok.kind != kind) or (fingerprint and
                                                   tok.fingerprint() != fingerprint):
        raise TokenizerMismatchError(
            f"temporal checkpoint {path!r} records a {kind!r} tokenizer (fingerprint "
            f"{fingerprint}) but holds a {tok.kind!r} one (fingerprint {tok.fingerprint()}); "
            "put back the tokenizer it was trained with")
    return tok


def load_temporal(path: str) -> TemporalModel:
    """Read a temporal checkpoint with its tokenizer (see the module doc; a clear error for
    anything else)."""
    if not is_temporal_checkpoint(path):
        raise FileNotFoundError(f"{path!r} is not a temporal checkpoint: --time/--graph need a "
                                "workdir trained with configs/temporal.py or a folder with "
                                f"{TEMPORAL_JSON}")
    if os.path.exists(os.path.join(path, TEMPORAL_JSON)):
        with open(os.path.join(path, TEMPORAL_JSON)) as f:
            meta = json.load(f)
        if not isinstance(meta.get("tokenizer"), str):
            raise TokenizerMismatchError(f"{path}/{TEMPORAL_JSON} names no tokenizer")
        kind, fp = meta["tokenizer"], meta.get("tokenizer_fingerprint")
        tok = FIXED[kind]() if kind in FIXED and not fp else _saved_tokenizer(path, kind, fp)
        tblock, sblock = meta["temporal"], meta["shapes"]
    else:
        run = _run_config(path)
        tblock, sblock = run["temporal"], run["shapes"]
        kind = run.get("tokenizer", {}).get("kind")
        tok = _saved_tokenizer(path, kind if kind in FIXED else None, None)
    cfg, params, _ = load_model(path)
    check_vocab(tok, cfg.vocab_size, f"the model in {path!r}")
    tblock = {**tblock, "adapter_layers": tuple(tblock.get("adapter_layers") or ())}
    return TemporalModel(cfg, tm.TemporalConfig(**tblock), Shapes(**sblock), params, tok)


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
                         "schema, docs/features/temporal.md) or a record holding one under "
                         "\"graph\"")
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
        fill_graph(arr, 0, g, query if query is not None else infer_query(g, prompt), date, sh,
                   model.tok)
    tau = np.asarray([tm.years_to_tau(t_years(date))], np.float32)
    ids = model.tok.encode(prompt)
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
        text = model.tok.decode(new)
        if stop and stop in text:
            return text[:text.index(stop)]
    return model.tok.decode(new)

"""Training and evaluation of temporal-causal (DYNAMO) adapters on TCG-Synth records.

Records (temporal spec §11.3) are loaded through HF `datasets`, tokenised as
"Question: … Answer: <answer>\\n" (syllable tokens, byte fallback) and batched with their
graphs into fixed-layout padded
`jraph.GraphsTuple`s (static N_max, E_max: one compile). The loss is the answer-token CE plus
λ·JS between the next-token distributions at τ and at τ′ inside the same graph regime (§7, log
space). Only the trainable subtree updates (`optax.multi_transform` with `set_to_zero`).

    python -m jaxdyn.experiments.temporal --preset small --out DIR   # uses everything here

Dimension legend: B batch, T length, A answer slots, V vocab, N N_max, E E_max, Ln name length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time as _time
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax

from jaxdyn.temporal.adapters import OPEN_END, years_to_tau
from jaxdyn.temporal.synth import RELS, TYPES, t_years
from jaxdyn.temporal.tokenizer import tokenizer

PAD = 0
DAY_TAU = 1.0 / 3652.5  # one day in τ units


def prompt_text(rec: dict, date_in_prompt: bool = False) -> str:
    """The prompt; the date-in-prompt baseline (Dhingra et al. 2022) prefixes the date."""
    pre = f"Date: {rec['time']}. " if date_in_prompt else ""
    return f"{pre}Question: {rec['question']} Answer:"


def answer_text(answer: str) -> str:
    """What follows the prompt: a space, the answer, and "\\n" as the end marker."""
    return f" {answer}\n"


def tokenize(text: str) -> list[int]:
    """TCG-Synth's syllable tokenizer (`jaxdyn.temporal.tokenizer`), bytes for the rest."""
    return tokenizer().encode(text)


def load_split(path: str, cache_dir: str | None = None) -> list[dict]:
    """One JSONL split through HF `datasets` (explicit features: nulls never break typing)."""
    import datasets

    from jaxdyn.temporal.synth import features

    ds = datasets.load_dataset("json", data_files=path, split="train", features=features(),
                               cache_dir=cache_dir)
    recs = ds.to_list()
    # pyarrow's JSON reader infers timestamps for ISO dates before the cast to string, which
    # appends " 00:00:00": cut every date back to YYYY-MM-DD.
    day = lambda x: None if x is None else x[:10]
    for r in recs:
        r["time"], r["regime"] = day(r["time"]), [day(x) for x in r["regime"]]
        for e in r["graph"]["edges"]:
            e["valid_from"], e["valid_to"] = day(e["valid_from"]), day(e["valid_to"])
    return recs


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Static shapes of a batch: one compile per preset."""

    seq_len: int = 128  # T
    ans_len: int = 12  # A
    n_max: int = 64  # N_max
    e_max: int = 256  # E_max
    name_len: int = 12  # Ln


def _tau(date: str | None) -> float:
    return OPEN_END if date is None else float(years_to_tau(t_years(date)))


def empty_graph_arrays(n: int, sh: Shapes) -> dict[str, np.ndarray]:
    N, E = sh.n_max, sh.e_max
    return {"tau": np.zeros(n, np.float32),
            "n_tokens": np.zeros((n, N, sh.name_len), np.int32),
            "n_tok_mask": np.zeros((n, N, sh.name_len), np.float32),
            "n_type": np.zeros((n, N), np.int32), "n_mask": np.zeros((n, N), np.float32),
            "n_query": np.zeros((n, N), np.int32), "n_entity": np.zeros((n, N), np.int32),
            "e_weight": np.zeros((n, E), np.float32), "e_from": np.zeros((n, E), np.float32),
            "e_to": np.full((n, E), OPEN_END, np.float32), "e_rel": np.zeros((n, E), np.int32),
            "e_mask": np.zeros((n, E), np.float32),
            # A padded edge points from the example's last slot to itself (weight 0, mask 0).
            "e_snd": np.full((n, E), N - 1, np.int32), "e_rcv": np.full((n, E), N - 1, np.int32)}


def fill_graph(out: dict, i: int, graph: dict, query_nodes: list[str], date: str,
               sh: Shapes) -> None:
    """Write one record graph (record schema) into row i of the padded arrays."""
    nodes, edges = graph["nodes"], graph["edges"]
    if len(nodes) > sh.n_max or len(edges) > sh.e_max:
        raise ValueError(f"graph with {len(nodes)} nodes / {len(edges)} edges exceeds "
                         f"N_max={sh.n_max} / E_max={sh.e_max}")
    out["tau"][i] = _tau(date)
    slot = {nd["id"]: k for k, nd in enumerate(nodes)}
    role = {q: (1 if j == 0 else 2) for j, q in enumerate(query_nodes)}
    for k, nd in enumerate(nodes):
        b = tokenize(" " + nd["name"])[:sh.name_len]
        out["n_tokens"][i, k, :len(b)] = b
        out["n_tok_mask"][i, k, :len(b)] = 1
        out["n_type"][i, k] = TYPES.index(nd["type"])
        out["n_mask"][i, k] = 1
        out["n_query"][i, k] = role.get(nd["id"], 0)
        out["n_entity"][i, k] = zlib.crc32(nd["id"].encode()) & 0x7FFFFFFF
    for k, e in enumerate(edges):
        out["e_weight"][i, k], out["e_rel"][i, k] = e["weight"], RELS.index(e["rel"])
        out["e_from"][i, k], out["e_to"][i, k] = _tau(e["valid_from"]), _tau(e["valid_to"])
        out["e_mask"][i, k] = 1
        out["e_snd"][i, k], out["e_rcv"][i, k] = slot[e["src"]], slot[e["dst"]]


def encode(recs: list[dict], sh: Shapes, date_in_prompt: bool = False,
           answers: list[str] | None = None) -> dict[str, np.ndarray]:
    """Numpy arrays per example; `answers` overrides each record's answer (candidate scoring)."""
    n = len(recs)
    out = {"tokens": np.zeros((n, sh.seq_len), np.int32),
           "ans_pos": np.zeros((n, sh.ans_len), np.int32),
           "ans_tok": np.zeros((n, sh.ans_len), np.int32),
           "ans_mask": np.zeros((n, sh.ans_len), np.float32),
           "regime": np.zeros((n, 2), np.float32), **empty_graph_arrays(n, sh)}
    for i, r in enumerate(recs):
        p = tokenize(prompt_text(r, date_in_prompt))
        a = tokenize(answer_text(r["answer"] if answers is None else answers[i]))
        if len(p) + len(a) > sh.seq_len or len(a) > sh.ans_len:
            raise ValueError(f"record {r['id']}: {len(p)}+{len(a)} tokens exceed seq_len="
                             f"{sh.seq_len} or ans_len={sh.ans_len}; raise the preset's Shapes")
        out["tokens"][i, :len(p) + len(a)] = p + a
        out["ans_pos"][i, :len(a)] = np.arange(len(p) - 1, len(p) + len(a) - 1)
        out["ans_tok"][i, :len(a)] = a
        out["ans_mask"][i, :len(a)] = 1
        out["regime"][i] = [_tau(r["regime"][0]), _tau(r["regime"][1])]
        fill_graph(out, i, r["graph"], r["query_nodes"], r["time"], sh)
    return out


def make_graph(arr: dict, tau_B: np.ndarray | None = None) -> jraph.GraphsTuple:
    """Fixed layout: example b owns node slots [b·N, (b+1)·N) and edge slots [b·E, (b+1)·E)."""
    B, N = arr["n_mask"].shape
    E = arr["e_mask"].shape[1]
    off = (np.arange(B, dtype=np.int32) * N)[:, None]
    flat = lambda x: x.reshape((B * x.shape[1],) + x.shape[2:])
    nodes = {"tokens": flat(arr["n_tokens"]), "tok_mask": flat(arr["n_tok_mask"]),
             "type": flat(arr["n_type"]), "mask": flat(arr["n_mask"]),
             "query": flat(arr["n_query"]), "entity": flat(arr["n_entity"])}
    edges = {"weight": flat(arr["e_weight"]), "from": flat(arr["e_from"]),
             "to": flat(arr["e_to"]), "rel": flat(arr["e_rel"]), "mask": flat(arr["e_mask"])}
    return jraph.GraphsTuple(
        nodes=nodes, edges=edges, senders=flat(arr["e_snd"] + off),
        receivers=flat(arr["e_rcv"] + off), n_node=np.full(B, N, np.int32),
        n_edge=np.full(B, E, np.int32),
        globals={"tau": np.asarray(arr["tau"] if tau_B is None else tau_B, np.float32)})


def take(arr: dict, idx) -> dict:
    return {k: v[idx] for k, v in arr.items()}


# ----------------------------------------------------------------------------- losses


def js_divergence(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """JS(P‖Q) over the last axis from log-probabilities, in log space (0 ≤ JS ≤ ln 2)."""
    logp, logq = logp.astype(jnp.float32), logq.astype(jnp.float32)
    # log M = max + (log1p(exp(−|Δ|)) − log 2): exactly log P when P = Q, so JS(P, P) = 0.
    gap = jnp.abs(logp - logq)
    gap = jnp.where(jnp.isnan(gap), 0.0, gap)  # both −inf
    logm = jnp.maximum(logp, logq) + (jnp.log1p(jnp.exp(-gap)) - math.log(2.0))
    term = lambda lx: jnp.where(lx > -jnp.inf, jnp.exp(lx) * (lx - logm), 0.0)  # 0·log 0 = 0
    kl_pm, kl_qm = jnp.sum(term(logp), axis=-1), jnp.sum(term(logq), axis=-1)
    return 0.5 * kl_pm + 0.5 * kl_qm


def answer_logprobs(out, ans_pos_BA: jax.Array) -> jax.Array:
    """log-softmax [B, A, V] at the answer positions only (never the [B, T, V] logits)."""
    h_BAD = jnp.take_along_axis(out.hidden, ans_pos_BA[..., None], axis=1)
    logits = jnp.einsum("bad,dv->bav", h_BAD, out.unembed.astype(h_BAD.dtype),
                        preferred_element_type=jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1)


def masked_mean_js(logp, logq, ans_mask_BA, ex_mask_B) -> jax.Array:
    """JS averaged over answer tokens, then over the examples kept by `ex_mask_B`."""
    js_B = jnp.sum(js_divergence(logp, logq) * ans_mask_BA, 1) / jnp.maximum(
        ans_mask_BA.sum(1), 1.0)
    return jnp.sum(js_B * ex_mask_B) / jnp.maximum(ex_mask_B.sum(), 1.0)


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Adapter training (spec §8); CPU presets raise lr and shorten the run."""

    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    warmup_frac: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0
    lam: float = 0.1  # λ of the JS regulariser
    reg_mode: str = "within"  # within | all_pairs | none
    use_time: bool = True  # False: the "without Time2Vec" ablation (time=None)
    use_graph: bool = True  # False: the "without GNN" ablation (graph=None)
    seed: int = 0
    log_every: int = 50


Forward = Callable[..., object]  # (params, tokens_BT, time_B | None, graph | None) -> ModelOutput


def labels_for(params, trainable: Callable[[tuple], bool]):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "train" if trainable(p) else "frozen", params)


def decay_mask(params):
    """Weight decay on matrices only: not on biases, norms, embeddings tables or Time2Vec."""
    def rule(path, _):
        keys = [getattr(k, "key", "") for k in path]
        return ("time2vec" not in keys) and (keys[-1].startswith("W_") or keys[-1] in
                                              ("kernel", "lora_a", "lora_b"))
    return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(params, tc: TrainConfig, trainable):
    sched = optax.warmup_cosine_decay_schedule(0.0, tc.lr, max(1, int(tc.warmup_frac *
                                               tc.steps)), max(tc.steps, 2), 0.0)
    adamw = optax.chain(optax.clip_by_global_norm(tc.clip),
                        optax.adamw(sched, 0.9, 0.999, weight_decay=tc.weight_decay,
                                    mask=decay_mask))
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                                 labels_for(params, trainable))


def trainable_fraction(params, trainable) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    n_t = sum(int(np.prod(x.shape)) for p, x in flat if trainable(p))
    return n_t, sum(int(np.prod(x.shape)) for _, x in flat) - n_t


def loss_fn(params, batch, graph, rng, forward: Forward, tc: TrainConfig, trainable):
    """CE on answer tokens + λ·JS(P_τ ‖ P_τ′); frozen leaves get exactly zero gradient."""
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x if trainable(p) else jax.lax.stop_gradient(x), params)
    tau = batch["tau"]
    time = tau if tc.use_time else None
    g = graph if tc.use_graph else None
    logp = answer_logprobs(forward(params, batch["tokens"], time, g), batch["ans_pos"])
    m = batch["ans_mask"]
    nll = -jnp.take_along_axis(logp, batch["ans_tok"][..., None], axis=-1)[..., 0]
    ce = jnp.sum(nll * m) / jnp.maximum(m.sum(), 1.0)
    reg = jnp.zeros((), jnp.float32)
    active = tc.lam > 0 and tc.reg_mode != "none" and (tc.use_time or tc.reg_mode == "all_pairs")
    if active:
        a, b = batch["regime"][:, 0], batch["regime"][:, 1]
        if tc.reg_mode == "within":
            tau2 = a + jax.random.uniform(rng, a.shape) * (b - a)
            keep = (b - a >= DAY_TAU).astype(jnp.float32)
        else:  # all_pairs: a random other example's time, no regime (ablation only)
            tau2 = tau[jax.random.permutation(rng, tau.shape[0])]
            keep = jnp.ones_like(tau)
        g2 = None if g is None else g._replace(globals={"tau": tau2})
        logq = answer_logprobs(forward(params, batch["tokens"], tau2 if tc.use_time else None,
                                       g2), batch["ans_pos"])
        reg = masked_mean_js(logp, logq, m, keep)
    return ce + tc.lam * reg, {"ce": ce, "reg": reg}


def group_norms(grads, trainable) -> dict[str, jax.Array]:
    """Gradient norm per trainable group (`temporal/time2vec`, `temporal/graph`, …)."""
    out = {}
    for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        if trainable(p):
            keys = [getattr(k, "key", "") for k in p]
            name = "/".join(keys[:2])
            out[name] = out.get(name, 0.0) + jnp.sum(jnp.square(g.astype(jnp.float32)))
    return {f"grad_norm/{k}": jnp.sqrt(v) for k, v in out.items()}


def train_temporal(forward: Forward, params, data: dict, tc: TrainConfig,
                   trainable: Callable[[tuple], bool], out_dir: str | None = None,
                   name: str = "run", log: Callable[[str], None] = print):
    """AdamW on the trainable subtree only; returns (params, history of logged metrics)."""
    n_t, n_f = trainable_fraction(params, trainable)
    frac = n_t / max(n_f, 1)
    log(f"[{name}] trainable params {n_t:,} / frozen {n_f:,} = {100 * frac:.3f}% of the backbone")
    opt = make_optimizer(params, tc, trainable)
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch, graph, rng):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, graph, rng, forward, tc, trainable)
        upd, state = opt.update(grads, state, params)
        aux = {**aux, "loss": loss, **group_norms(grads, trainable)}
        return optax.apply_updates(params, upd), state, aux

    rng = np.random.default_rng(tc.seed)
    key = jax.random.key(tc.seed)
    n = data["tokens"].shape[0]
    hist, t0 = [], _time.time()
    writer = None if out_dir is None else open(os.path.join(out_dir, "metrics.jsonl"), "a")
    if writer:
        writer.write(json.dumps({"step": 0, "run": name, "trainable_params": n_t,
                                 "frozen_params": n_f, "trainable_fraction": frac}) + "\n")
    for s in range(1, tc.steps + 1):
        idx = rng.choice(n, size=tc.batch_size, replace=False)
        batch = take(data, idx)
        graph = make_graph(batch)
        dev = {k: batch[k] for k in ("tokens", "ans_pos", "ans_tok", "ans_mask", "tau",
                                     "regime")}
        params, state, aux = step(params, state, dev, graph, jax.random.fold_in(key, s))
        if s % tc.log_every == 0 or s == tc.steps:
            row = {k: float(v) for k, v in jax.device_get(aux).items()}
            if not np.isfinite(row["loss"]):
                raise FloatingPointError(f"[{name}] non-finite loss at step {s}")
            row.update(step=s, run=name, time=round(_time.time() - t0, 2))
            hist.append(row)
            log(f"[{name}] step {s} loss {row['loss']:.4f} ce {row['ce']:.4f} "
                f"reg {row['reg']:.5f} ({row['time']:.0f}s)")
            if writer:
                writer.write(json.dumps({f"train/{k}" if k not in ("step", "run", "time") else k:
                                         v for k, v in row.items()}, allow_nan=False) + "\n")
                writer.flush()
    if writer:
        writer.close()
    return params, hist

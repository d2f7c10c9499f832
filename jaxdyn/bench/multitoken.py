"""Multi-token bench: a tiny MTP model trained by the trainer on the built-in corpus, decoded
by plain KV-cached decoding, lossless verify mode (chain and tree) and DynaMo dynamic sampling
over ε_b (selection on the host and on device).

    python -m jaxdyn.bench --suite multitoken --preset small   # multitoken preset `tiny`
    python -m jaxdyn.bench --suite multitoken --preset tiny    # multitoken preset `smoke`

Training goes through the one trainer (`jaxdyn.train.train_and_evaluate`) with the shapes of
configs/mtp.py:tiny (GPT-NeoX D=64, byte tokenizer, built-in corpus), in two stages like
`python -m jaxdyn.train` would run them:

1. a dense model, objective `lm`, into `<out>/dense`;
2. the `mtp` objective (3 heads) from `init.checkpoint=<out>/dense` into `<out>/mtp`, with the
   paper's learning-rate ratios on a small base lr: LR_M = 100 LR_B through
   `train.lr_groups=(("^heads/", 100.0),)` and LR_MB = 0.1 LR_B (`mtp.stem_grad_scale`).

Both workdirs are emptied first (the trainer would otherwise resume them). The trained model is
read back with `jaxdyn.checkpoint.load_model`; PPL_i and PPL_1:n come from
`jaxdyn.evaluate.perplexity.evaluate` on validation batches of the same corpus.

Rows report tokens per forward pass (prefill excluded) and the wall-clock speed-up against
single-token decoding of the same model, measured in the same run after a warm-up call (no
compilation is timed). Verify rows also report whether the output equals plain decoding token
for token, and the acceptance per draft depth. A PNG plots the dynamic mode against ε_b.
`<out>/multitoken.json` holds the rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
from matplotlib.figure import Figure

from jaxdyn.checkpoint import load_model
from jaxdyn.data.tokenizer import load_tokenizer
from jaxdyn.decode.generate import generate
from jaxdyn.decode.sampling import SamplingConfig
from jaxdyn.evaluate.perplexity import evaluate, load_corpus
from jaxdyn.multitoken import mechanism as mech
from jaxdyn.multitoken.cooccur import CooccurTables, build_tables, builtin_docs
from jaxdyn.multitoken.decode import generate_multitoken, generate_verify
from jaxdyn.multitoken.device import device_tables, generate_multitoken_device
from jaxdyn.multitoken.grid import DynamoOptions
from jaxdyn.multitoken.heads import all_logits, dense_params_of, multitoken_model
from jaxdyn.multitoken.objective import markov_corpus
from jaxdyn.train import schema, train_and_evaluate

PRESETS = {
    # ~6-8 min on 2 CPU cores: GPT-NeoX D=64, L=4 over bytes; the mechanism check ~3.5 min.
    "tiny": dict(layers=4, dense_steps=800, mtp_steps=600, batch=16, seq_len=128,
                 lr_dense=3e-3, lr_base=3e-5, prompts=8, max_new=96, train_docs=390,
                 mechanism=1500),
    # Seconds: checks the harness end to end (numbers are not meaningful).
    "smoke": dict(layers=2, dense_steps=20, mtp_steps=20, batch=4, seq_len=32,
                  lr_dense=3e-3, lr_base=3e-5, prompts=2, max_new=16, train_docs=40,
                  mechanism=10, mechanism_docs=100, mechanism_held=2, mechanism_new=16),
}
EPS = (0.0, 0.25, 0.5, 0.75, 1.0)
TOP_KS = (50, 10)
TREE = "8,4"  # tree verify: top-8 drafts of head 2, top-4 of head 3 under each (1+8+32 nodes)
CONFIG = "configs/mtp.py:tiny"  # GPT-NeoX block, the `mtp` block with its defaults
N_HEADS = 3
LR_GROUPS = (("^heads/", 100.0),)  # LR_M : LR_B = 100 : 1 (the paper's ratio)
VAL_BATCHES, VAL_ROWS = 4, 8  # validation batches of the perplexity rows


def _timed(fn: Callable, repeats: int = 2):
    """Warm-up call (compiles), then the best of `repeats` timed calls."""
    fn()
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t0
        best = (dt, res) if best is None or dt < best[0] else best
    return best


def _decode_rate(res) -> float:
    """Tokens after each prompt's first / decode seconds (same definition for every mode)."""
    return res.tokens_per_sec


def train_stage(workdir: str, values: dict, steps: int) -> dict[str, float]:
    """`python -m jaxdyn.train --config configs/mtp.py:tiny --workdir WORKDIR --config.k=v ...`
    for `values` ({key: value}) in a fresh `workdir`; validation and a checkpoint at the end
    only, no closing sample. Returns the trainer's last metrics."""
    values = {"train.steps": steps, "eval.every": steps, "eval.batches": 2,
              "checkpoint.every": steps, "log.every": min(100, steps),
              "log.tensorboard": False, "sample.max_new_tokens": 0, "mesh.data": 1, **values}
    overrides = [f"{k}={v if isinstance(v, str) else repr(v)}" for k, v in values.items()]
    shutil.rmtree(workdir, ignore_errors=True)  # the trainer resumes a workdir it finds
    return train_and_evaluate(schema.load(CONFIG, overrides), workdir)


def train(p: dict, out_dir: str) -> str:
    """Stage 1 (dense, objective `lm`) into `<out_dir>/dense`, stage 2 (`mtp` from it) into
    `<out_dir>/mtp`; returns the mtp workdir."""
    dense_dir = os.path.abspath(os.path.join(out_dir, "dense"))
    mtp_dir = os.path.abspath(os.path.join(out_dir, "mtp"))
    shared = {"model.num_layers": p["layers"], "tokenizer.kind": "byte",
              "data.source": "builtin", "data.max_documents": p["train_docs"],
              "train.batch_size": p["batch"], "train.seq_len": p["seq_len"],
              "mtp.n_heads": N_HEADS}
    train_stage(dense_dir, {**shared, "train.objective": "lm", "train.lr": p["lr_dense"],
                            "train.warmup_steps": max(1, p["dense_steps"] // 20)},
                p["dense_steps"])
    train_stage(mtp_dir, {**shared, "train.objective": "mtp", "init.checkpoint": dense_dir,
                          "train.lr": p["lr_base"], "train.lr_groups": LR_GROUPS,
                          "train.warmup_steps": max(1, p["mtp_steps"] // 100)},
                p["mtp_steps"])
    return mtp_dir


def run(preset: str = "tiny", out_dir: str | None = None) -> list[dict]:
    """Train (`train`), evaluate and decode with this module's preset `preset`, then the
    mechanism check; writes the workdirs, `multitoken.json` and `multitoken_eps.png` into
    `out_dir` (default runs/bench/multitoken) and returns the rows."""
    p = _preset(preset)
    out_dir = out_dir or os.path.join("runs", "bench", "multitoken")
    rows = decoding(preset, out_dir)
    if p["mechanism"]:
        rows += mechanism(p["mechanism"], out_dir=os.path.join(out_dir, "mechanism"),
                          n_docs=p.get("mechanism_docs", 1000),
                          held_docs=p.get("mechanism_held", 8),
                          n_new=p.get("mechanism_new", 64))
    _plot(rows, os.path.join(out_dir, "multitoken_eps.png"))
    with open(os.path.join(out_dir, "multitoken.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def _preset(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def decoding(preset: str, out_dir: str) -> list[dict]:
    """Train the preset's MTP model into `out_dir`, then decode the same prompts (batch 1, one
    at a time: the latency setting) by every mode, each against single-token decoding in the
    same run: plain greedy / sampling, chain and tree verify (lossless: `identical` compares
    with plain greedy), and DynaMo's dynamic sampling over ε_b and top-k with the selection on
    the host and on device (`identical` compares device with host tokens)."""
    p = _preset(preset)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    mtp_dir = train(p, out_dir)
    train_s = time.perf_counter() - t0
    cfg, params, tok_dir = load_model(mtp_dir)
    tok = load_tokenizer(tok_dir)
    corpus = load_corpus(tok, "builtin", "validation", seq_len=p["seq_len"],
                         batch_size=VAL_ROWS, max_batches=VAL_BATCHES,
                         max_documents=p["train_docs"])
    ppl = evaluate(cfg, params, corpus.batches)
    dense = dense_params_of(params)
    docs = builtin_docs(max_docs=p["train_docs"])
    val = builtin_docs(max_docs=p["train_docs"], split="validation") or docs[-8:]
    base = {"suite": "multitoken", "preset": preset, "device": jax.devices()[0].platform,
            "train_seconds": round(train_s, 1),
            **{k.replace("mtp/", ""): round(v, 3) for k, v in ppl.items()
               if k.startswith("mtp/ppl")}}
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in d[s:s + 24]]
               for d, s in ((d, int(rng.integers(0, max(1, len(d) - 24)))) for d in
                            (val + docs)[:p["prompts"]])]
    rows = []

    def row(mode, res, ref_rate, **kw):
        rows.append({**base, "mode": mode, "tokens_per_forward": round(res.tokens_per_forward, 3),
                     "tokens_per_sec": round(_decode_rate(res), 1),
                     "speedup": round(_decode_rate(res) / ref_rate, 3), **kw})

    def each(fn):  # batch 1, one prompt at a time (latency setting), results summed
        outs = [fn([q]) for q in prompts]
        return _Merged(outs)

    greedy = SamplingConfig()
    _, plain = _timed(lambda: each(lambda q: generate(cfg, dense, q, p["max_new"], greedy)))
    ref_rate = _decode_rate(plain)
    row("plain-greedy", _Plain(plain), ref_rate)
    _, ver = _timed(lambda: each(lambda q: generate_verify(cfg, params, q, p["max_new"])))
    row("verify-greedy", ver, ref_rate, identical=ver.tokens == plain.tokens,
        acceptance=[round(float(a), 3) for a in ver.acceptance])
    tree = p.get("tree", TREE)
    _, tv = _timed(lambda: each(lambda q: generate_verify(cfg, params, q, p["max_new"],
                                                          tree=tree)))
    row("tree-verify-greedy", tv, ref_rate, tree=tree, identical=tv.tokens == plain.tokens,
        acceptance=[round(float(a), 3) for a in tv.acceptance])

    opts0 = DynamoOptions()
    samp = SamplingConfig(opts0.temperature, opts0.top_k, 1.0, opts0.repetition_penalty)
    _, plain_s = _timed(lambda: each(lambda q: generate(cfg, dense, q, p["max_new"], samp)))
    ref_s = _decode_rate(plain_s)
    row("plain-sample", _Plain(plain_s), ref_s)
    _, ver_s = _timed(lambda: each(lambda q: generate_verify(cfg, params, q, p["max_new"],
                                                             samp)))
    row("verify-sample", ver_s, ref_s, acceptance=[round(float(a), 3) for a in ver_s.acceptance])

    with tempfile.TemporaryDirectory() as tdir:
        build_tables(docs, cfg.vocab_size, tdir, fingerprint=tok.fingerprint())
        tables = CooccurTables(tdir)
        dev_tables = device_tables(tables, N_HEADS)
        for top_k in p.get("top_ks", TOP_KS):
            for eps in p.get("eps", EPS):
                opts = dataclasses.replace(opts0, threshold=eps, top_k=top_k)
                samp_k = SamplingConfig(opts.temperature, top_k, 1.0, opts.repetition_penalty)
                _, pk = _timed(lambda s=samp_k: each(
                    lambda q: generate(cfg, dense, q, p["max_new"], s)), repeats=1)
                _, res = _timed(lambda o=opts: each(lambda q: generate_multitoken(
                    cfg, params, tables, q, p["max_new"], o)), repeats=1)
                _, dev = _timed(lambda o=opts: each(lambda q: generate_multitoken_device(
                    cfg, params, dev_tables, q, p["max_new"], o)), repeats=1)
                for mode, r, extra in (("dynamic", res, {}),
                                       ("dynamic-device", dev,
                                        {"identical": dev.tokens == res.tokens})):
                    row(mode, r, _decode_rate(pk), eps_b=eps, top_k=top_k, **extra,
                        emitted_share=[round(float(x), 3) for x in
                                       r.emission_hist[1:] / max(r.emission_hist.sum(), 1)])
    return rows


def mechanism(steps: int, V: int = 64, order: int = 2, out_dir: str | None = None,
              n_docs: int = 1000, held_docs: int = 8, n_new: int = 64) -> list[dict]:
    """The mechanism check (docs/features/multitoken.md §8; maths in
    `jaxdyn.multitoken.mechanism`) on a known Markov chain of `order` (default 2) over V tokens
    (3 successors per context), trained by the trainer (`mtp` objective from scratch, 3 heads,
    D=64 L=2) for `steps` on `n_docs` of the chain's documents written as a JSONL of id texts
    ("3 17 5 ...", tokenizer kind `ids`) in `out_dir` (default: a temporary folder). The model
    has V + 2 logits (the chain's V ids, then EOS and pad); the KL rows use the heads'
    distributions renormalised over the first V ids. The co-occurrence tables count the same
    documents over the V ids.

    Rows: `mechanism-kl`, the mean over `held_docs` unseen documents (every position with an
    order-sized context) of KL(true ‖ estimate) of the joint of (x_{t+1}, x_{t+2}) for the
    product of heads, with co-occurrence weighting, and with weighting + thresholds (ε_b = 0.5,
    Otsu); `mechanism-ancestral`, ancestral samples from the true chain after the prompts (the
    reference: match rate 1); `mechanism-dynamic`, DynaMo decoding (top-k 10, temperature 1, no
    repetition penalty) across ε_b with the co-occurrence weighting (α_c = 1) and without it
    (α_c = 0: no weighting, no mask), each with tokens per forward, match rate and mean true
    log-probability of the matching tokens."""
    if order not in (1, 2):
        raise ValueError(f"mechanism check: order must be 1 or 2, got {order}")
    all_docs, trans = markov_corpus(V, n_docs=n_docs + held_docs, branching=3, order=order,
                                    seed=0)
    docs, held = all_docs[:n_docs], all_docs[n_docs:]  # held: unseen by training and tables
    info = {"suite": "multitoken", "chain_order": order, "chain_vocab": V, "train_docs": n_docs,
            "steps": steps}
    rows = []
    with tempfile.TemporaryDirectory() as tdir:
        root = out_dir or os.path.join(tdir, "mechanism")
        os.makedirs(root, exist_ok=True)
        source = os.path.abspath(os.path.join(root, "markov.jsonl"))
        with open(source, "w") as f:
            for d in docs:
                f.write(json.dumps({"text": " ".join(str(int(t)) for t in d)}) + "\n")
        workdir = os.path.abspath(os.path.join(root, "run"))
        train_stage(workdir, {
            "train.objective": "mtp", "mtp.n_heads": N_HEADS, "model.num_layers": 2,
            "model.vocab_size": V + 2, "tokenizer.kind": "ids", "tokenizer.vocab_size": V,
            "data.source": source, "data.max_documents": 0, "data.val_fraction": 0.0,
            "train.batch_size": 16, "train.seq_len": 64, "train.lr": 3e-3,
            "train.lr_groups": (), "train.warmup_steps": max(1, steps // 100)}, steps)
        cfg, params, _ = load_model(workdir)
        if cfg.vocab_size != V + 2:
            raise RuntimeError(f"mechanism model has {cfg.vocab_size} logits, expected {V + 2}")
        build_tables(docs, V, os.path.join(tdir, "cooccur"))
        tables = CooccurTables(os.path.join(tdir, "cooccur"))
        rho = tables.grid_ratio(np.stack([np.arange(V)] * 2))
        kl: dict[str, list[float]] = {k: [] for k in mech.ESTIMATES}
        model = multitoken_model(cfg, N_HEADS)
        heads12 = jax.jit(lambda p, x: jax.nn.softmax(  # heads 1, 2 over the chain's V ids
            all_logits(model.apply({"params": p}, x))[:2, 0, :, :V], -1))
        for d in held:
            x = np.asarray(d[:64])[None]
            probs = np.asarray(heads12(params, x), np.float64)  # [2, T, V]
            for t in range(order - 1, x.shape[1]):
                true = mech.true_joint(trans, x[0, :t + 1])
                for name, est in mech.joint_estimates(probs[0, t], probs[1, t], rho).items():
                    kl[name].append(mech.kl_divergence(true, est))
        rows.append({**info, "mode": "mechanism-kl", "positions": len(kl["product"]),
                     **{f"kl_{k}": round(float(np.mean(v)), 4) for k, v in kl.items()}})
        prompts = [[int(t) for t in d[:8]] for d in held]
        rng = np.random.default_rng(1)
        anc = [mech.ancestral(trans, q, n_new, rng) for q in prompts]
        rows.append({**info, "mode": "mechanism-ancestral", "tokens_per_forward": 1.0,
                     **_rounded(mech.match_stats(trans, prompts, anc))})
        for weighting, alpha_c in (("cooccur", 1.0), ("none", 0.0)):
            for eps in EPS:
                opts = DynamoOptions(threshold=eps, top_k=10, temperature=1.0,
                                     repetition_penalty=1.0, alpha_c=alpha_c)
                res = generate_multitoken(cfg, params, tables, prompts, n_new, opts)
                rows.append({**info, "mode": "mechanism-dynamic", "weighting": weighting,
                             "eps_b": eps, "tokens_per_forward": round(res.tokens_per_forward, 3),
                             **_rounded(mech.match_stats(trans, prompts, res.tokens))})
    return rows


def _rounded(stats: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}


@dataclasses.dataclass
class _Merged:
    """Sum of per-prompt results (MTPResult or GenerationResult) as one result."""

    parts: list

    @property
    def tokens(self):
        return [t for r in self.parts for t in r.tokens]

    @property
    def tokens_per_sec(self):
        n = sum(max(len(t) - 1, 0) for t in self.tokens)
        return n / sum(r.decode_seconds for r in self.parts)

    @property
    def tokens_per_forward(self):
        return (sum(r.emitted for r in self.parts)
                / max(sum(r.row_forwards for r in self.parts), 1))

    @property
    def acceptance(self):
        acc = sum(r.accepted for r in self.parts)
        return acc / np.maximum(sum(r.reached for r in self.parts), 1)

    @property
    def emission_hist(self):
        return sum(r.emission_hist for r in self.parts)


class _Plain:
    """Plain decoding seen through the MTP result surface: one token per forward."""

    def __init__(self, merged: _Merged):
        self.m = merged
        self.tokens_per_forward = 1.0

    @property
    def tokens_per_sec(self):
        return self.m.tokens_per_sec


def _plot(rows: list[dict], path: str) -> None:
    fig = Figure(figsize=(9, 3.5))
    ax = fig.subplots(1, 2)
    for mode, style in (("dynamic", "o-"), ("dynamic-device", "s--")):
        for k in sorted({r["top_k"] for r in rows if r["mode"] == mode}):
            rs = [r for r in rows if r["mode"] == mode and r["top_k"] == k]
            eps = [r["eps_b"] for r in rs]
            ax[0].plot(eps, [r["tokens_per_forward"] for r in rs], style, label=f"{mode} k={k}")
            ax[1].plot(eps, [r["speedup"] for r in rs], style, label=f"{mode} k={k}")
    for r in rows:
        if "verify" in r["mode"]:
            ax[0].axhline(r["tokens_per_forward"], ls="--", lw=1, label=r["mode"])
            ax[1].axhline(r["speedup"], ls="--", lw=1, label=r["mode"])
    ax[0].set(xlabel="ε_b", ylabel="tokens per forward")
    ax[1].set(xlabel="ε_b", ylabel="speed-up vs single-token (wall clock)")
    ax[1].axhline(1.0, color="k", lw=0.5)
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


DYNAMO_SPEEDUP, DYNAMO_TPF, TREE_TPF = 1.5, 2.0, 2.0  # issue targets (CPU, wall clock)


def _targets(r: dict) -> dict:
    """The decoding targets: DynaMo on device >= 1.5x single-token tokens/s where it emits
    >= 2 tokens per forward, same tokens as the host; tree verify >= 2 tokens per forward and
    the plain greedy output."""
    if r.get("mode") == "dynamic-device":
        return {"target": f"tokens/s >= {DYNAMO_SPEEDUP}x single-token at >= {DYNAMO_TPF} "
                          "tokens/forward, tokens == host",
                "meets_target": bool(r["speedup"] >= DYNAMO_SPEEDUP and r["identical"])
                if r["tokens_per_forward"] >= DYNAMO_TPF else None}
    if r.get("mode") == "tree-verify-greedy":
        return {"target": f"tokens/forward >= {TREE_TPF}, output == plain greedy",
                "meets_target": bool(r["tokens_per_forward"] >= TREE_TPF and r["identical"])}
    return {}


def _bench_rows(raw: list[dict], suite_name: str, own: str) -> list[dict]:
    rows = []
    for r in raw:
        name = r.get("mode", "?")
        if "weighting" in r:
            name += f" eps={r['eps_b']} weighting={r['weighting']}"
        elif "eps_b" in r:
            name += f" eps={r['eps_b']} top_k={r.get('top_k')}"
        elif "tree" in r:
            name += f" tree={r['tree']}"
        rows.append({**{k: v for k, v in r.items() if k not in ("tokens_per_sec", "speedup")},
                     "suite": suite_name, "name": name, "impl": "jaxdyn",
                     "tokens_per_s": r.get("tokens_per_sec"), "ratio": r.get("speedup"),
                     "ref": "single-token" if "speedup" in r else None,
                     "notes": f"multitoken preset {own}; tokens/forward "
                              f"{r.get('tokens_per_forward')}", **_targets(r)})
    return rows


def _own(preset: str) -> str:
    return "smoke" if preset == "tiny" else "tiny"


def suite(preset: str, ctx: dict) -> list[dict]:
    """The `multitoken` suite of `python -m jaxdyn.bench`: this module's own preset `smoke`
    for the bench preset `tiny`, else `tiny`; rows in the bench's fields, `ctx["multitoken_dir"]`
    for the outputs."""
    return _bench_rows(run(_own(preset), ctx.get("multitoken_dir")), "multitoken", _own(preset))


def decoding_suite(preset: str, ctx: dict) -> list[dict]:
    """The decoding rows alone (no mechanism check), for the `inference` suite: trained into
    `ctx["multitoken_dir"]/inference` (default runs/bench/inference_multitoken)."""
    root = ctx.get("multitoken_dir")
    out = (os.path.join(root, "inference") if root else
           os.path.join("runs", "bench", "inference_multitoken"))
    return _bench_rows(decoding(_own(preset), out), "inference", _own(preset))

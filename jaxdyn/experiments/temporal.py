"""TCG-Synth experiment: DYNAMO adapters vs ablations vs date-in-prompt on a frozen backbone.

    python -m jaxdyn.experiments.temporal --preset small --out runs/temporal
    python -m jaxdyn.experiments.temporal --config configs/temporal.py:tiny --out DIR \
        --config.adapter.steps=50

Steps: generate TCG-Synth (JSONL, loaded back through HF `datasets`); pretrain a tiny qwen2
backbone from scratch on the train questions with answers (no dates, no graphs) and freeze it;
train the temporal adapters (full model and ablations) and a date-in-prompt + LoRA(q, v)
baseline on the same frozen backbone; evaluate every run on every split; write
`results.json`, `results.md`, `accuracy_by_year.png`, `metrics.jsonl` and the full model's
temporal checkpoint (`checkpoint/`, for `python -m jaxdyn.generate --time --graph`) into DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdyn.model import ModelConfig, build, init_params
from jaxdyn.temporal import adapters as tm
from jaxdyn.temporal import scoring as ev
from jaxdyn.temporal.batching import (
    Shapes,
    TrainConfig,
    answer_text,
    encode,
    load_split,
    prompt_text,
    tokenize,
    train_temporal,
    trainable_fraction,
)
from jaxdyn.temporal.generate import save_temporal
from jaxdyn.temporal.synth import SPLITS, SynthConfig, generate, make_names, write

RUNS = ("base", "full", "no_time2vec", "no_gnn", "no_reg", "all_pairs", "date_in_prompt",
        "token_conditioned", "mean_readout")


@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything one experiment needs, built from configs/temporal.py (`from_config`)."""

    synth: SynthConfig
    shapes: Shapes
    backbone: ModelConfig
    temporal: tm.TemporalConfig
    pretrain_steps: int
    pretrain_lr: float
    train: TrainConfig
    pretrain_rename: float = 1.0  # fraction of pretraining questions with fresh names
    pretrain_prompt_weight: float = 0.1  # loss weight of prompt tokens (answers weigh 1)
    pretrain_batch: int = 32
    lora_rank: int = 8
    eval_batch: int = 64
    runs: tuple[str, ...] = RUNS
    save_checkpoint: str = "full"
    init_checkpoint: str = ""
    seed: int = 0
    name: str = ""


def temporal_config(block) -> tm.TemporalConfig:
    """`TemporalConfig` from a config's `temporal` block (() adapter_layers = every layer)."""
    d = dict(block)
    d["adapter_layers"] = tuple(d["adapter_layers"]) or None
    return tm.TemporalConfig(**d)


def from_config(cfg) -> Preset:
    """configs/temporal.py -> Preset (unknown run names fail here, before any work)."""
    from jaxdyn.config import loader as configlib
    bad = [r for r in cfg.experiment.runs if r not in RUNS]
    if bad:
        raise ValueError(f"unknown experiment.runs {bad}; choose from {RUNS}")
    synth = dict(cfg.synth)
    seed = synth.pop("seed")
    return Preset(synth=SynthConfig(**synth), shapes=Shapes(**dict(cfg.shapes)),
                  backbone=configlib.model_config(cfg), temporal=temporal_config(cfg.temporal),
                  pretrain_steps=cfg.pretrain.steps, pretrain_lr=cfg.pretrain.lr,
                  train=TrainConfig(**dict(cfg.adapter)), pretrain_rename=cfg.pretrain.rename,
                  pretrain_prompt_weight=cfg.pretrain.prompt_weight,
                  pretrain_batch=cfg.pretrain.batch_size,
                  lora_rank=cfg.experiment.lora_rank, eval_batch=cfg.experiment.eval_batch,
                  runs=tuple(cfg.experiment.runs),
                  save_checkpoint=cfg.experiment.save_checkpoint,
                  init_checkpoint=cfg.init.checkpoint, seed=seed, name=cfg.preset)


def load_preset(spec: str, overrides=()) -> Preset:
    """`configs/temporal.py:small` (or a bare preset name) with `--config.a.b=v` overrides."""
    from jaxdyn.config import loader as configlib
    if ":" not in spec and not spec.endswith(".py"):
        spec = f"configs/temporal.py:{spec}"
    return from_config(configlib.load_config(spec, overrides))


def trainable_fraction_at(cfg: ModelConfig, tcfg: tm.TemporalConfig) -> dict:
    """Exact counts from shapes (`jax.eval_shape`, no allocation)."""
    tree = tm.abstract_params(cfg, tcfg)
    size = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
    n_t = size(tree["temporal"])
    n_b = size({k: v for k, v in tree.items() if k != "temporal"})
    return {"trainable": n_t, "backbone": n_b, "fraction": n_t / n_b,
            "by_part": tm.count_temporal_params(cfg, tcfg)}


# ----------------------------------------------------------------------------- backbone


def renamed_text(rec: dict, rng: np.random.Generator) -> tuple[str, str]:
    """(prompt, answer) text of the record with its query entities given fresh names."""
    names = {n["id"]: n["name"] for n in rec["graph"]["nodes"]}
    old = [names[q] for q in rec["query_nodes"]]
    table = dict(zip(old, make_names(rng, len(old)), strict=True))
    pat = re.compile(r"\b(" + "|".join(map(re.escape, old)) + r")\b")
    sub = lambda text: pat.sub(lambda m: table[m.group(1)], text)
    return sub(prompt_text(rec)), sub(answer_text(rec["answer"]))


def pretrain_arrays(pairs: list[tuple[str, str]], seq_len: int,
                    prompt_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [n, T] and the loss weight of predicting token j+1 at j, [n, T−1]: 1 for answer
    tokens, `prompt_weight` for prompt tokens, 0 for padding."""
    toks = np.zeros((len(pairs), seq_len), np.int32)
    wts = np.zeros((len(pairs), seq_len - 1), np.float32)
    for i, (prompt, answer) in enumerate(pairs):
        n_p, b = len(tokenize(prompt)), tokenize(prompt + answer)[:seq_len]
        toks[i, :len(b)] = b
        wts[i, :len(b) - 1] = prompt_weight
        wts[i, n_p - 1:len(b) - 1] = 1.0
    return toks, wts


def pretrain_backbone(cfg: ModelConfig, recs: list[dict], sh: Shapes, steps: int, lr: float,
                      batch: int, seed: int, rename: float = 1.0, prompt_weight: float = 1.0,
                      log=print) -> dict:
    """Next-token LM on "Question: … Answer: …\\n" (no dates, no graphs), from scratch.

    A fraction `rename` of the examples get fresh entity names, drawn anew every epoch, so the
    backbone cannot memorise who answered. Prompt tokens weigh `prompt_weight` in the loss and
    answer tokens 1: the fresh names in a prompt are unpredictable noise, and at 0 the whole
    gradient goes to reading the answer off the prompt.
    """
    rng = np.random.default_rng(seed)
    epochs = max(1, -(-steps * batch // len(recs)))
    pairs = [renamed_text(r, rng) if rng.random() < rename else
             (prompt_text(r), answer_text(r["answer"])) for _ in range(epochs) for r in recs]
    toks, wts = pretrain_arrays(pairs, sh.seq_len, prompt_weight)
    model = build(cfg)
    params = init_params(cfg, jax.random.key(seed))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), max(steps, 2))
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, w):
        def loss(p):
            logp = jax.nn.log_softmax(model.apply({"params": p}, x[:, :-1]).logits)
            nll = -jnp.take_along_axis(logp, x[:, 1:, None], axis=-1)[..., 0]
            return jnp.sum(nll * w) / jnp.maximum(w.sum(), 1.0)
        val, g = jax.value_and_grad(loss)(params)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, val

    t0 = time.time()
    for s in range(1, steps + 1):
        idx = rng.choice(len(toks), batch, False)
        params, state, val = step(params, state, toks[idx], wts[idx])
        if s % max(1, steps // 6) == 0 or s == steps:
            log(f"[backbone] step {s} lm loss {float(val):.4f} ({time.time() - t0:.0f}s)")
    return params


# ----------------------------------------------------------------------------- runs


@functools.lru_cache(maxsize=8)
def adapter_forward(cfg, tcfg):
    """One forward per (cfg, tcfg), so the jitted evaluation functions are shared by runs."""
    model = tm.build(cfg, tcfg)
    return lambda p, tok, t, g: model.apply({"params": p}, tok, conditioning={"time": t, "graph": g},
                                            compute_logits=False)


def lora_forward(cfg: ModelConfig):
    """CausalLM with LoRA on q and v, merged into the kernels: W + A·B (Hu et al. 2021)."""
    model = build(cfg)

    def forward(params, tok, t, g):
        del t, g
        p = {k: v for k, v in params.items() if k != "lora"}
        attn = dict(p["layers"]["attn"])
        for name in ("q", "v"):
            ab = params["lora"][name]
            delta = jnp.einsum("ldr,lrhk->ldhk", ab["lora_a"], ab["lora_b"])
            attn[name] = {**attn[name], "kernel": attn[name]["kernel"] + delta}
        p["layers"] = {**p["layers"], "attn": attn}
        return model.apply({"params": p}, tok, compute_logits=False)
    return forward


def init_lora(cfg: ModelConfig, rank: int, key) -> dict:
    L, D = cfg.num_layers, cfg.hidden_size
    out = {}
    for i, (name, heads) in enumerate((("q", cfg.num_heads), ("v", cfg.num_kv_heads))):
        a = jax.random.normal(jax.random.fold_in(key, i), (L, D, rank)) / np.sqrt(D)
        out[name] = {"lora_a": a, "lora_b": jnp.zeros((L, rank, heads, cfg.head_dim))}
    return out


def run_spec(name: str, p: Preset) -> TrainConfig | None:
    """The adapter training config of a run (None: the untrained, frozen base)."""
    t, rep = p.train, dataclasses.replace
    return {"base": None, "full": t, "no_time2vec": rep(t, use_time=False),
            "no_gnn": rep(t, use_graph=False), "no_reg": rep(t, lam=0.0, reg_mode="none"),
            "all_pairs": rep(t, reg_mode="all_pairs"),
            "date_in_prompt": rep(t, use_time=False, use_graph=False, reg_mode="none"),
            "token_conditioned": t, "mean_readout": t}[name]


def run_temporal(name: str, p: Preset) -> tm.TemporalConfig:
    """The temporal pathway of a run: the preset's, or its architecture ablation (spec §11.5)."""
    rep = dataclasses.replace
    return {"token_conditioned": rep(p.temporal, token_conditioned=True),
            "mean_readout": rep(p.temporal, readout="mean")}.get(name, p.temporal)


def fraction_at_05b() -> dict:
    """Trainable fraction of the `qwen2.5-0.5b` preset, from shapes only."""
    p = load_preset("qwen2.5-0.5b")
    return trainable_fraction_at(p.backbone, p.temporal)


def make_run(name: str, p: Preset, backbone: dict):
    """(forward, params, trainable predicate, date_in_prompt) of one run on the backbone."""
    if name == "date_in_prompt":
        params = {**backbone, "lora": init_lora(p.backbone, p.lora_rank,
                                                jax.random.key(p.seed + 1))}
        return (lora_forward(p.backbone), params,
                lambda path: getattr(path[0], "key", None) == "lora", True)
    tcfg = run_temporal(name, p)
    params = tm.with_backbone(tm.init_params(p.backbone, tcfg,
                                             jax.random.key(p.seed + 1)), backbone)
    return adapter_forward(p.backbone, tcfg), params, tm.is_trainable, False


def get_backbone(p: Preset, train_recs: list[dict], log) -> dict:
    """Pretrain from scratch (pretrain.steps > 0) or read `init.checkpoint`'s dense params."""
    if p.pretrain_steps > 0:
        return pretrain_backbone(p.backbone, train_recs, p.shapes, p.pretrain_steps,
                                 p.pretrain_lr, p.pretrain_batch, p.seed, p.pretrain_rename,
                                 p.pretrain_prompt_weight, log)
    if not p.init_checkpoint:
        raise ValueError("pretrain.steps=0 needs --config.init.checkpoint=DIR (a dense "
                         "import or training workdir) as the frozen backbone")
    from jaxdyn.checkpoint import load_model

    _, params, _ = load_model(p.init_checkpoint)
    return params


def run_experiment(p: Preset, out: str, log=print) -> dict:
    """Generate data, get the frozen backbone, train and evaluate every run, write reports."""
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    write(os.path.join(out, "data"), generate(p.synth, p.seed), {"seed": p.seed})
    cache = os.path.join(out, "hf_cache")
    data = {s: load_split(os.path.join(out, "data", f"{s}.jsonl"), cache) for s in SPLITS}
    log(f"data: {json.dumps({k: len(v) for k, v in data.items()})} "
        f"({time.time() - t_start:.0f}s)")
    backbone = get_backbone(p, data["train"], log)
    frac = fraction_at_05b()
    log(f"trainable fraction at Qwen2.5-0.5B: {frac['trainable']:,} / {frac['backbone']:,} = "
        f"{100 * frac['fraction']:.4f} %")
    results = {"preset": p.name, "seed": p.seed, "runs": {}, "trainable_fraction_0.5b": frac}
    enc_train = {}
    for name in p.runs:
        t0 = time.time()
        tc = run_spec(name, p)
        forward, params, trainable, dip = make_run(name, p, backbone)
        if tc is not None:
            if dip not in enc_train:
                enc_train[dip] = encode(data["train"], p.shapes, date_in_prompt=dip)
            params, hist = train_temporal(forward, params, enc_train[dip], tc, trainable, out,
                                          name, log)
        res = evaluate_run(forward, params, data, p, tc is not None and tc.use_time,
                           tc is not None and tc.use_graph, dip)
        n_t, n_f = trainable_fraction(params, trainable)
        if tc is None:  # the base run trains nothing (its temporal leaves are never used)
            n_t = 0
        res.update(seconds=round(time.time() - t0, 1), trainable=n_t, frozen=n_f)
        results["runs"][name] = res
        if name == p.save_checkpoint:
            save_temporal(os.path.join(out, "checkpoint"), p.backbone, run_temporal(name, p),
                          p.shapes, params)
        log(f"[{name}] " + " ".join(f"{s}={res['splits'][s]['all']['rank']:.3f}"
                                    for s in SPLITS if s != "train") + f" ({res['seconds']}s)")
    results["seconds"] = round(time.time() - t_start, 1)
    ev.write_report(results, out)
    log(f"wrote {out}/results.md ({results['seconds']}s)")
    return results


def evaluate_run(forward, params, data, p: Preset, use_time, use_graph, dip) -> dict:
    sh = dataclasses.replace(p.shapes)
    res = {"splits": {}}
    timeline_recs, timeline_scores = [], []
    for s in SPLITS:
        if s == "train":
            continue
        sc = ev.score_records(forward, params, data[s], sh, use_time, use_graph, dip,
                              p.eval_batch)
        res["splits"][s] = ev.summarise(data[s], sc)
        if s in ("test_id", "validation", "test_future"):
            timeline_recs += data[s]
            timeline_scores += sc
    res["by_year"] = ev.by_year(timeline_recs, timeline_scores)
    res["by_year_em"] = ev.by_year(timeline_recs, timeline_scores, "em")
    res.update(ev.drift(res["by_year"]))
    res["graph_sensitivity"] = res["splits"]["test_edited_graph"]["all"]["rank"]
    res.update(ev.regime_js(forward, params, data["test_id"], sh, use_time, use_graph, dip,
                            p.eval_batch))
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="TCG-Synth temporal adapter experiment",
                                 epilog="overrides: --config.adapter.steps=100 (any key)")
    ap.add_argument("--preset", help="tiny | small | qwen2.5-0.5b (configs/temporal.py)")
    ap.add_argument("--config", help="configs/temporal.py[:preset] (instead of --preset)")
    ap.add_argument("--out", required=True)
    args, rest = ap.parse_known_args(argv)
    if (args.preset is None) == (args.config is None):
        ap.error("give exactly one of --preset NAME or --config FILE[:PRESET]")
    bad = [r for r in rest if not r.startswith("--config.")]
    if bad:
        ap.error(f"unrecognised arguments {bad}; overrides look like --config.adapter.lr=1e-3")
    run_experiment(load_preset(args.preset or args.config, rest), args.out)


if __name__ == "__main__":
    main()

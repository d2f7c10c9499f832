"""TCG-Synth study: DYNAMO adapters vs ablations vs date-in-prompt on one frozen backbone.

    python -m jaxdyn.experiments temporal --config configs/temporal.py:mini --out runs/tx
    python -m jaxdyn.experiments temporal --config configs/temporal.py:tiny --out DIR \
        --config.train.steps=50

Every stage goes through the one trainer (`jaxdyn.train`): generate TCG-Synth once (JSONL
in `<out>/data`, read back through HF `datasets` by every run); pretrain the backbone from
scratch on the train questions with answers (`temporal_loss.stage=backbone`, no dates, no
graphs) into `<out>/backbone` — or take `init.checkpoint`; train each run on it
(`<out>/runs/<name>`, a normal workdir: `python -m jaxdyn.generate --checkpoint
<out>/runs/full --time … --graph …` decodes with it); score every run on every split; write
`results.json`, `results.md` and `accuracy_by_year.png` into `<out>`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections as mlc
import numpy as np

from jaxdyn.checkpoint import load_model
from jaxdyn.data.tokenizer import Tokenizer
from jaxdyn.model import ModelConfig, build
from jaxdyn.model.lora import init_lora
from jaxdyn.temporal import adapters as tm
from jaxdyn.temporal import scoring as ev
from jaxdyn.temporal.batching import Shapes, load_split
from jaxdyn.temporal.encoders import TemporalConfig
from jaxdyn.temporal.objective import TemporalLossConfig
from jaxdyn.temporal.synth import SPLITS, SynthConfig, generate, write
from jaxdyn.temporal.tokens import configured_tokenizer
from jaxdyn.train import schema
from jaxdyn.train.loop import train_and_evaluate

RUNS = ("base", "full", "no_time2vec", "no_gnn", "no_reg", "all_pairs", "date_in_prompt",
        "token_conditioned", "mean_readout")
# What each run changes in the config (base trains nothing; see `run_config`).
RUN_OVERRIDES: dict[str, dict[str, dict]] = {
    "full": {},
    "no_time2vec": {"temporal_loss": dict(use_time=False)},
    "no_gnn": {"temporal_loss": dict(use_graph=False)},
    "no_reg": {"temporal_loss": dict(lam=0.0, reg_mode="none")},
    "all_pairs": {"temporal_loss": dict(reg_mode="all_pairs")},
    "date_in_prompt": {"temporal_loss": dict(use_time=False, use_graph=False, reg_mode="none",
                                             date_in_prompt=True)},
    "token_conditioned": {"temporal": dict(token_conditioned=True)},
    "mean_readout": {"temporal": dict(readout="mean")},
}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The `experiment` block of configs/temporal.py."""

    runs: tuple[str, ...] = ("base", "full")
    lora_rank: int = 8  # LoRA rank (on q, v) of the date-in-prompt baseline
    eval_batch: int = 64  # rows per scoring batch
    save_checkpoint: str = "full"  # run whose workdir results.json names as the checkpoint
    pretrain_steps: int = 0  # backbone pretraining steps; 0 = use init.checkpoint
    pretrain_lr: float = 3e-3  # peak AdamW lr of the from-scratch backbone
    pretrain_batch: int = 32  # sequences per pretraining step

    def __post_init__(self):
        bad = [r for r in self.runs if r not in RUNS]
        if bad:
            raise ValueError(f"unknown experiment.runs {bad}; choose from {RUNS}")


def study_config(cfg: mlc.ConfigDict) -> StudyConfig:
    return StudyConfig(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in cfg.experiment.items()})


def _edit(cfg: mlc.ConfigDict, blocks: dict[str, dict]) -> mlc.ConfigDict:
    out = mlc.ConfigDict(cfg.to_dict())
    for block, values in blocks.items():
        out[block].update(values)
    return out


def backbone_config(cfg: mlc.ConfigDict, study: StudyConfig) -> mlc.ConfigDict:
    """The trainer config that pretrains the backbone (stage `backbone`, all trainable)."""
    steps = study.pretrain_steps
    return _edit(cfg, {
        "temporal_loss": dict(stage="backbone"),
        "train": dict(steps=steps, lr=study.pretrain_lr, batch_size=study.pretrain_batch,
                      warmup_steps=max(1, steps // 10), trainable=(), grad_accum=1),
        "init": dict(checkpoint=""), "sample": dict(max_new_tokens=0),
        "log": dict(every=max(1, steps // 6)), "eval": dict(every=steps),
        "checkpoint": dict(every=steps)})


def run_config(cfg: mlc.ConfigDict, name: str, backbone_dir: str,
               study: StudyConfig) -> mlc.ConfigDict:
    """The trainer config of one run on the frozen backbone in `backbone_dir`."""
    out = _edit(cfg, {**RUN_OVERRIDES[name], "init": dict(checkpoint=backbone_dir)})
    if name == "date_in_prompt":  # Dhingra et al. 2022 + LoRA (Hu et al.) W + A·B on q, v
        out.train.lora.update(enabled=True, rank=study.lora_rank, alpha=float(study.lora_rank),
                              targets=("q", "v"))
    return out


def forward_of(mcfg: ModelConfig, tcfg: TemporalConfig | None) -> Callable:
    """`(params, tokens, time, graph) -> ModelOutput` of a run's model (the scorer's input)."""
    model = build(mcfg) if tcfg is None else tm.build(mcfg, tcfg)
    return lambda p, tok, t, g: model.apply({"params": p}, tok, compute_logits=False,
                                            conditioning={"time": t, "graph": g})


def trainable_fraction_at(mcfg: ModelConfig, tcfg: TemporalConfig) -> dict:
    """Exact counts from shapes (`jax.eval_shape`, no allocation)."""
    tree = nn.unbox(tm.abstract_params(mcfg, tcfg))
    size = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
    n_t = size(tree["temporal"])
    n_b = size({k: v for k, v in tree.items() if k != "temporal"})
    return {"trainable": n_t, "backbone": n_b, "fraction": n_t / n_b,
            "by_part": tm.count_temporal_params(mcfg, tcfg)}


def fraction_at_05b() -> dict:
    """Trainable fraction of the `qwen2.5-0.5b` preset, from shapes only."""
    cfg = schema.load("configs/temporal.py:qwen2.5-0.5b")
    return trainable_fraction_at(schema.model_config(cfg), TemporalConfig(**cfg.temporal))


def run_experiment(cfg: mlc.ConfigDict, out: str, log=print) -> dict:
    """Generate the data, get the frozen backbone, train and score every run, write reports."""
    study = study_config(cfg)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    synth = SynthConfig(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in cfg.synth.items()})
    data_dir = os.path.join(out, "data")
    write(data_dir, generate(dataclasses.replace(synth, data_dir=""), synth.seed),
          {"seed": synth.seed})
    cfg = _edit(cfg, {"synth": dict(data_dir=data_dir)})
    data = {s: load_split(os.path.join(data_dir, f"{s}.jsonl"), os.path.join(out, "hf_cache"))
            for s in SPLITS}
    log(f"data: {json.dumps({k: len(v) for k, v in data.items()})} "
        f"({time.time() - t_start:.0f}s)")
    if study.pretrain_steps > 0:
        backbone_dir = os.path.join(out, "backbone")
        train_and_evaluate(backbone_config(cfg, study), backbone_dir)
    elif cfg.init.checkpoint:
        backbone_dir = cfg.init.checkpoint
    else:
        raise ValueError("experiment.pretrain_steps=0 needs --config.init.checkpoint=DIR (a "
                         "dense import or training workdir) as the frozen backbone")
    mcfg, backbone, _ = load_model(backbone_dir)
    tok = configured_tokenizer(cfg.tokenizer.kind, backbone_dir)  # the one every run trains on
    frac = fraction_at_05b()
    log(f"trainable fraction at Qwen2.5-0.5B: {frac['trainable']:,} / {frac['backbone']:,} = "
        f"{100 * frac['fraction']:.4f} %")
    n_backbone = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(backbone))
    results = {"preset": cfg.preset, "seed": synth.seed, "runs": {},
               "trainable_fraction_0.5b": frac, "backbone": backbone_dir}
    sh = Shapes(**cfg.shapes)
    for name in study.runs:
        t0 = time.time()
        if name == "base":
            params, tcfg, lc, n_t = backbone, None, TemporalLossConfig(use_time=False,
                                                                       use_graph=False), 0
        else:
            rcfg = run_config(cfg, name, backbone_dir, study)
            workdir = os.path.join(out, "runs", name)
            train_and_evaluate(rcfg, workdir)
            _, params, _ = load_model(workdir)  # LoRA factors merged in
            lc = TemporalLossConfig(**rcfg.temporal_loss)
            tcfg = TemporalConfig(**rcfg.temporal) if lc.adapted else None
            n_t = lora_size(backbone, rcfg) if rcfg.train.lora.enabled else sum(
                int(np.prod(x.shape)) for x in jax.tree.leaves(params.get("temporal", {})))
            if name == study.save_checkpoint:
                results["checkpoint"] = workdir
        res = evaluate_run(forward_of(mcfg, tcfg), params, data, sh, lc, study.eval_batch, tok)
        res.update(seconds=round(time.time() - t0, 1), trainable=n_t, frozen=n_backbone)
        results["runs"][name] = res
        log(f"[{name}] " + " ".join(f"{s}={res['splits'][s]['all']['rank']:.3f}"
                                    for s in SPLITS if s != "train") + f" ({res['seconds']}s)")
    results["seconds"] = round(time.time() - t_start, 1)
    ev.write_report(results, out)
    log(f"wrote {out}/results.md ({results['seconds']}s)")
    return results


def lora_size(backbone: dict, rcfg: mlc.ConfigDict) -> int:
    """Parameters of the run's LoRA factors (from shapes)."""
    lc = rcfg.train.lora
    tree = jax.eval_shape(lambda p: init_lora(p, lc.targets, lc.rank, jax.random.key(0)),
                          backbone)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def evaluate_run(forward, params, data, sh: Shapes, lc: TemporalLossConfig,
                 eval_batch: int, tok: Tokenizer | None = None) -> dict:
    """Ranking / EM per split, by year, drift, graph sensitivity and regime JS of one run;
    text is encoded by `tok` (None: the syllable tokenizer)."""
    use_time, use_graph = lc.adapted and lc.use_time, lc.adapted and lc.use_graph
    dip = lc.date_in_prompt
    res = {"splits": {}}
    timeline_recs, timeline_scores = [], []
    for s in SPLITS:
        if s == "train":
            continue
        sc = ev.score_records(forward, params, data[s], sh, use_time, use_graph, dip,
                              eval_batch, tok)
        res["splits"][s] = ev.summarise(data[s], sc)
        if s in ("test_id", "validation", "test_future"):
            timeline_recs += data[s]
            timeline_scores += sc
    res["by_year"] = ev.by_year(timeline_recs, timeline_scores)
    res["by_year_em"] = ev.by_year(timeline_recs, timeline_scores, "em")
    res.update(ev.drift(res["by_year"]))
    res["graph_sensitivity"] = res["splits"]["test_edited_graph"]["all"]["rank"]
    res.update(ev.regime_js(forward, params, data["test_id"], sh, use_time, use_graph, dip,
                            eval_batch, tok=tok))
    return res

"""Dense → routed transfer study (the DTF thesis comparison at CPU scale).

    python -m jaxdyn.experiments transfer --config configs/transfer.py:cpu --out runs/transfer

Every stage goes through the one trainer: pretrain one dense model (`<out>/pretrain`), then for
each seed continue every arm of `experiment.arms` from that checkpoint (`<out>/transfer/<arm>-s
<seed>`: a dense → MoD/DTF transfer, docs/features/routing.md) and, as a control, train the
arms of `experiment.scratch_arms` from scratch for the same tokens (`<out>/scratch/…`). A run
whose workdir holds `study_run.json` (written when it finished) is not trained again, so an
interrupted study continues where it stopped when rerun with the same `--out`. Each run
reports top-k and causal-router validation loss (the routed model as it generates: whether
token t is processed is decided from tokens ≤ t only; top-k loss can see later tokens' router
scores).

Writes `results.json` (every run's curves), `results.md` (mean ± std over seeds, FLOPs,
equal-FLOP comparison, one verdict per thesis claim) and `val_loss_vs_flops.png`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import matplotlib
import ml_collections as mlc
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jaxdyn.config.errors import ConfigKeyError, ConfigValueError  # noqa: E402
from jaxdyn.train import flops, schema  # noqa: E402
from jaxdyn.train.loop import NonFiniteLossError, train_and_evaluate  # noqa: E402
from jaxdyn.train.metrics import read_metrics  # noqa: E402

ARCHS = ("dense", "mod", "dtf")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The `experiment` block of configs/transfer.py (field meanings are documented there)."""

    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    pretrain_steps: int
    pretrain_lr: float
    pretrain_warmup: int
    steps: int
    lr: float
    warmup_frac: float
    lr_groups: dict
    no_decay: dict
    scratch_arms: tuple[str, ...]
    scratch_lr: float
    scratch_warmup: int

    @classmethod
    def of(cls, block: mlc.ConfigDict) -> StudyConfig:
        d = block.to_dict()
        known = {f.name for f in dataclasses.fields(cls)}
        bad, missing = sorted(set(d) - known), sorted(known - set(d))
        if bad or missing:
            raise ConfigKeyError(f"experiment block: unknown keys {bad}, missing {missing}"
                                        " (see configs/transfer.py)")
        d["arms"], d["seeds"] = tuple(d["arms"]), tuple(int(s) for s in d["seeds"])
        d["scratch_arms"] = tuple(d["scratch_arms"])
        out = cls(**d)
        for arm in (*out.arms, *out.scratch_arms):
            parse_arm(arm)
        if not out.seeds or out.steps < 1 or out.pretrain_steps < 1:
            raise ConfigValueError("experiment: need >= 1 seed, steps and pretrain_steps")
        return out


def parse_arm(arm: str) -> tuple[str, float]:
    """"dense" -> ("dense", 1.0); "dtf@0.125" -> ("dtf", 0.125)."""
    arch, _, gamma = arm.partition("@")
    if arch not in ARCHS or (arch == "dense") != (not gamma):
        raise ConfigValueError(f"experiment arm {arm!r}: use 'dense', 'mod@<γ>' or "
                                      "'dtf@<γ>' (γ in (0, 1])")
    g = float(gamma) if gamma else 1.0
    if not 0 < g <= 1:
        raise ConfigValueError(f"experiment arm {arm!r}: γ must be in (0, 1]")
    return arch, g


def _derive(base: mlc.ConfigDict, **blocks: dict) -> mlc.ConfigDict:
    """A checked, locked copy of `base` (without the experiment block) with fields replaced."""
    d = base.to_dict()
    d.pop("experiment", None)
    for block, values in blocks.items():
        d[block].update(values)
    cfg = mlc.ConfigDict(d)
    schema.check(cfg)
    cfg.lock()
    return cfg


def pretrain_config(base: mlc.ConfigDict, study: StudyConfig) -> mlc.ConfigDict:
    return _derive(base, model=dict(arch="dense"),
                   train=dict(steps=study.pretrain_steps, lr=study.pretrain_lr,
                              warmup_steps=study.pretrain_warmup, seed=0),
                   checkpoint=dict(every=study.pretrain_steps))


def arm_config(base: mlc.ConfigDict, study: StudyConfig, arm: str, seed: int,
               init: str) -> mlc.ConfigDict:
    """One run: `arm` from the dense checkpoint `init` (thesis recipe) or from scratch ("")."""
    arch, gamma = parse_arm(arm)
    routing = {"capacity": gamma} if arch != "dense" else {}
    if init:
        train = dict(lr=study.lr, warmup_steps=max(1, round(study.warmup_frac * study.steps)),
                     min_lr_ratio=0.0, clip_norm=0.0,
                     lr_groups=tuple(tuple(g) for g in study.lr_groups[arch]))
    else:
        train = dict(lr=study.scratch_lr, warmup_steps=study.scratch_warmup, lr_groups=())
    train.update(steps=study.steps, seed=seed,
                 no_decay=(*base.train.no_decay, *study.no_decay[arch]))
    return _derive(base, model=dict(arch=arch, routing=routing), train=train,
                   init=dict(checkpoint=init), checkpoint=dict(every=study.steps))


def _curves(workdir: str) -> dict[str, list]:
    rows = [r for r in read_metrics(workdir) if r.get("split") == "val"]
    out = {"step": [r["step"] for r in rows], "topk": [r["val/loss"] for r in rows],
           "causal": [r.get("val_causal/loss", r["val/loss"]) for r in rows]}
    first = [r for r in read_metrics(workdir) if r.get("split") == "transfer"]
    if first:
        out["transfer_row"] = {k: v for k, v in first[0].items() if k not in ("split", "time")}
    return out


def run_one(cfg: mlc.ConfigDict, workdir: str) -> dict:
    """Train one run (unless `<workdir>/study_run.json` says it finished) and summarise it."""
    done = os.path.join(workdir, "study_run.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    t0 = time.perf_counter()
    diverged = ""
    try:
        train_and_evaluate(cfg, workdir)
    except NonFiniteLossError as e:  # a result, not a crash: reported beside the others
        diverged = str(e).split(";")[0]
        print(f"[transfer study] {workdir}: diverged ({diverged})", flush=True)
    mcfg = schema.model_config(cfg)
    per_tok = flops.train_flops_per_token(mcfg, cfg.train.seq_len)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    row = {**_curves(workdir), "flops_per_step": per_tok["model"] * tokens_per_step,
           "flop_ratio": per_tok["model"] / per_tok["dense_equivalent"],
           "seconds": time.perf_counter() - t0, "diverged": diverged}
    with open(done + ".tmp", "w") as f:
        json.dump(row, f)
    os.replace(done + ".tmp", done)  # written last: its presence means the run finished
    return row


def run_study(base: mlc.ConfigDict, out: str) -> dict:
    """Pretrain, continue and (optionally) train from scratch; write and return the results."""
    study = StudyConfig.of(base.experiment)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    cache = os.path.join(out, "cache")  # one prepared copy of the corpus for every run
    base = _derive(base, data=dict(cache_dir=cache))
    base = mlc.ConfigDict({**base.to_dict(), "experiment": dataclasses.asdict(study)})
    t0 = time.perf_counter()
    pre_dir = os.path.join(out, "pretrain")
    results: dict = {"pretrain": run_one(pretrain_config(base, study), pre_dir), "runs": []}
    variants = [("transfer", pre_dir, study.arms), ("scratch", "", study.scratch_arms)]
    for seed in study.seeds:  # seeds outermost: a partial study still has whole seeds
        for variant, init, arms in variants:
            for arm in arms:
                wd = os.path.join(out, variant, f"{arm.replace('@', '-')}-s{seed}")
                row = run_one(arm_config(base, study, arm, seed, init), wd)
                results["runs"].append({"variant": variant, "arm": arm, "seed": seed, **row})
                if row["causal"]:
                    print(f"[transfer study] {variant} {arm} seed {seed}: causal "
                          f"{row['causal'][-1]:.4f} top-k {row['topk'][-1]:.4f} "
                          f"({row['seconds']:.0f} s)", flush=True)
    results["seconds"] = time.perf_counter() - t0  # this invocation
    results["run_seconds"] = results["pretrain"]["seconds"] + sum(r["seconds"]
                                                                  for r in results["runs"])
    results["study"] = dataclasses.asdict(study)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    summary = summarize(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(render(summary, results) + "\n")
    plot(results, os.path.join(out, "val_loss_vs_flops.png"))
    return results


# ----------------------------------------------------------------------------- analysis


def loss_at_flops(run: dict, budget: float, key: str) -> float:
    """Validation loss of `run` interpolated (linearly in FLOPs) at `budget` training FLOPs."""
    x = np.asarray(run["step"], float) * run["flops_per_step"]
    return float(np.interp(budget, x, np.asarray(run[key], float)))


def summarize(results: dict) -> dict:
    """Per (variant, arm): final causal/top-k loss mean ± std over seeds, FLOPs, the dense
    loss at the arm's FLOPs; and the verdicts."""
    table: dict = {}
    diverged = [r for r in results["runs"] if r.get("diverged") or not r["causal"]]
    for r in results["runs"]:
        if r not in diverged:
            table.setdefault((r["variant"], r["arm"]), []).append(r)
    rows = []
    for (variant, arm), runs in table.items():
        dense = {d["seed"]: d for d in table.get((variant, "dense"), [])}
        c = np.array([r["causal"][-1] for r in runs])
        k = np.array([r["topk"][-1] for r in runs])
        budget = [r["step"][-1] * r["flops_per_step"] for r in runs]
        eq = [loss_at_flops(dense[r["seed"]], b, "causal")
              for r, b in zip(runs, budget, strict=True) if r["seed"] in dense]
        rows.append({"variant": variant, "arm": arm, "seeds": len(runs),
                     "causal_mean": float(c.mean()), "causal_std": float(c.std(ddof=1))
                     if len(c) > 1 else 0.0, "topk_mean": float(k.mean()),
                     "topk_std": float(k.std(ddof=1)) if len(k) > 1 else 0.0,
                     "train_gflops": float(np.mean(budget)) / 1e9,
                     "flop_ratio": runs[0]["flop_ratio"],
                     "dense_at_equal_flops": float(np.mean(eq)) if eq else float("nan"),
                     "causal_per_seed": {r["seed"]: r["causal"][-1] for r in runs}})
    by = {(r["variant"], r["arm"]): r for r in rows}
    verdicts = []
    for variant in ("transfer", "scratch"):
        for gamma in sorted({parse_arm(a)[1] for v, a in by if v == variant} - {1.0},
                            reverse=True):
            mod, dtf = by.get((variant, f"mod@{gamma}")), by.get((variant, f"dtf@{gamma}"))
            if mod and dtf:
                verdicts.append(_verdict_dtf_mod(variant, gamma, mod, dtf))
            for arm in (mod, dtf):
                if arm and (variant, "dense") in by:
                    verdicts.append(_verdict_vs_dense(variant, arm, by[(variant, "dense")]))
    verdicts += [f"{r['variant']}, {r['arm']}, seed {r['seed']}: **diverged** "
                 f"({r.get('diverged') or 'no validation point'}); left out of the means above."
                 for r in diverged]
    return {"rows": rows, "verdicts": verdicts}


def _margin(a: float, b: float, sa: float, sb: float) -> str:
    return f"{a - b:+.4f} (std {sa:.4f} / {sb:.4f})"


def _verdict_dtf_mod(variant: str, gamma: float, mod: dict, dtf: dict) -> str:
    d = dtf["causal_mean"] - mod["causal_mean"]
    noise = max(dtf["causal_std"], mod["causal_std"])
    wins = sum(dtf["causal_per_seed"][s] < mod["causal_per_seed"][s]
               for s in dtf["causal_per_seed"] if s in mod["causal_per_seed"])
    n = len(dtf["causal_per_seed"])
    if n < 2:
        state = "direction only (one seed, no noise estimate)" if d < 0 else "not reproduced"
    elif d < 0 and abs(d) > noise:
        state = "reproduced"
    elif d < 0:
        state = "same direction, within seed noise"
    else:
        state = "not reproduced"
    margin = _margin(dtf["causal_mean"], mod["causal_mean"], dtf["causal_std"],
                     mod["causal_std"])
    return (f"{variant}, γ = {gamma}: DTF < MoD (thesis: 2.380 vs 2.443 after transfer) — "
            f"**{state}**: causal loss DTF − MoD = {margin}"
            f", DTF lower on {wins} of {n} seeds; top-k DTF − MoD = "
            f"{dtf['topk_mean'] - mod['topk_mean']:+.4f}.")


def _verdict_vs_dense(variant: str, arm: dict, dense: dict) -> str:
    eq = arm["dense_at_equal_flops"]
    d = arm["causal_mean"] - eq
    beats = "yes" if d < -arm["causal_std"] else "no" if d > arm["causal_std"] else \
        "within seed noise"
    if arm["seeds"] < 2:
        beats += " (one seed)"
    return (f"{variant}, {arm['arm']}: routed beats dense at equal FLOPs — **{beats}**: causal "
            f"loss {arm['causal_mean']:.4f} at {arm['train_gflops']:.0f} GFLOPs vs dense "
            f"{eq:.4f} at the same FLOPs (Δ {d:+.4f}); at equal tokens dense ends at "
            f"{dense['causal_mean']:.4f}.")


def render(summary: dict, results: dict) -> str:
    s = results["study"]
    lines = [f"{len(s['seeds'])} seed(s) {list(s['seeds'])}; pretrain {s['pretrain_steps']} "
             f"steps, then {s['steps']} steps per run; training time of all runs "
             f"{results['run_seconds'] / 60:.1f} min.", "",
             "| variant | arm | seeds | causal val loss | top-k val loss | train GFLOPs | "
             "FLOP ratio | dense at equal FLOPs |", "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['variant']} | {r['arm']} | {r['seeds']} | "
                     f"{r['causal_mean']:.4f} ± {r['causal_std']:.4f} | "
                     f"{r['topk_mean']:.4f} ± {r['topk_std']:.4f} | {r['train_gflops']:.0f} | "
                     f"{r['flop_ratio']:.3f} | {r['dense_at_equal_flops']:.4f} |")
    lines += ["", "Verdicts (causal-router loss, mean ± sample std over seeds):", ""]
    lines += [f"- {v}" for v in summary["verdicts"]]
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    variants = sorted({r["variant"] for r in results["runs"]}, reverse=True)
    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4), squeeze=False)
    for ax, variant in zip(axes[0], variants, strict=True):
        arms = dict.fromkeys(r["arm"] for r in results["runs"] if r["variant"] == variant)
        for i, arm in enumerate(arms):
            runs = [r for r in results["runs"] if r["variant"] == variant and r["arm"] == arm
                    and r["causal"] and not r.get("diverged")]
            if not runs:
                continue
            x = np.asarray(runs[0]["step"], float) * runs[0]["flops_per_step"] / 1e9
            for key, style in (("causal", "-"), ("topk", ":")):
                y = np.mean([r[key] for r in runs], axis=0)
                ax.plot(x, y, style, color=f"C{i}", marker="." if key == "causal" else None,
                        label=f"{arm} ({key})" if arm != "dense" or key == "causal" else None)
        ax.set_title(f"{variant} (mean of {len(results['study']['seeds'])} seed(s))")
        ax.set_xlabel("training GFLOPs (this stage)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

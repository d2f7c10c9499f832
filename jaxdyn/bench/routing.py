"""Suite `routing`: MoD and DTF at capacity 0.125 and 0.5 against the dense model of the same
shapes, in one run: forward time and train-step time, each as a ratio to dense, beside the
FLOP ratio (`jaxdyn.model.routed_flops_per_token`, routers and PriorFFN included).

Target (CPU): measured time ratio ≤ 1.2 × the FLOP ratio, i.e. routing overhead (top-k,
gather/scatter, routers) costs at most 20 % beyond what the FLOPs predict.
"""

from __future__ import annotations

import jax

from jaxdyn.bench import common
from jaxdyn.bench.train import jaxdyn_step
from jaxdyn.model import build
from jaxdyn.model.routing.flops import routed_flops_per_token
from jaxdyn.train import schema

ROUTING_TARGET = 1.2
VARIANTS = (("dense", None), ("mod", 0.125), ("mod", 0.5), ("dtf", 0.125), ("dtf", 0.5))
CONFIG_FILE = {"dense": "standard", "mod": "mod", "dtf": "dtf"}


def forward_time(cfg, params, repeats: int) -> float:
    """Best seconds of the jitted training-mode forward (top-k routing), hidden states only."""
    model = build(schema.model_config(cfg))
    batch = common.random_batch(cfg)
    tok, pos = batch["tokens"][0], batch["positions"][0]
    fwd = jax.jit(lambda prm: model.apply({"params": prm}, tok, pos, compute_logits=False).hidden)
    return common.time_fn(lambda: fwd(params), repeats)["best_s"]


def run(preset_name: str, ctx: dict) -> list[dict]:
    p = common.get_preset(preset_name)
    tokens = p.batch * p.seq_len
    peak = ctx["peaks"].get("peak_flops_measured")
    rows, dense = [], None
    for arch, cap in ctx.get("routing_variants") or VARIANTS:
        cfg = common.train_config(p, CONFIG_FILE[arch], capacity=cap)
        mcfg = schema.model_config(cfg)
        f = routed_flops_per_token(mcfg, p.seq_len)
        tr = jaxdyn_step(cfg, ctx, p.repeats)
        fwd_s = forward_time(cfg, tr.pop("state").params["params"], p.repeats)
        name = arch if cap is None else f"{arch} c{cap}"
        row = {"suite": "routing", "name": name, "impl": "jaxdyn",
               "tokens_per_s": tokens / tr["best_s"], "step_ms": 1e3 * tr["best_s"],
               "forward_ms": 1e3 * fwd_s,
               "mfu": common.mfu(tr["flops_per_token"], tokens / tr["best_s"], peak),
               "flops_per_token": f["model"], "dense_flops_per_token": f["dense_equivalent"],
               "compile_s": tr["warmup_s"]}
        if dense is None:
            dense = row
            row["notes"] = f"reference; L={mcfg.num_layers}, T={p.seq_len}"
        else:
            flop_ratio = f["model"] / dense["flops_per_token"]
            train_ratio = row["step_ms"] / dense["step_ms"]
            fwd_ratio = row["forward_ms"] / dense["forward_ms"]
            k = max(1, int(cap * p.seq_len))
            row.update(ratio=train_ratio, ref="dense", flop_ratio=flop_ratio,
                       train_time_ratio=train_ratio, forward_time_ratio=fwd_ratio,
                       train_over_flop=train_ratio / flop_ratio,
                       forward_over_flop=fwd_ratio / flop_ratio,
                       target=f"time ratio <= {ROUTING_TARGET}x FLOP ratio (CPU)",
                       notes=f"k={k}; time ratios train {train_ratio:.2f} / forward "
                             f"{fwd_ratio:.2f}")
            if jax.default_backend() == "cpu":
                row["meets_target"] = bool(max(train_ratio, fwd_ratio)
                                           <= ROUTING_TARGET * flop_ratio)
        rows.append(row)
    return rows

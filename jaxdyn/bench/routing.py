"""Suite `routing`: MoD and DTF at capacity 0.125 and 0.5 against the dense model of the same
shapes, in one run: forward time and train-step time, each as a ratio to dense, beside the
FLOP ratio (`jaxdyn.model.routed_flops_per_token`, routers and PriorFFN included).

Target (CPU): measured time ratio ≤ 1.2 × the FLOP ratio, i.e. routing overhead (top-k,
gather/scatter, routers) costs at most 20 % beyond what the FLOPs predict. All variants' steps
(then forwards) run in interleaved rounds; times are medians (`jaxdyn.bench.protocol`).
"""

from __future__ import annotations

import jax

from jaxdyn.bench import common, protocol
from jaxdyn.bench.train import jaxdyn_step
from jaxdyn.model import build
from jaxdyn.model.routing.flops import routed_flops_per_token
from jaxdyn.train import flops, schema

ROUTING_TARGET = 1.2
VARIANTS = (("dense", None), ("mod", 0.125), ("mod", 0.5), ("dtf", 0.125), ("dtf", 0.5))
CONFIG_FILE = {"dense": "standard", "mod": "mod", "dtf": "dtf"}


def forward_fn(cfg, params):
    """The jitted training-mode forward (top-k routing), hidden states only, as a callable."""
    model = build(schema.model_config(cfg))
    batch = common.random_batch(cfg)
    tok, pos = batch["tokens"][0], batch["positions"][0]
    fwd = jax.jit(lambda prm: model.apply({"params": prm}, tok, pos, compute_logits=False).hidden)
    return lambda: fwd(params)


def run(preset_name: str, ctx: dict) -> list[dict]:
    p = common.get_preset(preset_name)
    tokens = p.batch * p.seq_len
    steps, fwds, info = {}, {}, {}
    for arch, cap in ctx.get("routing_variants") or VARIANTS:
        cfg = common.train_config(p, CONFIG_FILE[arch], capacity=cap)
        name = arch if cap is None else f"{arch} c{cap}"
        steps[name] = jaxdyn_step(cfg)
        state = common.block(steps[name]())  # compiles; its parameters feed the forward
        # a copy: the next step donates (deletes) this state's buffers
        fwds[name] = forward_fn(cfg, jax.tree.map(lambda x: x.copy(), state.params["params"]))
        info[name] = (cap, schema.model_config(cfg))
    # Every variant's step (then forward) in interleaved rounds: drift hits all alike.
    train_t = protocol.interleave(steps, p.repeats)
    fwd_t = protocol.interleave(fwds, p.repeats)
    rows, dense = [], None
    for name, (cap, mcfg) in info.items():
        f = routed_flops_per_token(mcfg, p.seq_len)
        f_train = flops.train_flops_per_token(mcfg, p.seq_len)["model"]
        row = common.timed_row("routing", name, "jaxdyn", train_t[name], tokens, f_train,
                               ctx["peaks"], forward_ms=1e3 * fwd_t[name]["median_s"],
                               dense_flops_per_token=f["dense_equivalent"])
        row["flops_per_token"] = f["model"]
        row["spread"] = max(train_t[name]["spread"], fwd_t[name]["spread"])
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

"""Suite `inference`: routed generation against dense in one run (the savings of causal mode).

For MoD and DTF at γ = 0.125 and 0.5 (the routing suite's variants), with the model's causal
routers *calibrated* so each routed layer selects at most k = γ·T tokens in every row of the
prefill batch (random routers select about half of the tokens whatever γ is; see
`calibrate`), all in interleaved rounds (`jaxdyn.bench.protocol`):

- prefill: the causal full forward of a [B, T] batch, routed (selected tokens only: a
  capacity bucket, docs/features/routing.md §7) and the old compute-and-mask path, as time
  ratios to dense beside the FLOP ratio. Target (CPU): ratio ≤ 1.2 × FLOP ratio.
- decode: batch-B KV-cached greedy decoding (`jaxdyn.decode.generate`), tokens/s against
  dense. Target: ≥ 0.8 / FLOP ratio × dense.
- cache: bytes of the model's KV cache with compact routed caches of f = γ against dense;
  expected = dense × (dense layers + γ · routed layers) / layers (plus the small slot and
  pointer arrays). Target: within 10 %.

Unrolled layers (`scan_layers=False`) on both sides, so each routed layer has its own router
to calibrate and its own sown decisions.

Then the multi-token decoding rows (`jaxdyn.bench.multitoken.decoding_suite`: the multitoken
bench's MTP model, trained by the trainer, batch-1 decoding of the same prompts against
single-token decoding): chain and tree verify (target: tree ≥ 2 tokens per forward with the
plain greedy output) and DynaMo's dynamic mode with its selection on the host and on device
(target: device ≥ 1.5× single-token tokens/s at an ε_b where it emits ≥ 2 tokens per forward,
same tokens as the host). `ctx["inference_multitoken"] = False` leaves them out.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxdyn.bench import common, multitoken, protocol
from jaxdyn.decode.generate import generate
from jaxdyn.decode.sampling import SamplingConfig
from jaxdyn.model import build, init_cache, init_params
from jaxdyn.model.routing.flops import routed_flops_per_token
from jaxdyn.model.routing.options import routed_k, routing_opts
from jaxdyn.train import schema

TARGET = 1.2  # prefill time ratio <= 1.2 x FLOP ratio
DECODE_SLACK = 0.8  # decode tokens/s >= 0.8 / FLOP ratio x dense
CACHE_TOL = 0.10
VARIANTS = (("dense", None), ("mod", 0.125), ("mod", 0.5), ("dtf", 0.125), ("dtf", 0.5))
CONFIG_FILE = {"dense": "standard", "mod": "mod", "dtf": "dtf"}


def _unit(path) -> int | None:
    for k in path:
        m = re.fullmatch(r"layers_(\d+)", str(getattr(k, "key", "")))
        if m:
            return int(m.group(1))
    return None


def _shape_router(params, unit: int, lam: float):
    """Unit `unit`'s causal predictor rewritten as c = R(x) − λ·N(x): the first half of its
    hidden units keep their random weights (R), the second half become pairs (h, −h) whose
    silu(h) + silu(−h) = h·tanh(h/2) ≥ 0 enter with weight −λ·|w| (N ≥ 0). The selected
    fraction (c ≥ 0) then falls monotonically as λ grows."""
    def fix(path, w):
        names = [str(getattr(k, "key", "")) for k in path]
        if _unit(path) != unit or "predictor" not in names:
            return w
        H = w.shape[1] if names[-1] == "fc1" else w.shape[0]
        r, m = H - 2 * (H // 4), H // 4
        if names[-1] == "fc1":
            b = 10.0 * w[:, r:r + m]
            return jnp.concatenate([w[:, :r], b, -b], axis=1)
        b = -lam * jnp.abs(w[r:r + m])
        return jnp.concatenate([w[:r], b, b], axis=0)
    return jax.tree_util.tree_map_with_path(fix, params)


def calibrate(mcfg, params, tokens_BT, k: int, iters: int = 14):
    """Routers shaped (unit by unit, in order) so each routed layer selects as many tokens as
    possible while no row exceeds k: a bisection on λ of `_shape_router` per unit. Returns
    (params, selected count per unit and row [U, B])."""
    fwd = jax.jit(lambda p: build(mcfg, "causal").apply({"params": p}, tokens_BT,
                                                        mutable=["intermediates"])[1])
    units = sorted({u for u in (_unit(p) for p, _ in
                                jax.tree_util.tree_flatten_with_path(params)[0]) if u is not None})

    def counts(p, u):
        inter = fwd(p)["intermediates"].get(f"layers_{u}", {})
        return None if "decision" not in inter else np.asarray(inter["decision"][0]).sum(-1)

    for u in units:
        if counts(params, u) is None:
            continue  # a dense unit
        lo, hi = -1.0, 1.0  # λ: lo selects too many (or all), hi selects <= k
        while counts(_shape_router(params, u, hi), u).max() > k:
            hi *= 4
        while lo > -1e4 and counts(_shape_router(params, u, lo), u).max() <= k:
            lo *= 4
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if counts(_shape_router(params, u, mid), u).max() <= k:
                hi = mid
            else:
                lo = mid
        params = _shape_router(params, u, hi)
    got = [c for u in units if (c := counts(params, u)) is not None]
    return params, np.stack(got) if got else np.zeros((0, tokens_BT.shape[0]))


def _bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def run(preset_name: str, ctx: dict) -> list[dict]:
    p = common.get_preset(preset_name)
    B, T, N = p.batch, p.seq_len, p.new_tokens
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, p.model["vocab_size"])
    prompts = np.asarray(tokens)[:, :p.prompt_len].tolist()
    greedy = SamplingConfig(temperature=0.0)
    prefill, decode, info, params_of = {}, {}, {}, {}
    for arch, cap in ctx.get("routing_variants") or VARIANTS:
        mcfg = schema.model_config(common.train_config(p, CONFIG_FILE[arch], capacity=cap))
        mcfg = mcfg.replace(scan_layers=False)
        name = arch if cap is None else f"{arch} c{cap}"
        params = init_params(mcfg, jax.random.key(0))
        sel = None
        if cap is not None:
            k = routed_k(routing_opts(mcfg), T)
            params, sel = calibrate(mcfg, params, tokens, k)
            mcfg = mcfg.replace(routing={**mcfg.routing_options, "cache_fraction": cap})
        params_of[name] = params
        variants = {"selected": mcfg} if cap is None else {
            "selected": mcfg,
            "masked": mcfg.replace(routing={**mcfg.routing_options, "causal_compute": "masked"})}
        for how, c in variants.items():
            f = jax.jit(lambda prm, tok, c=c: build(c, "causal").apply({"params": prm}, tok).logits)
            prefill[f"{name} {how}" if cap else name] = (lambda f=f, prm=params: f(prm, tokens))

        def dec(mcfg=mcfg, params=params, name=name) -> float:
            res = generate(mcfg, params, prompts, N, greedy)
            info[name]["overflow"] = int(sum(res.cache_overflow))
            return float(res.decode_seconds)

        decode[name] = dec
        info[name] = {"cap": cap, "cfg": mcfg, "sel": sel}
    pre_t = protocol.interleave(prefill, p.repeats)
    dec_t = protocol.interleave(decode, p.repeats)
    dense = info["dense"]["cfg"]
    S = p.prompt_len + N
    dense_cache = _bytes(jax.eval_shape(lambda: init_cache(dense, B, S)))
    rows = []
    for name, d in info.items():
        mcfg, cap = d["cfg"], d["cap"]
        fl = routed_flops_per_token(mcfg, T)
        flop_ratio = fl["model"] / fl["dense_equivalent"] if cap else 1.0
        n_dec = B * (N - 1)
        for how in (("selected", "masked") if cap else ("",)):
            key = f"{name} {how}" if cap else name
            t = pre_t[key]
            row = common.timed_row("inference", f"prefill {key} B{B}xT{T}", "jaxdyn", t,
                                   B * T, fl["model"], ctx["peaks"], flop_ratio=flop_ratio)
            if cap:
                ratio = t["median_s"] / pre_t["dense"]["median_s"]
                row.update(ratio=ratio, ref="dense", time_over_flop=ratio / flop_ratio,
                           notes=f"selected per routed layer and row: max "
                                 f"{int(d['sel'].max())}, mean {d['sel'].mean():.1f} of {T}")
                if how == "selected":
                    row["target"] = f"time ratio <= {TARGET}x FLOP ratio (CPU)"
                    if jax.default_backend() == "cpu":
                        row["meets_target"] = bool(ratio <= TARGET * flop_ratio)
            rows.append(row)
        t = dec_t[name]
        row = {"suite": "inference", "name": f"decode {name} B{B} P{p.prompt_len}+{N}",
               "impl": "jaxdyn", "tokens_per_s": n_dec / t["median_s"],
               "step_ms": 1e3 * t["median_s"] / (N - 1), "spread": t["spread"],
               "rounds": t["rounds"], "flop_ratio": flop_ratio,
               "notes": f"compact-cache overflow {d.get('overflow', 0)} tokens"}
        if cap:
            speed = dec_t["dense"]["median_s"] / t["median_s"]
            row.update(ratio=speed, ref="dense",
                       target=f"tokens/s >= {DECODE_SLACK} / FLOP ratio x dense (CPU)")
            if jax.default_backend() == "cpu":
                row["meets_target"] = bool(speed >= DECODE_SLACK / flop_ratio)
        rows.append(row)
        if cap:
            got = _bytes(jax.eval_shape(lambda c=mcfg: init_cache(c, B, S)))
            n_routed = len(d["sel"])
            L = mcfg.num_layers
            want = dense_cache * (L - n_routed + cap * n_routed) / L
            rows.append({"suite": "inference", "name": f"cache {name} B{B} S{S}",
                         "impl": "jaxdyn", "cache_bytes": got, "dense_cache_bytes": dense_cache,
                         "expected_bytes": want, "ratio": got / want, "ref": "expected",
                         "target": f"within {CACHE_TOL:.0%} of dense x (dense + γ·routed "
                                   "layers) / layers",
                         "meets_target": bool(abs(got / want - 1) <= CACHE_TOL),
                         "notes": f"cache_fraction {cap}; {n_routed} routed of {L} layers"})
    if ctx.get("inference_multitoken", True):
        rows += multitoken.decoding_suite(preset_name, ctx)
    return rows

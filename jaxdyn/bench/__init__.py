"""`python -m jaxdyn.bench`: the one place where jaxdyn's speed is measured and compared.

Suites (each a function `(preset, ctx) -> rows`, registered in `SUITES`):

| suite | what | reference measured in the same run |
|---|---|---|
| forward | [B, T] forward tokens/s | transformers PyTorch forward |
| decode | batch-1 KV-cached greedy decode tokens/s | transformers `generate` |
| train | trainer step tokens/s and MFU | transformers + torch AdamW step |
| routing | MoD/DTF (capacity 0.125, 0.5) step and forward time | dense jaxdyn, beside FLOP ratio |
| inference | routed prefill, batch-B decode, compact cache bytes | dense jaxdyn, FLOP ratio |
| multitoken | verify / DynaMo decoding | single-token decoding |
| scaling | FSDP throughput and state bytes per device, N fake devices | N = 1 |
| conversion | `conversion.from_hf` peak RSS | checkpoint bytes |
| data | grain pipeline tokens/s; peak RSS at 1× vs 10× corpus | `small` trainer's use |
| attention | packed train step: peak memory and time, T = 1k…8k | `attention_impl="xla"` |
| kernels | this backend's attention kernels: errors, leakage | `attention_impl="xla"` |
| profile | a train step per op (embedding … optimizer), fwd, fwd+bwd | transformers modules |

`profile` is a diagnostic, not a target: it is not part of "all" (`DIAGNOSTICS`).

`run_suites(names, preset)` returns `(rows, meta)`; `jaxdyn.bench.common.write_results`
writes JSON and the Markdown table. Presets (model shape and workload) come from
configs/bench.py; the command line is jaxdyn/cli/bench.py.
"""

from __future__ import annotations

import importlib
import time
import traceback
from collections.abc import Callable

from jaxdyn.bench import common, protocol

SuiteFn = Callable[[str, dict], list[dict]]
SUITES: dict[str, SuiteFn] = {}


def register(name: str):
    def deco(fn: SuiteFn) -> SuiteFn:
        SUITES[name] = fn
        return fn
    return deco


def _lazy(module: str, fn: str) -> SuiteFn:
    """A suite whose module is imported when the suite runs, so the CLI's subprocess workers
    (scaling, conversion) do not load every other suite before they measure memory."""
    def suite(preset, ctx):
        return getattr(importlib.import_module(f"jaxdyn.bench.{module}"), fn)(preset, ctx)
    return suite


for _name, _module, _fn in (("forward", "forward", "run_forward"),
                            ("decode", "forward", "run_decode"),
                            ("train", "train", "run"), ("routing", "routing", "run"),
                            ("inference", "inference", "run"),
                            ("multitoken", "multitoken", "suite"),
                            ("scaling", "scaling", "run"),
                            ("data", "data", "run"),
                            ("attention", "attention", "run"),
                            ("kernels", "kernels", "run"),
                            ("conversion", "conversion", "run")):
    register(_name)(_lazy(_module, _fn))


ORDER = ("forward", "decode", "train", "routing", "inference", "multitoken", "scaling",
         "conversion", "data", "attention", "kernels")
# Suites run only when named (not by "all"): diagnostics that take a target suite apart.
DIAGNOSTICS: dict[str, SuiteFn] = {"profile": _lazy("profile", "run")}


def run_suites(names: list[str], preset: str, profile: str | None = None,
               **options) -> tuple[list[dict], dict]:
    """Run `names` ("all" = every suite) on `preset`; (rows, meta). A failing suite yields
    one row naming the error, so the others still report. `options` reach the suites:
    `device_counts` (scaling), `routing_variants` ((arch, capacity) pairs), `multitoken_dir`,
    `xla_sweep` (profile: True for its candidate XLA_FLAGS sets, or a list of sets).
    A `train` suite run before `data` gives it the trainer's tokens/s of this run.
    Every suite runs under the measurement protocol (`jaxdyn.bench.protocol`): load and foreign
    CPU recorded, noisy rows not judged; `settle_s` (default 0 here, 45 s from the command
    line) waits for the previous suite's load to decay first."""
    if "all" in names:
        names = list(ORDER)
    suites = {**SUITES, **DIAGNOSTICS}
    unknown = [n for n in names if n not in suites]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; choose from "
                         f"{[*ORDER, *DIAGNOSTICS]} or all")
    p = common.get_preset(preset)
    meta = {"preset": preset, "preset_shapes": p.model, "batch": p.batch, "seq_len": p.seq_len,
            "env": common.environment(), "peaks": common.peaks(common.compute_dtype(p)),
            "suites": names}
    ctx = {"peaks": meta["peaks"], "profile": profile, **options}
    rows, times = [], {}
    for name in names:
        t0 = time.perf_counter()
        try:
            with protocol.Watch(ctx.get("settle_s", 0.0)) as watch:
                new = suites[name](preset, ctx)
            rows += protocol.judge(new, watch.facts())
            # The data suite compares against the trainer's consumption measured in this run.
            trainer = [r["tokens_per_s"] for r in new if r.get("suite") == "train"
                       and r.get("impl") == "jaxdyn" and r.get("tokens_per_s")]
            if trainer and "train_tokens_per_s" not in ctx:
                ctx["train_tokens_per_s"] = trainer[0]
        except Exception as e:  # report and continue with the other suites
            rows.append({"suite": name, "name": "error", "impl": "jaxdyn",
                         "notes": f"{type(e).__name__}: {e}"[:300],
                         "traceback": traceback.format_exc()[-2000:]})
        times[name] = time.perf_counter() - t0
    meta["suite_seconds"] = times
    return rows, meta

"""`python -m jaxdyn.bench`: the one place where jaxdyn's speed is measured and compared.

Suites (each a function `(preset, ctx) -> rows`, registered in `SUITES`):

| suite | what | reference measured in the same run |
|---|---|---|
| forward | [B, T] forward tokens/s | transformers PyTorch forward |
| decode | batch-1 KV-cached greedy decode tokens/s | transformers `generate` |
| train | trainer step tokens/s and MFU | transformers + torch AdamW step |
| routing | MoD/DTF (capacity 0.125, 0.5) step and forward time | dense jaxdyn, beside FLOP ratio |
| multitoken | verify / DynaMo decoding | single-token decoding |
| scaling | FSDP throughput and state bytes per device, N fake devices | N = 1 |
| conversion | `conversion.from_hf` peak RSS | checkpoint bytes |

`run_suites(names, preset)` returns `(rows, meta)`; `jaxdyn.bench.common.write_results`
writes JSON and the Markdown table.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable

SuiteFn = Callable[[str, dict], list[dict]]
SUITES: dict[str, SuiteFn] = {}


def register(name: str):
    def deco(fn: SuiteFn) -> SuiteFn:
        SUITES[name] = fn
        return fn
    return deco


def _lazy(module: str, fn: str) -> SuiteFn:
    """A suite whose module is imported only when it runs (torch, subprocesses, ...)."""
    def suite(preset, ctx):
        return getattr(importlib.import_module(f"jaxdyn.bench.{module}"), fn)(preset, ctx)
    return suite


for _name, _module, _fn in (("forward", "forward", "run_forward"),
                            ("decode", "forward", "run_decode"),
                            ("train", "train", "run"), ("routing", "routing", "run")):
    register(_name)(_lazy(_module, _fn))


@register("multitoken")
def _multitoken(preset, ctx):
    """jaxdyn/bench/multitoken.py (its own presets: bench `tiny` -> `smoke`, else `tiny`)."""
    from jaxdyn.bench import multitoken

    own = "smoke" if preset == "tiny" else "tiny"
    rows = []
    for r in multitoken.run(own, ctx.get("multitoken_dir")):
        name = r.get("mode", "?")
        if "eps_b" in r:
            name += f" eps={r['eps_b']} top_k={r.get('top_k')}"
        rows.append({"suite": "multitoken", "name": name, "impl": "jaxdyn",
                     "tokens_per_s": r.get("tokens_per_sec"), "ratio": r.get("speedup"),
                     "ref": "single-token" if "speedup" in r else None,
                     "notes": f"multitoken preset {own}; tokens/forward "
                              f"{r.get('tokens_per_forward')}",
                     **{k: v for k, v in r.items() if k not in ("tokens_per_sec", "speedup")}})
    return rows


@register("scaling")
def _scaling(preset, ctx):
    from jaxdyn.bench.scaling import DEVICE_COUNTS, run
    return run(preset, ctx, ctx.get("device_counts") or DEVICE_COUNTS)


@register("conversion")
def _conversion(preset, ctx):
    from jaxdyn.bench.conversion import run
    return run(preset, ctx)


ORDER = ("forward", "decode", "train", "routing", "multitoken", "scaling", "conversion")


def run_suites(names: list[str], preset: str, profile: str | None = None,
               **options) -> tuple[list[dict], dict]:
    """Run `names` ("all" = every suite) on `preset`; (rows, meta). A failing suite yields
    one row naming the error, so the others still report. `options` reach the suites:
    `device_counts` (scaling), `routing_variants` ((arch, capacity) pairs), `multitoken_dir`."""
    import traceback

    from jaxdyn.bench import common

    if "all" in names:
        names = list(ORDER)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; choose from {list(ORDER)} or all")
    p = common.get_preset(preset)
    meta = {"preset": preset, "preset_shapes": p.model, "batch": p.batch, "seq_len": p.seq_len,
            "env": common.environment(), "peaks": common.peaks(common.compute_dtype(p)),
            "suites": names}
    ctx = {"peaks": meta["peaks"], "profile": profile, **options}
    rows, times = [], {}
    for name in names:
        t0 = time.perf_counter()
        try:
            rows += SUITES[name](preset, ctx)
        except Exception as e:  # report and continue with the other suites
            rows.append({"suite": name, "name": "error", "impl": "jaxdyn",
                         "notes": f"{type(e).__name__}: {e}"[:300],
                         "traceback": traceback.format_exc()[-2000:]})
        times[name] = time.perf_counter() - t0
    meta["suite_seconds"] = times
    return rows, meta

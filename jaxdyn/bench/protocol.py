"""The measurement protocol: a busy machine must not be able to fool the bench.

Three facts are recorded for every suite and judged before a target is called met:

- **Load.** The 1-minute load average before the suite (after waiting up to `SETTLE_S` for the
  previous suite's own load to decay) and after it. The after-figure includes the bench's own
  compute threads (about the core count on a CPU), so it is reported, not judged.
- **Foreign CPU.** The CPU time the whole machine spent busy during the suite (`/proc/stat`)
  minus what this process and its children spent (`getrusage`), as a share of the suite's
  wall time × cores: other jobs stealing cores show up here even when the load average lags.
- **Spread.** Each side of a comparison is timed in interleaved rounds (A B, then B A, …), so
  drift and bursts of other work hit both sides alike; a row reports its median and its spread,
  the interquartile range over the median (robust to one slow round; the full range is kept as
  `range`, every round's time as `round_ms`).

A timed row (one that carries a `spread`: its figure is a time) is *noisy* when the load
before exceeded `MAX_LOAD`, the foreign CPU share exceeded `MAX_FOREIGN`, or its spread
exceeded `MAX_SPREAD`; a noisy row, or one compared against a noisy reference, gets
`meets_target = None`: its target is neither met nor missed. Rows whose target is not a time
(parity of kernels, compiled memory, RSS) keep their verdict: load cannot change them.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

from jaxdyn.bench.common import block

MAX_LOAD = 1.5  # 1-min load average before a suite
MAX_FOREIGN = 0.15  # share of all cores used by other processes during a suite
MAX_SPREAD = 0.10  # interquartile range / median of a row's rounds
SETTLE_S = 45.0  # longest wait for the load average to fall under MAX_LOAD before a suite
# Pause before each timed call: a runtime's worker threads keep spinning for a while after
# their work ends (OpenMP's wait policy, XLA's thread pool) and would steal the cores from the
# other side's next call. It reduces, but does not remove, the slowdown of jaxdyn's first train
# steps after PyTorch ones (docs/results/performance.md); the spread rule reports what is left.
PAUSE_S = 0.3


def load_average() -> float:
    """The 1-minute load average (0.0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _machine_busy_s() -> float | None:
    """Seconds of CPU time all cores spent not idle since boot (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Watch:
    """Load and foreign CPU around one suite: `with Watch() as w: ...; w.facts()`."""

    def __init__(self, settle_s: float = SETTLE_S):
        self.settle_s = settle_s

    def __enter__(self) -> Watch:
        deadline = time.monotonic() + self.settle_s
        while load_average() > MAX_LOAD and time.monotonic() < deadline:
            time.sleep(1.0)  # the previous suite's own load decays (1-min average)
        self.load_before = load_average()
        self.t0, self.busy0, self.own0 = time.monotonic(), _machine_busy_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.monotonic() - self.t0
        busy1, own1 = _machine_busy_s(), _own_cpu_s()
        self.load_after = load_average()
        self.foreign = None
        if self.busy0 is not None and busy1 is not None and self.wall > 0:
            other = (busy1 - self.busy0) - (own1 - self.own0)
            self.foreign = max(other, 0.0) / (self.wall * (os.cpu_count() or 1))

    def facts(self) -> dict[str, Any]:
        reasons = []
        if self.load_before > MAX_LOAD:
            reasons.append(f"load {self.load_before:.2f} > {MAX_LOAD} before the suite")
        if self.foreign is not None and self.foreign > MAX_FOREIGN:
            reasons.append(f"other processes used {100 * self.foreign:.0f}% of the cores")
        return {"load_before": round(self.load_before, 2), "load_after": round(self.load_after, 2),
                "foreign_cpu": None if self.foreign is None else round(self.foreign, 3),
                "cpu_count": os.cpu_count(), "suite_noise": reasons}


def interleave(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2,
               pause_s: float = PAUSE_S) -> dict[str, dict[str, Any]]:
    """Time each callable `rounds` times, interleaved A B, B A, A B, … after `warmup` untimed
    calls each (compilation), with `pause_s` of idle time before every timed call (see
    PAUSE_S). A callable returning a float reports its own seconds (e.g. a decode time that
    excludes prefill); otherwise its wall time counts, results blocked on.
    Returns per name: median_s, best_s, spread, rounds, times, warmup_s."""
    names = list(fns)
    warm = {}
    for n in names:
        t0 = time.perf_counter()
        for _ in range(warmup):
            block(fns[n]())
        warm[n] = time.perf_counter() - t0
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(max(rounds, 1)):
        for n in (names if r % 2 == 0 else names[::-1]):
            if pause_s > 0 and len(names) > 1:
                time.sleep(pause_s)
            t0 = time.perf_counter()
            out = block(fns[n]())
            dt = time.perf_counter() - t0
            times[n].append(float(out) if isinstance(out, float) else dt)
    return {n: summary(times[n]) | {"warmup_s": warm[n]} for n in names}


def summary(times: list[float]) -> dict[str, Any]:
    """Median, best, spread (IQR / median), range ((max − min) / median) of the rounds."""
    med = statistics.median(times)
    q1, _, q3 = (statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1
                 else (med, med, med))
    rel = lambda x: x / med if med > 0 else 0.0
    return {"median_s": med, "best_s": min(times), "rounds": len(times),
            "spread": rel(q3 - q1), "range": rel(max(times) - min(times)),
            "times": [round(t, 6) for t in times]}


def judge(rows: list[dict], facts: dict[str, Any]) -> list[dict]:
    """Attach the suite's load facts to its rows and withhold verdicts from noisy ones: a row
    is noisy for the suite's reasons or its own spread; a row compared against a noisy row of
    the same suite is judged noisy too."""
    noisy_impl, noisy_name = {}, {}
    for r in rows:
        timed = r.get("spread") is not None
        reasons = list(facts["suite_noise"]) if timed else []
        if timed and r["spread"] > MAX_SPREAD:
            reasons.append(f"spread {100 * r['spread']:.0f}% > {100 * MAX_SPREAD:.0f}%")
        r.update({k: v for k, v in facts.items() if k != "suite_noise"})
        r["noisy"], r["noise"] = bool(reasons), "; ".join(reasons)
        noisy_impl[(r.get("name"), r.get("impl"))] = r["noisy"]
        noisy_name[r.get("name")] = noisy_name.get(r.get("name"), False) or r["noisy"]
    for r in rows:  # the reference: same name, impl = ref (torch); else the row named ref (dense)
        ref = r.get("ref")
        ref_noisy = noisy_impl.get((r.get("name"), ref), noisy_name.get(ref, False))
        if ref_noisy and not r["noisy"]:
            r["noisy"], r["noise"] = True, f"reference {r['ref']} is noisy"
        if r["noisy"] and r.get("meets_target") is not None:
            r["meets_target"] = None
            r["target"] = f"{r.get('target', '')} (not judged: noisy)".strip()
    return rows

"""Suite `scaling`: train-step throughput vs number of (fake) devices, and bytes per device of
parameters + optimizer state under FSDP (mesh data=1, fsdp=N, tensor=1), which should fall
about 1/N.

Each N runs in its own subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=N`
(the flag is read once, when the backend starts). On one CPU the fake devices share the same
cores, so throughput does not grow with N there; the memory column is the point on CPU. The
subprocess is the bench CLI's hidden worker mode (jaxdyn/cli/bench.py), which calls `child`:

    python -m jaxdyn.bench --worker scaling --child N --preset tiny   # JSON line on stdout
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax

from jaxdyn.bench import common, protocol
from jaxdyn.bench.train import jaxdyn_step

DEVICE_COUNTS = (1, 2, 4, 8)
MARK = "SCALING_RESULT "


def per_device_bytes(tree) -> int:
    """Bytes that device 0 holds of every array in `tree` (its addressable shard)."""
    dev = jax.devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            if shard.device == dev:
                total += shard.data.nbytes
    return total


def child(n: int, preset: dict) -> dict:
    """Measure on n devices (this process must have been started with n devices); `preset`
    holds the fields of a `common.Preset`."""
    if jax.device_count() != n:
        raise RuntimeError(f"expected {n} devices, jax sees {jax.device_count()}; set XLA_FLAGS="
                           f"--xla_force_host_platform_device_count={n} before jax starts")
    p = common.Preset(**preset)
    batch = -(-p.batch // n) * n  # rows divisible by the fsdp axis
    cfg = common.train_config(p, mesh=(1, n, 1), batch=batch)
    step = jaxdyn_step(cfg)
    r = protocol.interleave({"step": step}, p.repeats)["step"]
    state = step()
    params_b = per_device_bytes(state.params)
    opt_b = per_device_bytes(state.opt_state)
    total_b = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
    tokens = batch * cfg.train.seq_len
    return {"devices": n, "batch": batch, "tokens_per_s": tokens / r["median_s"],
            "step_ms": 1e3 * r["median_s"], "spread": r["spread"], "rounds": r["rounds"],
            "params_bytes_per_device": params_b,
            "opt_bytes_per_device": opt_b, "state_bytes_per_device": params_b + opt_b,
            "state_bytes_total": total_b, "compile_s": r["warmup_s"]}


def worker_command(n: int, preset_json: str) -> list[str]:
    """The command line of one measurement on `n` devices (`child` in a fresh process)."""
    return [sys.executable, "-m", "jaxdyn.bench", "--worker", "scaling", "--child", str(n),
            "--preset-json", preset_json]


def run(preset_name: str, ctx: dict, counts: tuple[int, ...] | None = None) -> list[dict]:
    """One row per device count (`counts`, else `ctx["device_counts"]`, else DEVICE_COUNTS)."""
    counts = counts or ctx.get("device_counts") or DEVICE_COUNTS
    preset = json.dumps(dataclasses.asdict(common.get_preset(preset_name)))
    rows, base = [], None
    for n in counts:
        env = dict(os.environ)
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
        env.setdefault("JAX_PLATFORMS", "cpu")
        proc = subprocess.run(worker_command(n, preset), env=env, capture_output=True, text=True,
                              timeout=ctx.get("timeout", 1800))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
        if proc.returncode or not lines:
            rows.append({"suite": "scaling", "name": f"fsdp N={n}", "impl": "jaxdyn",
                         "notes": f"failed (rc {proc.returncode}): {proc.stderr[-400:]}"})
            continue
        r = json.loads(lines[-1][len(MARK):])
        row = {"suite": "scaling", "name": f"fsdp N={n}", "impl": "jaxdyn", **r,
               "peak_mem_bytes": None}
        if base is None:
            base = row
            row["notes"] = "reference (1 device)"
        else:
            row["ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["ref"] = "N=1"
            row["memory_ratio"] = row["state_bytes_per_device"] / base["state_bytes_per_device"]
            row["target"] = f"state bytes/device ~ 1/{n}"
            row["meets_target"] = row["memory_ratio"] <= 1.25 / n
            row["notes"] = (f"state/device {row['state_bytes_per_device'] / 2**20:.1f} MiB = "
                            f"{row['memory_ratio']:.3f} of N=1 (ideal {1 / n:.3f})")
        rows.append(row)
    return rows

"""Process-0 metrics: `metrics.jsonl` (docs/training.md), TensorBoard, optional W&B.

One JSON object per line, flat `/`-separated keys. Non-finite values are written as `null` and
listed under `"nonfinite"`. On resume, lines past the restored step are dropped first so the
file always describes one consistent run. A torn last line (a run killed mid-write) is dropped
with a warning; a malformed line before it is damage and raises `MetricsFileError`.
On an object store (no appends) the whole object is uploaded again at every write, so each
version is whole; TensorBoard is not written there (tensorboardX writes local event files).
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

from jaxdyn.config import paths
from jaxdyn.distributed import is_main_process
from jaxdyn.train.workdir import check_inside, safe_write

_WARNED: set[tuple[str, int]] = set()  # (file, size) whose torn last line was reported


class MetricsFileError(ValueError):
    """metrics.jsonl has a malformed line that is not a torn last line."""


def read_metrics(workdir: str) -> list[dict]:
    """The rows of `workdir/metrics.jsonl` ([] when absent). A last line that does not parse
    (left by a run killed mid-write) is dropped with a warning, printed once; a malformed line
    before it raises `MetricsFileError` naming the file and line."""
    path = paths.join(workdir, "metrics.jsonl")
    try:
        data = paths.read_bytes(path)
    except FileNotFoundError:
        return []
    lines = [(i, line) for i, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    rows = []
    for j, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError included
            if j < len(lines) - 1:
                raise MetricsFileError(
                    f"{path} line {i} is not a metrics row ({str(e).splitlines()[0][:80]}) "
                    "and is not the last line, so it is damage, not an interrupted write: "
                    "repair or delete that line (checkpoints are unaffected)") from None
            if (path, len(data)) not in _WARNED:
                _WARNED.add((path, len(data)))
                print(f"{path}: dropped a torn last line ({len(line)} bytes) left by an "
                      "interrupted run", file=sys.stderr)
            break
        rows.append(row)
    return rows


def last_logged(rows: list[dict], step: int) -> dict[str, float]:
    """What the trainer returns at `step`: the last train row up to it and the validation
    rows logged after that row (None -> nan)."""
    last: dict[str, float] = {}
    for r in rows:
        if r.get("step", 0) > step or r.get("split") == "transfer":
            continue
        vals = {k: float("nan") if v is None else float(v) for k, v in r.items()
                if k not in ("step", "split", "time", "nonfinite")}
        last = vals if r.get("split") == "train" else {**last, **vals}
    return last


class MetricsWriter:
    """Append-only JSONL (+ TensorBoard) writer; a no-op on processes other than 0."""

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True,
                 wandb_project: str | None = None, config: dict | None = None):
        self.active = is_main_process()
        self.path = paths.join(workdir, "metrics.jsonl")
        self.workdir = workdir
        self.url = paths.is_url(workdir)
        self.tb = self.wandb = self.file = None
        if not self.active:
            return
        paths.makedirs(workdir)
        check_inside(workdir, "metrics.jsonl")  # refuses a symlink out of the workdir
        kept = [r for r in read_metrics(workdir) if r.get("step", 0) <= resume_step]
        self.lines = [json.dumps(r, allow_nan=False) + "\n" for r in kept]
        safe_write(workdir, "metrics.jsonl", "".join(self.lines))
        if not self.url:
            self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        if tensorboard and self.url:
            print(f"tensorboard: not written to the object store {workdir} (tensorboardX writes "
                  "local event files); metrics.jsonl holds the same scalars", file=sys.stderr)
        elif tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(check_inside(workdir, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("wandb is not installed; continuing without it")
            else:
                self.wandb = wandb.init(project=wandb_project, config=config,
                                        dir=None if self.url else workdir)

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.active:
            return
        row: dict[str, Any] = {"step": int(step), "split": split, "time": time.time()}
        bad = []
        for k, v in values.items():
            v = float(v)
            if math.isfinite(v):
                row[k] = v
            else:
                row[k] = None
                bad.append(k)
        if bad:
            row["nonfinite"] = bad
        line = json.dumps(row, allow_nan=False) + "\n"
        if self.file is not None:
            self.file.write(line)
            self.file.flush()
        else:  # object store: no appends; upload the whole file again
            self.lines.append(line)
            safe_write(self.workdir, "metrics.jsonl", "".join(self.lines))
        for k, v in values.items():
            if self.tb is not None and math.isfinite(float(v)):
                self.tb.add_scalar(k, float(v), step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k not in ("time", "split")},
                           step=step)

    def close(self) -> None:
        if not self.active:
            return
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

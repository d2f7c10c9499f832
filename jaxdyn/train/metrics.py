"""Process-0 metrics: `metrics.jsonl` (docs/training.md), TensorBoard, optional W&B.

One JSON object per line, flat `/`-separated keys. Non-finite values are written as `null` and
listed under `"nonfinite"`. On resume, lines past the restored step are dropped first so the
file always describes one consistent run.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from jaxdyn.distributed import is_main_process


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Append-only JSONL (+ TensorBoard) writer; a no-op on processes other than 0."""

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True,
                 wandb_project: str | None = None, config: dict | None = None):
        self.active = is_main_process()
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = self.wandb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        kept = [r for r in read_metrics(workdir) if r.get("step", 0) <= resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in kept)
        os.replace(tmp, self.path)
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("wandb is not installed; continuing without it")
            else:
                self.wandb = wandb.init(project=wandb_project, config=config, dir=workdir)

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
        self.file.write(json.dumps(row, allow_nan=False) + "\n")
        self.file.flush()
        for k, v in values.items():
            if self.tb is not None and math.isfinite(float(v)):
                self.tb.add_scalar(k, float(v), step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k not in ("time", "split")},
                           step=step)

    def close(self) -> None:
        if not self.active:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

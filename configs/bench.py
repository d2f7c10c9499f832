"""Bench presets: `python -m jaxdyn.bench --preset NAME` (jaxdyn/bench/).

    python -m jaxdyn.bench --suite all --preset tiny --out results.json    # CI-sized
    python -m jaxdyn.bench --suite train --preset small --out train.json    # the CPU targets

A bench preset is a preset of configs/presets.py that has a `bench` block, so a preset name
means the same model shape here as in every experiment config:

- `model`: the schema's defaults plus the preset's `model` block (what `base_config(name)`
  gives). The suites that train (`train`, `routing`, `scaling`) put these fields into
  configs/standard.py, mod.py or dtf.py; those configs keep their own `arch` and `routing`.
- `bench`: the workload. `batch` and `seq_len` size the forward and train-step batches,
  `prompt_len` and `new_tokens` the batch-1 decode, and `repeats` is the number of timed calls
  after the warm-up (`--repeats` overrides it). `torch` runs the transformers PyTorch reference
  in the same process when torch is installed.

Presets: `tiny` (CI: every suite in a few minutes on 2 cores; the numbers mean nothing),
`small` (the shape the CPU targets refer to), `qwen2.5-0.5b` and `qwen2.5-1.5b` (Qwen2.5
shapes with random weights, bf16 compute: for accelerators).
"""

import ml_collections as mlc

from configs.presets import PRESETS as TABLE
from configs.presets import base_config

PRESETS = tuple(name for name, p in TABLE.items() if "bench" in p)


def get_config(preset: str = "small"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/bench.py; choose one of "
                         f"{PRESETS}")
    c = mlc.ConfigDict()
    c.preset = preset
    c.model = base_config(preset).model
    c.bench = mlc.ConfigDict(dict(TABLE[preset]["bench"]))
    c.bench.torch = True  # also time the transformers PyTorch reference (when installed)
    return c

"""Mixture-of-Depths (Raposo et al., 2024): every other layer routes its top-k tokens.

    python -m jaxdyn.train --config configs/mod.py:tiny --workdir runs/mod
    python -m jaxdyn.train --config configs/mod.py:qwen2.5-0.5b \
        --config.init.checkpoint=imports/qwen2.5-0.5b --workdir runs/mod-0.5b

Presets: `tiny`, `small` (from scratch, capacity 0.5), `c0.125` (the MoD paper's 12.5 % on the
small shapes) and `qwen2.5-0.5b`, the thesis's MoD arm: transfer from an imported dense
Qwen2.5-0.5B at γ 0.5 (0.125: `--config.model.routing.capacity=0.125`) on the seven-set mix
with the thesis's steps, LR groups and no clipping (as configs/dtf.py:qwen2.5-0.5b).
"""

from configs.presets import THESIS_DATA, base_config

PRESETS = ("tiny", "small", "c0.125", "qwen2.5-0.5b")
PRESET_SHAPE = {"c0.125": "small"}  # a run variant on the `small` shapes
# Thesis learning rates relative to the base 1e-5: router 1e-5, causal predictors 1e-3
# (first matching rule wins; every other parameter x1).
THESIS_LR_GROUPS = (("router/w", 1.0), ("predictor/", 100.0))


def get_config(preset: str = "tiny"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/mod.py; choose one of "
                         f"{PRESETS}")
    c = base_config(PRESET_SHAPE.get(preset, preset))
    c.preset = preset
    c.model.arch = "mod"
    c.model.routing.capacity = 0.125 if preset == "c0.125" else 0.5  # γ, k = int(γ·T)
    c.model.routing.gate = "sigmoid"  # σ(r) scales routed updates ("raw" = the paper's r)
    # Router and causal predictor are new parameters: no weight decay on the router vector.
    c.train.no_decay = (*c.train.no_decay, "router/w")
    if preset == "qwen2.5-0.5b":
        c.train.lr_groups = THESIS_LR_GROUPS
        c.train.clip_norm = 0.0  # the thesis used no clipping
        c.data.update(THESIS_DATA)  # the thesis's seven-set mix (configs/presets.py)
    return c

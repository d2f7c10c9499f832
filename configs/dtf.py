"""Dynamic Transformer (DTF / SDT): surprise-gated (decision, dynamic) layer pairs.

    python -m jaxdyn.train --config configs/dtf.py:tiny --workdir runs/dtf
    python -m jaxdyn.train --config configs/dtf.py:qwen2.5-0.5b \
        --config.init.checkpoint=imports/qwen2.5-0.5b --workdir runs/dtf-0.5b

Presets: `tiny`, `small` (from scratch, capacity 0.5), `c0.125` (12.5 % capacity, the MoD
paper's setting) and `qwen2.5-0.5b`, the thesis recipe: transfer from an imported dense
Qwen2.5-0.5B, γ 0.5, PriorFFN f 0.0625, prior loss 0.05, the seven-set data mix
(configs/presets.py THESIS_DATA), 728 steps of 1024 × 1024 tokens, seed 42, its LR groups, no
clipping, bf16 compute. One known difference: documents are packed with segment ids (no
attention across documents); the thesis cut the concatenated text into blocks.
"""

from configs.presets import THESIS_DATA, base_config

PRESETS = ("tiny", "small", "c0.125", "qwen2.5-0.5b")
PRESET_SHAPE = {"c0.125": "small"}  # a run variant on the `small` shapes
GATE_SCALARS = "/(beta_ce|beta_cu|o_ce|m_cu)$"
# Thesis learning rates relative to the base 1e-5: PriorFFN and its norm 1e-3, gate scalars
# 1e-2, causal routers 1e-3 (first matching rule wins; every other parameter x1).
THESIS_LR_GROUPS = (("prior", 100.0), (GATE_SCALARS, 1000.0), ("predictor/", 100.0))


def get_config(preset: str = "tiny"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/dtf.py; choose one of "
                         f"{PRESETS}")
    c = base_config(PRESET_SHAPE.get(preset, preset))
    c.preset = preset
    c.model.arch = "dtf"
    c.model.routing.capacity = 0.125 if preset == "c0.125" else 0.5
    c.model.routing.gate = "or"  # probabilistic OR of S_CE and S_CU ("ce": S_CE only)
    c.model.routing.prior_width_factor = 0.0625  # PriorFFN width ≈ D/16
    c.model.routing.prior_loss_weight = 0.05
    # β, o_ce and m_cu are gate scalars: never decayed.
    c.train.no_decay = (*c.train.no_decay, GATE_SCALARS)
    if preset == "qwen2.5-0.5b":
        c.train.lr_groups = THESIS_LR_GROUPS
        c.train.clip_norm = 0.0
        c.data.update(THESIS_DATA)  # the thesis's seven-set mix (configs/presets.py)
    return c

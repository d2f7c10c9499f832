"""Dense decoder language modelling (the baseline every routed model is compared with).

    python -m jaxdyn.train --config configs/standard.py:tiny --workdir runs/std
    python -m jaxdyn.train --config configs/standard.py:small --config.train.lr=1e-3 ...
    python -m jaxdyn.train --config configs/standard.py:qwen2.5-0.5b \
        --config.init.checkpoint=imports/qwen2.5-0.5b --workdir runs/qwen

`qwen2.5-0.5b` continues an imported Qwen2.5-0.5B on the thesis's seven-set mix: the dense arm
of the thesis comparison (configs/dtf.py). Presets come from configs/presets.py (shapes and
run sizes); every field is documented where its default is written (jaxdyn/train/schema.py and
the model/data dataclasses).
"""

from configs.presets import THESIS_DATA, base_config

PRESETS = ("tiny", "small", "qwen2.5-0.5b")


def get_config(preset: str = "tiny"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/standard.py; choose one of "
                         f"{PRESETS}")
    c = base_config(preset)
    if preset == "qwen2.5-0.5b":
        c.data.update(THESIS_DATA)
        c.train.clip_norm = 0.0  # as the routed arms
    return c

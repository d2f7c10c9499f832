"""Dense decoder language modelling (the baseline every routed model is compared with).

    python -m jaxdyn.train --config configs/standard.py:tiny --workdir runs/std
    python -m jaxdyn.train --config configs/standard.py:small --config.train.lr=1e-3 ...
    python -m jaxdyn.train --config configs/standard.py:qwen2.5-0.5b \
        --config.init.checkpoint=imports/qwen2.5-0.5b --workdir runs/qwen

Presets come from configs/presets.py (shapes and run sizes); every field is documented where
its default is written (jaxdyn/train/schema.py and the model/data dataclasses).
"""

from configs.presets import base_config

PRESETS = ("tiny", "small", "qwen2.5-0.5b")


def get_config(preset: str = "tiny"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/standard.py; choose one of "
                         f"{PRESETS}")
    return base_config(preset)

"""Multi-token prediction heads (DynaMo; Tuli et al., NAACL 2024): Pythia first.

    python -m jaxdyn.train --config configs/mtp.py:tiny --workdir runs/mtp
    python -m jaxdyn.train --config configs/mtp.py:pythia-70m \
        --config.init.checkpoint=imports/pythia-70m --workdir runs/mtp-70m

The stem (layers 0..L-2) and head 1 (layer L-1 + final norm + unembedding) are the dense
model; heads 2..n are one new decoder layer + norm each (jaxdyn/multitoken/heads.py). Learning
rates LR_B : LR_M : LR_MB = 1 : 100 : 0.1: `train.lr` is LR_B, `train.lr_groups` gives the new
heads 100x, and `mtp.stem_grad_scale` scales the heads' gradient into the stem. Presets:
`tiny` (CPU, from scratch), `small`, `pythia-70m` (the paper's 77M-T3 recipe on an imported
Pythia-70M: a 5 % sample of the Pile, 97/3 split, 2048-token rows, one epoch; the default
source is the public Pile copy without its copyrighted subsets, since the original is no
longer distributed — `configs/presets.py` DYNAMO_DATA says how to point it at a full copy).
"""

from configs.presets import DYNAMO_DATA, base_config

PRESETS = ("tiny", "small", "pythia-70m")

# GPT-NeoX (Pythia) block fields shared by every preset (no GQA: K = N).
_NEOX = dict(family="gpt_neox", activation="gelu", qkv_bias=True, o_bias=True, mlp_bias=True,
             rotary_pct=0.25, parallel_residual=True, norm_eps=1e-5, tie_embeddings=False)


def get_config(preset: str = "tiny"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/mtp.py; choose one of "
                         f"{PRESETS}")
    c = base_config(preset, "mtp", "dynamo")
    c.train.objective = "mtp"
    c.model.update(_NEOX)
    c.model.num_kv_heads = c.model.num_heads
    if preset == "pythia-70m":
        c.train.update(eps=1e-8, min_lr_ratio=0.0)
        c.data.update(DYNAMO_DATA)
    # The `mtp` block keeps its defaults (jaxdyn/multitoken/objective.py: 3 heads, LR_MB 0.1).
    # LR_M = 100 LR_B for every parameter of heads 2..n (first match wins, others 1.0). The
    # ratio is the paper's for fine-tuning a pretrained model (pythia-70m); the from-scratch
    # presets train everything at one LR (100 x 3e-3 diverges within 30 steps).
    c.train.lr_groups = (("^heads/", 100.0 if preset == "pythia-70m" else 1.0),)
    c.train.update(weight_decay=0.0, b1=0.9, b2=0.95)  # paper AdamW; decay unstated (ours: 0)
    # The `dynamo` block (DynaMo sampling for `python -m jaxdyn.generate --mode multitoken`)
    # keeps the defaults of jaxdyn.multitoken.grid.DynamoOptions.
    return c

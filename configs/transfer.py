"""Dense → routed transfer study: the DTF thesis comparison at CPU scale.

    python -m jaxdyn.experiments transfer --config configs/transfer.py:cpu --out runs/transfer
    python -m jaxdyn.experiments transfer --config configs/transfer.py:tiny --out /tmp/tr

The thesis (Wieser, "Dynamic Transformers") continues a pretrained dense Qwen2.5-0.5B as MoD
and DTF and compares them. This study does the same on the `tiny` shapes: pretrain one dense
model on the built-in corpus (this file's model/train/data blocks with
`experiment.pretrain_*`), then from that one checkpoint continue every arm for the same
tokens with each seed, and train every arm from scratch for the same tokens as a control.
The driver is jaxdyn/experiments/transfer.py; results land in `<out>/results.{md,json}` and
`<out>/val_loss_vs_flops.png`.

Presets: `tiny` (CI: seconds per run, one seed) and `cpu` (the study: 3 seeds, ≤ 60 min on
2 CPU cores).
"""

import ml_collections as mlc

from configs.dtf import GATE_SCALARS
from configs.presets import base_config

PRESETS = ("tiny", "cpu")
PRESET_SHAPE = {"cpu": "tiny"}  # both variants use the `tiny` shapes


def get_config(preset: str = "cpu") -> mlc.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/transfer.py; choose one of "
                         f"{PRESETS}")
    cpu = preset == "cpu"
    c = base_config("tiny")  # 4 layers: MoD routes layers 1 and 3; DTF has two pairs
    c.preset = preset
    c.data.max_documents = 1200 if cpu else 200  # stdlib files, byte-level
    c.train.update(batch_size=32 if cpu else 8, seq_len=64, seed=0)
    # The eval split is the same for every run; causal routing is reported beside top-k.
    c.eval.update(every=50 if cpu else 4, batches=16 if cpu else 2, causal_mode=True)
    c.log.update(every=50 if cpu else 4, tensorboard=False)
    c.sample.max_new_tokens = 0
    c.experiment = mlc.ConfigDict(dict(
        # Arms: "dense" or "<mod|dtf>@<γ>", each continued from the dense checkpoint.
        arms=("dense", "mod@0.5", "dtf@0.5", "mod@0.125", "dtf@0.125") if cpu else
        ("dense", "mod@0.5", "dtf@0.5"),
        seeds=(0, 1, 2) if cpu else (0,),
        # Pretraining (one dense model, seed 0): the preset's from-scratch recipe.
        pretrain_steps=2000 if cpu else 12,
        pretrain_lr=3e-3,
        pretrain_warmup=100 if cpu else 2,
        # Continuation, the thesis recipe scaled to the run: AdamW, warm-up 1 %, cosine to 0,
        # no clipping. Pretrained weights: the thesis's base LR 1e-5 is ~1/30 of Qwen2.5's
        # pretraining peak, so the base here is pretrain_lr / 30. New parameters keep the
        # thesis's absolute LRs (their scale does not depend on the model's: the gate scalars
        # are O(1) numbers; with the thesis's ratios, gate scalars at 1000 x this base = 0.1,
        # DTF at γ 0.125 hit a non-finite loss at step 18): PriorFFN + norm 1e-3, gate
        # scalars 1e-2, causal routers 1e-3, the MoD router at the base LR as in the thesis.
        steps=300 if cpu else 8,
        lr=1e-4,
        warmup_frac=0.01,
        lr_groups=dict(dense=(), mod=(("router/w", 1.0), ("predictor/", 10.0)),
                       dtf=(("prior", 10.0), (GATE_SCALARS, 100.0), ("predictor/", 10.0))),
        no_decay=dict(dense=(), mod=("router/w",), dtf=(GATE_SCALARS,)),
        # From-scratch control: these arms for the same tokens from random weights at the
        # pretraining recipe's LR (no groups); () = none. γ = 0.5 only in the cpu study, to
        # keep it within the hour.
        scratch_arms=("dense", "mod@0.5", "dtf@0.5"),
        scratch_lr=3e-3,
        scratch_warmup=20 if cpu else 1,
    ))
    return c

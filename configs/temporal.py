"""Temporal-causal adapters (DYNAMO) on a frozen dense backbone, on TCG-Synth.

    python -m jaxdyn.train --config configs/temporal.py:tiny --workdir runs/temporal-tiny
    python -m jaxdyn.experiments temporal --config configs/temporal.py:mini --out runs/tx
    python -m jaxdyn.temporal synth --out DIR --seed 0          # the benchmark alone

`python -m jaxdyn.train` with this file trains the adapters (objective `temporal`, stage
`adapters`) on the backbone in `init.checkpoint` (random when empty: a smoke run). The study
(`jaxdyn.experiments temporal`) first pretrains the backbone with the same trainer
(`temporal_loss.stage=backbone`, sizes from the `experiment` block), then trains every run on
it. Presets: `tiny` (CI smoke run), `mini` (the CPU study, ≤ 20 min alone on 2 cores) and
`qwen2.5-0.5b` (spec-default adapter widths on Qwen2.5-0.5B shapes; adapter training on an
accelerator from `init.checkpoint`). Field meanings: jaxdyn/temporal/encoders.py
(TemporalConfig), jaxdyn/temporal/world.py (SynthConfig), jaxdyn/temporal/batching.py
(Shapes), jaxdyn/temporal/objective.py (TemporalLossConfig).
"""

import ml_collections as mlc

from configs.presets import base_config

PRESETS = ("tiny", "mini", "qwen2.5-0.5b")


def _pick(preset: str, **values):
    return values[preset.replace(".", "_").replace("-", "_")]


def get_config(preset: str = "tiny") -> mlc.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/temporal.py; choose one of "
                         f"{PRESETS}")
    c = base_config(preset, "temporal", "synth", "shapes", "temporal_loss")
    c.train.objective = "temporal"
    # From scratch: the syllable tokenizer (jaxdyn/temporal/tokenizer.py, V = 1664). On an
    # imported backbone: the tokenizer stored with init.checkpoint (any other is refused).
    c.tokenizer.kind = _pick(preset, tiny="tcg_syllable", mini="tcg_syllable",
                             qwen2_5_0_5b="checkpoint")
    c.model.max_position_embeddings = _pick(preset, tiny=128, mini=128, qwen2_5_0_5b=32768)
    # ----- the temporal pathway (spec widths at 0.5B) -----
    c.temporal.update(
        d_t=_pick(preset, tiny=8, mini=16, qwen2_5_0_5b=64),
        d_n=_pick(preset, tiny=16, mini=64, qwen2_5_0_5b=128),
        d_g=_pick(preset, tiny=16, mini=64, qwen2_5_0_5b=128),
        rank=_pick(preset, tiny=8, mini=32, qwen2_5_0_5b=64),
        # W_t's init scale: at the design's 1 the Time2Vec sin features carry ≈4x the
        # across-example variance of W_g f_g into the adapter and drown the graph signal
        # (measured, docs/features/temporal.md); 0.1 keeps the time pathway alive but quiet.
        time_init=_pick(preset, tiny=0.1, mini=0.1, qwen2_5_0_5b=1.0))
    # ----- TCG-Synth world and splits -----
    c.synth.update(
        n_companies=_pick(preset, tiny=24, mini=60, qwen2_5_0_5b=200),
        n_people=_pick(preset, tiny=60, mini=150, qwen2_5_0_5b=400),
        n_cities=_pick(preset, tiny=8, mini=20, qwen2_5_0_5b=100),
        n_sectors=_pick(preset, tiny=4, mini=10, qwen2_5_0_5b=50),
        n_train=_pick(preset, tiny=192, mini=2000, qwen2_5_0_5b=50_000),
        n_eval=_pick(preset, tiny=24, mini=200, qwen2_5_0_5b=5000),
        n_max=_pick(preset, tiny=24, mini=32, qwen2_5_0_5b=64),
        e_max=_pick(preset, tiny=64, mini=96, qwen2_5_0_5b=256))
    # ----- static batch shapes (one compile per preset) -----
    # (answers take more BPE tokens than syllables: " Vornex\n" is 3 syllable ids)
    c.shapes.update(seq_len=_pick(preset, tiny=64, mini=56, qwen2_5_0_5b=256),
                    ans_len=_pick(preset, tiny=6, mini=6, qwen2_5_0_5b=12),
                    n_max=c.synth.n_max, e_max=c.synth.e_max,
                    name_len=_pick(preset, tiny=4, mini=4, qwen2_5_0_5b=12))
    # ----- adapter training: only temporal/… trains (the objective's default) -----
    c.train.update(
        steps=_pick(preset, tiny=3, mini=1500, qwen2_5_0_5b=20_000),
        batch_size=_pick(preset, tiny=8, mini=16, qwen2_5_0_5b=16),
        seq_len=c.shapes.seq_len, grad_accum=1,
        # Peak AdamW lr; the design's 1e-4 is for long runs, the mini preset trains 1,500 steps.
        lr=_pick(preset, tiny=3e-3, mini=3e-3, qwen2_5_0_5b=1e-4),
        warmup_steps=_pick(preset, tiny=1, mini=150, qwen2_5_0_5b=2000))
    # AdamW decays matrices only: not biases, norms, embeddings, Time2Vec or the pool query.
    c.train.no_decay = (*c.train.no_decay, "time2vec/", r"/b(_o|_[0-9]+)?$", "_ln|/ln_",
                        "pool_query", "_emb/")
    c.eval.update(every=_pick(preset, tiny=3, mini=500, qwen2_5_0_5b=1000), batches=2)
    c.log.every = _pick(preset, tiny=1, mini=100, qwen2_5_0_5b=100)
    c.checkpoint.every = c.train.steps
    c.sample.max_new_tokens = 6  # the answer to the first validation record
    if preset == "qwen2.5-0.5b":
        c.init.checkpoint = ""  # set to an imported Qwen2.5-0.5B folder (with its tokenizer)
    # ----- the study (jaxdyn.experiments temporal): runs compared on one frozen backbone ----
    c.experiment = mlc.ConfigDict(dict(
        # base (frozen, no adapters), full, ablations, date_in_prompt (+ LoRA on q, v); also
        # token_conditioned and mean_readout (the full recipe with W_h·RMSNorm(Block(H))
        # added, or readout="mean"), not in the default lists.
        runs=_pick(preset, tiny=("base", "full", "no_gnn", "date_in_prompt"),
                   mini=("base", "full", "no_time2vec", "no_gnn", "no_reg", "all_pairs",
                         "date_in_prompt"),
                   qwen2_5_0_5b=("full",)),
        lora_rank=8,  # LoRA rank of the date-in-prompt baseline
        eval_batch=_pick(preset, tiny=32, mini=64, qwen2_5_0_5b=16),  # rows per eval batch
        save_checkpoint="full",  # run whose workdir is kept as <out>/checkpoint ("" = none)
        # Backbone pretraining from scratch on the train questions (stage `backbone`);
        # 0 steps = use init.checkpoint as the frozen backbone.
        pretrain_steps=_pick(preset, tiny=4, mini=3000, qwen2_5_0_5b=0),
        pretrain_lr=3e-3,  # peak AdamW lr of the from-scratch backbone
        pretrain_batch=32,  # sequences per pretraining step
    ))
    return c

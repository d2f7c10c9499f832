"""Temporal-causal adapters (DYNAMO; temporal spec) on a frozen dense backbone, on TCG-Synth.

    python -m jaxdyn.experiments.temporal --config configs/temporal.py:small --out runs/temporal
    python -m jaxdyn.experiments.temporal --preset tiny --out runs/temporal-tiny
    python -m jaxdyn.temporal.synth --out DIR --seed 0     # the benchmark alone

The temporal trainer is `jaxdyn.experiments.temporal` (it reads the `temporal`, `synth`,
`shapes`, `adapter`, `pretrain` and `experiment` blocks below). `python -m jaxdyn.train` does
not read those blocks: with this file it would only train the dense backbone on `data.source`.
Presets: `tiny` (CI smoke run, < 2 min), `small` (the CPU acceptance run, ≤ 20 min alone on 2
cores) and `qwen2.5-0.5b` (spec-default adapter widths on Qwen2.5-0.5B shapes; parameter
accounting on CPU, adapter training on an accelerator from `init.checkpoint`). Fields of the
standard blocks are documented in configs/standard.py.
"""

import ml_collections as mlc

from configs.standard import base_config

PRESETS = ("tiny", "small", "qwen2.5-0.5b")

# TCG-Synth syllable tokenizer size (jaxdyn.temporal.tokenizer; a multiple of 128).
_SYLLABLE_VOCAB = 1664


def _pick(preset: str, **values):
    return values[preset.replace(".", "_").replace("-", "_")]


def get_config(preset: str = "tiny") -> mlc.ConfigDict:
    c = base_config(preset)
    c.preset = preset
    if preset != "qwen2.5-0.5b":  # tiny qwen2-family backbones, pretrained from scratch
        c.model.update(_pick(preset, tiny=dict(
            hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            intermediate_size=64), small=dict(
            hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
            intermediate_size=192)))
        c.model.update(vocab_size=_SYLLABLE_VOCAB, max_position_embeddings=128)
    # ----- temporal pathway: jaxdyn.temporal.encoders.TemporalConfig (spec §2–§6) -----
    c.temporal = mlc.ConfigDict(dict(
        d_t=_pick(preset, tiny=8, small=16, qwen2_5_0_5b=64),  # Time2Vec width d_t
        periodic="sin",  # "sin" (Kazemi et al.) | "sincos" (README: sin and cos halves)
        period_min=1 / 12,  # shortest Time2Vec period at init, years
        period_max=50.0,  # longest Time2Vec period at init, years
        d_n=_pick(preset, tiny=16, small=64, qwen2_5_0_5b=128),  # GCN node width d_n
        d_g=_pick(preset, tiny=16, small=64, qwen2_5_0_5b=128),  # graph summary width d_g
        gcn_layers=2,  # L_g message-passing layers
        n_rel=4,  # relations: leads, hq_in, supplies, belongs_to
        n_types=4,  # node types: company, person, city, sector
        n_roles=3,  # query role embedding: 0 other node, 1 subject, 2 candidate
        rank=_pick(preset, tiny=8, small=32, qwen2_5_0_5b=64),  # adapter bottleneck r
        token_conditioned=False,  # add W_h·RMSNorm(Block(H)) (per-token ΔH; ≈2× adapter params)
        adapter_layers=(),  # decoder layers with an adapter; () = every layer
        edge_mode="hard",  # "hard" a_e = w·1[from ≤ τ < to] | "soft" sigmoid window (∂/∂τ)
        soft_temp=0.01,  # T_s of the soft window, τ units (0.1 year)
        readout="attn",  # "attn" segment-softmax pooling of query nodes | "mean"
        id_table=0,  # > 0: opt-in learned per-entity table with this many rows (budget!)
        # Scale of W_t's LeCun init (1 = spec). At scale 1 the sin features carry ≈4× the
        # across-example variance of W_g f_g into the adapter and drown the graph signal
        # (measured; README "Temporal adapters"); 0.1 keeps the time pathway alive but quiet
        # (0 would leave a graph=None adapter with GELU(0) = 0 hidden units: it never trains).
        time_init=_pick(preset, tiny=0.1, small=0.1, qwen2_5_0_5b=1.0),
    ))
    # ----- TCG-Synth world and splits: jaxdyn.temporal.synth.SynthConfig (spec §11) -----
    c.synth = mlc.ConfigDict(dict(
        n_companies=_pick(preset, tiny=24, small=60, qwen2_5_0_5b=200),  # companies
        n_people=_pick(preset, tiny=60, small=150, qwen2_5_0_5b=400),  # people (leaders)
        n_cities=_pick(preset, tiny=8, small=20, qwen2_5_0_5b=100),  # cities (hq_in)
        n_sectors=_pick(preset, tiny=4, small=10, qwen2_5_0_5b=50),  # sectors (distractors)
        n_train=_pick(preset, tiny=192, small=2000, qwen2_5_0_5b=50_000),  # train records
        n_eval=_pick(preset, tiny=24, small=200, qwen2_5_0_5b=5000),  # per evaluation split
        n_max=_pick(preset, tiny=24, small=32, qwen2_5_0_5b=64),  # node cap per record graph
        e_max=_pick(preset, tiny=64, small=96, qwen2_5_0_5b=256),  # edge cap per record graph
        seed=0,  # numpy default_rng seed of the generator
    ))
    # ----- static batch shapes: jaxdyn.temporal.batching.Shapes (one compile per preset) -----
    c.shapes = mlc.ConfigDict(dict(
        seq_len=_pick(preset, tiny=64, small=56, qwen2_5_0_5b=256),  # T, prompt + answer
        ans_len=6,  # A, answer tokens incl. the "\n" end marker
        n_max=c.synth.n_max,  # N_max node slots per example
        e_max=c.synth.e_max,  # E_max edge slots per example
        name_len=_pick(preset, tiny=4, small=4, qwen2_5_0_5b=12),  # L_name tokens per node
    ))
    # ----- adapter training: jaxdyn.temporal.batching.TrainConfig (spec §7–§8) -----
    c.adapter = mlc.ConfigDict(dict(
        steps=_pick(preset, tiny=3, small=1500, qwen2_5_0_5b=20_000),  # optimizer steps
        batch_size=_pick(preset, tiny=8, small=16, qwen2_5_0_5b=16),  # examples per step
        # Peak AdamW lr; the spec's 1e-4 is for long runs, the small preset trains 1,500 steps.
        lr=_pick(preset, tiny=3e-3, small=3e-3, qwen2_5_0_5b=1e-4),
        warmup_frac=0.1,  # linear warm-up share of the steps, then cosine decay
        weight_decay=0.01,  # AdamW decay on matrices (not biases, norms, Time2Vec)
        clip=1.0,  # global-norm gradient clipping
        lam=0.1,  # λ of the within-regime JS regulariser (0.5: the draft's value)
        reg_mode="within",  # within | all_pairs (ablation only) | none
        use_time=True,  # False: the "without Time2Vec" ablation (time=None)
        use_graph=True,  # False: the "without GNN" ablation (graph=None)
        seed=0,  # batch order and partner-time sampling
        log_every=_pick(preset, tiny=3, small=100, qwen2_5_0_5b=100),  # log every N steps
    ))
    # ----- backbone pretraining from scratch on train questions (no dates, no graphs) -----
    c.pretrain = mlc.ConfigDict(dict(
        steps=_pick(preset, tiny=4, small=3000, qwen2_5_0_5b=0),  # 0 = use init.checkpoint
        lr=3e-3,  # peak AdamW lr of the from-scratch backbone
        batch_size=32,  # sequences per pretraining step
        # Share of texts whose query entities get fresh names. At 1 the backbone knows no
        # world fact (every answer must come from the graph and the date); at 0.5 it memorised
        # the train-era facts, so a no-GNN run scored far above chance in distribution.
        rename=1.0,
        # Loss weight of prompt tokens (answer tokens weigh 1): a prompt's fresh names are
        # unpredictable noise that otherwise dominates the gradient.
        prompt_weight=0.1,
    ))
    # ----- experiment: runs compared on one frozen backbone (spec §11.5) -----
    c.experiment = mlc.ConfigDict(dict(
        # base (frozen, no adapters), full, ablations, date_in_prompt (+ LoRA r on q, v);
        # also token_conditioned and mean_readout (the full recipe with W_h·RMSNorm(Block(H))
        # added, or readout="mean"), not in the default lists.
        runs=_pick(preset, tiny=("base", "full", "no_gnn", "date_in_prompt"),
                   small=("base", "full", "no_time2vec", "no_gnn", "no_reg", "all_pairs",
                          "date_in_prompt"),
                   qwen2_5_0_5b=("full",)),
        lora_rank=8,  # LoRA rank of the date-in-prompt baseline
        eval_batch=_pick(preset, tiny=32, small=64, qwen2_5_0_5b=16),  # rows per eval batch
        save_checkpoint="full",  # run whose model is saved to <out>/checkpoint ("" = none)
    ))
    return c

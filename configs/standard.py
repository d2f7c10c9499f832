"""Dense decoder language modelling (the baseline every routed model is compared with).

    python -m jaxdyn.train --config configs/standard.py:tiny --workdir runs/std
    python -m jaxdyn.train --config configs/standard.py:small --config.train.lr=1e-3 ...
    python -m jaxdyn.train --config configs/standard.py:qwen2.5-0.5b \
        --config.init.checkpoint=imports/qwen2.5-0.5b --workdir runs/qwen

Other experiments (`mod.py`, `dtf.py`, ...) start from `base_config(preset)` and change what
differs, so every field below is documented once. Derived values (vocabulary raised to the
tokenizer's, cache folder inside the workdir) are set by `jaxdyn.config.loader.finalize`.
"""

import ml_collections as mlc

PRESETS = ("tiny", "small", "qwen2.5-0.5b")

# Model shapes per preset (every other model field takes the defaults in `base_config`).
_MODELS = {
    # A few-second CPU run: 2 layers of width 64 over a byte vocabulary (256 bytes + BOS/EOS).
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=258, max_position_embeddings=512),
    # Minutes on a laptop CPU, a useful baseline for the routing comparison (4k BPE vocab).
    "small": dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
                  intermediate_size=768, vocab_size=4096, max_position_embeddings=2048),
    # Qwen2.5-0.5B (conversion spec §8); meant to start from `init.checkpoint` of an import.
    "qwen2.5-0.5b": dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                         head_dim=64, intermediate_size=4864, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1e6, tie_embeddings=True,
                         dtype="bfloat16", remat_policy="minimal"),
}


def _pick(preset: str, **values):
    """The value for `preset`, falling back to `small`'s for presets not listed."""
    return values.get(preset.replace(".", "_").replace("-", "_"), values["small"])


def base_config(preset: str) -> mlc.ConfigDict:
    """The documented base every experiment config extends (unlocked; `get_config` returns it)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    c = mlc.ConfigDict()
    c.preset = preset  # name of the preset, recorded in config.json

    # ----- model: jaxdyn.model.ModelConfig fields (conversion spec §3 explains each) -----
    c.model = mlc.ConfigDict(dict(
        family="qwen2",  # qwen2 | llama | gpt_neox: per-family block layout
        vocab_size=258,  # V; raised to the tokenizer's size by finalize() if smaller
        hidden_size=64,  # D
        num_layers=2,  # L
        num_heads=4,  # N query heads
        num_kv_heads=2,  # K key/value heads (GQA); N % K == 0
        head_dim=16,  # Hd
        intermediate_size=128,  # F, MLP width
        max_position_embeddings=512,  # longest sequence; train.seq_len may not exceed it
        norm_eps=1e-6,  # RMSNorm/LayerNorm epsilon
        activation="silu",  # silu | gelu | gelu_tanh
        qkv_bias=True,  # biases on q/k/v (Qwen2: yes, Llama: no)
        o_bias=False,  # bias on the attention output projection
        mlp_bias=False,  # biases in the MLP
        tie_embeddings=False,  # unembedding = embedding.T
        parallel_residual=False,  # GPT-NeoX: attention and MLP read the same input
        rope_theta=10000.0,  # RoPE base
        rope_type="default",  # default | linear | llama3
        rope_factor=1.0,  # RoPE scaling factor (linear, llama3)
        rope_low_freq_factor=1.0,  # llama3 scaling
        rope_high_freq_factor=4.0,  # llama3 scaling
        rope_original_max_position=8192,  # llama3 scaling
        rotary_pct=1.0,  # fraction of head_dim rotated (Pythia 0.25)
        dtype="float32",  # compute dtype: float32 | bfloat16 (params/optimizer stay fp32)
        param_dtype="float32",  # master weights: keep fp32
        scan_layers=True,  # nn.scan over layers (fast compile) or unrolled
        remat_policy="none",  # none | full | dots | minimal | offload (spec §4)
        attention_impl="auto",  # auto | xla | cudnn
        arch="dense",  # dense | mod | dtf
        routing=mlc.ConfigDict(),  # routing options of mod/dtf (configs/mod.py, configs/dtf.py)
    ))
    c.model.update(_MODELS[preset])

    # ----- data: jaxdyn.data.DataConfig -----
    c.data = mlc.ConfigDict(dict(
        source="builtin",  # builtin (Python stdlib sources) | local path/glob | hub:NAME[:CONFIG]
        text_field="text",  # column holding the text in JSONL/Parquet/hub data
        val_fraction=0.02,  # share of documents held out for validation (by text hash)
        max_documents=400 if preset == "tiny" else 0,  # 0 = all documents
        cache_dir="",  # token cache (.npy); "" = <workdir>/cache, relative = inside workdir
    ))

    # ----- tokenizer (jaxdyn.data.tokenizer.make_tokenizer) -----
    c.tokenizer = mlc.ConfigDict(dict(
        # byte | bpe (trained on the train split once, saved in <workdir>/tokenizer) |
        # checkpoint (the tokenizer stored with init.checkpoint)
        kind=_pick(preset, tiny="byte", small="bpe", qwen2_5_0_5b="checkpoint"),
        vocab_size=c.model.vocab_size,  # size of a trained BPE vocabulary (kind == "bpe")
    ))

    # ----- training (jaxdyn.train.optim, jaxdyn.model.loss) -----
    c.train = mlc.ConfigDict(dict(
        steps=_pick(preset, tiny=60, small=2000, qwen2_5_0_5b=728),  # optimizer steps
        # Global batch (sequences per optimizer step); split into grad_accum micro-batches.
        batch_size=_pick(preset, tiny=8, small=16, qwen2_5_0_5b=1024),
        seq_len=_pick(preset, tiny=64, small=256, qwen2_5_0_5b=1024),  # tokens per row
        lr=_pick(preset, tiny=3e-3, small=1e-3, qwen2_5_0_5b=1e-5),  # peak learning rate
        warmup_steps=_pick(preset, tiny=5, small=100, qwen2_5_0_5b=7),  # linear from 0
        decay="cosine",  # after warm-up: cosine | linear | constant
        min_lr_ratio=0.0,  # final lr = lr * min_lr_ratio
        weight_decay=0.01,  # AdamW decoupled decay (not on `no_decay` params)
        b1=0.9,  # Adam beta1
        b2=0.999,  # Adam beta2
        eps=1e-8,  # Adam epsilon
        clip_norm=1.0,  # global-norm clipping of trainable grads; 0 = off (the thesis: off)
        grad_accum=_pick(preset, tiny=1, small=1, qwen2_5_0_5b=32),  # micro-batches per step
        loss_chunk=1024,  # rows per chunk of the vocabulary-chunked cross-entropy
        z_loss=0.0,  # weight of the mean logsumexp² auxiliary loss
        seed=_pick(preset, tiny=0, small=0, qwen2_5_0_5b=42),  # init, LoRA and data order
        # ((regex on param path, lr multiplier), ...): first match wins, others get 1.0.
        # Paths look like `layers/attn/q/kernel`, `embed/embedding`, `lora/layers.mlp.up.kernel/a`.
        lr_groups=(),
        trainable=(),  # regexes of trainable params; () = all (others frozen, no opt state)
        no_decay=("norm", "bias", "embed/"),  # regexes exempt from weight decay
        # LoRA (Hu et al. 2021): W + (alpha/rank)·A@B on kernels named in `targets`; the base
        # weights are frozen unless `trainable` names them.
        lora=mlc.ConfigDict(dict(enabled=False, rank=16, alpha=32.0,
                                 targets=("q", "k", "v", "o", "gate", "up", "down"))),
        stop_at_step=0,  # > 0: save and exit at this step, keeping the schedule of `steps`
    ))

    # ----- evaluation, checkpoints, logging -----
    c.eval = mlc.ConfigDict(dict(
        every=_pick(preset, tiny=20, small=100),  # validate every N steps and at the end
        batches=_pick(preset, tiny=4, small=16, qwen2_5_0_5b=0),  # batches of val; 0 = all
        causal_mode=True,  # routed models: also report val_causal/* (causal routers decide)
    ))
    c.checkpoint = mlc.ConfigDict(dict(
        every=_pick(preset, tiny=30, small=500, qwen2_5_0_5b=100),  # save every N and at end
        keep=3,  # newest checkpoints kept
        async_save=True,  # write in the background while training goes on
    ))
    c.log = mlc.ConfigDict(dict(
        every=_pick(preset, tiny=5, small=10, qwen2_5_0_5b=1),  # metrics every N steps + last
        tensorboard=True,  # also write <workdir>/tensorboard (tensorboardX)
        wandb=False,  # also log to Weights & Biases when installed
        wandb_project="jaxdyn",  # W&B project name
    ))
    # Start from an imported checkpoint (`python -m conversion import HF_DIR DIR`) or a training
    # workdir: "" = from scratch. A routed model (mod/dtf) transfers a dense import.
    c.init = mlc.ConfigDict(dict(checkpoint=""))
    # Device mesh (jaxdyn/sharding.py); -1 = the remaining devices. Without -1 the first
    # data·fsdp·tensor devices are used. dcn_* > 1: a hybrid mesh over slices (TPU multi-slice)
    # or processes (elsewhere); data/fsdp/tensor are then the sizes inside one slice (ICI).
    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1,
                                 dcn_tensor=1))
    # Greedy sample printed at the end of training; max_new_tokens 0 = none.
    c.sample = mlc.ConfigDict(dict(prompt="def ", max_new_tokens=48, temperature=0.0))
    # Fail-fast switches (JAX practices §11).
    c.debug = mlc.ConfigDict(dict(
        transfer_guard=True,  # implicit host<->device copies in the step are errors
        check_finite=True,  # NonFiniteLossError on a NaN/Inf loss (checked at log/save steps)
        debug_nans=False,  # jax_debug_nans: locate the first NaN (slow)
        strict_rank_promotion=False,  # jax_numpy_rank_promotion="raise"
    ))
    return c


def get_config(preset: str = "tiny") -> mlc.ConfigDict:
    return base_config(preset)

"""Dense decoder language modelling (the baseline every routed model is compared with).

    python -m jaxdyn.train --config configs/standard.py:tiny --workdir runs/std
    python -m jaxdyn.train --config configs/standard.py:small --config.train.lr=1e-3 ...

Other experiments (`mod.py`, `dtf.py`, ...) start from `base_config(preset)` and change what
differs, so every field below is documented once.
"""

import ml_collections as mlc

PRESETS = ("tiny", "small", "qwen2.5-0.5b")

# Model shapes per preset: (family fields shared by all, then per-size overrides).
_MODELS = {
    # A few-second CPU run: 2 layers of width 64 over a byte vocabulary.
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=258, max_position_embeddings=512),
    # Minutes on a laptop CPU, a useful baseline for the routing comparison.
    "small": dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
                  intermediate_size=768, vocab_size=4096, max_position_embeddings=2048),
    # Qwen2.5-0.5B shapes (conversion spec §8); train from `init.checkpoint` of an import.
    "qwen2.5-0.5b": dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                         head_dim=64, intermediate_size=4864, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1e6, tie_embeddings=True,
                         dtype="bfloat16", remat_policy="minimal"),
}


def base_config(preset: str) -> mlc.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    c = mlc.ConfigDict()
    c.preset = preset

    # ----- model: jaxdyn.model.ModelConfig fields (conversion spec §3 explains each) -----
    c.model = mlc.ConfigDict(dict(
        family="qwen2",  # qwen2 | llama | gpt_neox
        vocab_size=258,  # raised automatically to the tokenizer's size if smaller
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, max_position_embeddings=512,
        norm_eps=1e-6, activation="silu", qkv_bias=True, o_bias=False, mlp_bias=False,
        tie_embeddings=False, parallel_residual=False,
        rope_theta=10000.0, rope_type="default", rope_factor=1.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_position=8192, rotary_pct=1.0,
        dtype="float32",  # compute dtype: float32 | bfloat16
        param_dtype="float32",  # master weights stay fp32
        scan_layers=True,  # nn.scan over layers (fast compile) or unrolled
        remat_policy="none",  # none | full | dots | minimal | offload
        attention_impl="auto",  # auto | xla | cudnn
        arch="dense",  # dense | mod | dtf
        routing=mlc.ConfigDict(),  # routing options (configs/mod.py, configs/dtf.py)
    ))
    c.model.update(_MODELS[preset])

    # ----- data: jaxdyn.data.DataConfig -----
    c.data = mlc.ConfigDict(dict(
        source="builtin",  # builtin (Python stdlib sources) | local path/glob | hub:NAME[:CONFIG]
        text_field="text",  # column holding the text in JSONL/Parquet/hub data
        val_fraction=0.02,  # documents held out for validation
        max_documents=400 if preset == "tiny" else 0,  # 0 = all documents
        cache_dir="",  # token cache (.npy); "" = <workdir>/cache
    ))

    # ----- tokenizer -----
    c.tokenizer = mlc.ConfigDict(dict(
        kind="byte" if preset == "tiny" else "bpe",  # byte | bpe (trained, saved) | checkpoint
        vocab_size=c.model.vocab_size,  # BPE size when kind == "bpe"
    ))

    # ----- training -----
    c.train = mlc.ConfigDict(dict(
        steps={"tiny": 60, "small": 2000, "qwen2.5-0.5b": 728}[preset],
        batch_size={"tiny": 8, "small": 16, "qwen2.5-0.5b": 1024}[preset],  # global batch
        seq_len={"tiny": 64, "small": 256, "qwen2.5-0.5b": 1024}[preset],
        lr={"tiny": 3e-3, "small": 1e-3, "qwen2.5-0.5b": 1e-5}[preset],
        warmup_steps={"tiny": 5, "small": 100, "qwen2.5-0.5b": 7}[preset],
        decay="cosine",  # cosine | linear | constant
        min_lr_ratio=0.0,  # final lr = lr * min_lr_ratio
        weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
        clip_norm=1.0,  # global-norm clipping; 0 = off (the DTF thesis used none)
        grad_accum=1,  # micro-batches per optimizer step (optax.MultiSteps)
        loss_chunk=1024,  # rows per chunk of the vocabulary-chunked loss
        z_loss=0.0,  # weight of the logsumexp² auxiliary
        seed=0,
        # (regex on param path, lr multiplier); first match wins; others get 1.0
        lr_groups=(),
        trainable=(),  # regexes of trainable params; empty = all
        no_decay=("norm", "bias", "embed/"),  # regexes exempt from weight decay
        lora=mlc.ConfigDict(dict(enabled=False, rank=16, alpha=32.0,
                                 targets=("q", "k", "v", "o", "gate", "up", "down"))),
    ))

    # ----- evaluation, checkpoints, logging -----
    c.eval = mlc.ConfigDict(dict(every={"tiny": 20}.get(preset, 100), batches=4))
    c.checkpoint = mlc.ConfigDict(dict(every={"tiny": 30}.get(preset, 500), keep=3,
                                       async_save=True))
    c.log = mlc.ConfigDict(dict(every={"tiny": 5}.get(preset, 10), tensorboard=True,
                                wandb=False, wandb_project="jaxdyn"))
    # Start from an imported checkpoint (`python -m conversion import HF_DIR DIR`): "" = scratch.
    c.init = mlc.ConfigDict(dict(checkpoint=""))
    # Device mesh; -1 = the remaining devices (see jaxdyn/sharding.py).
    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Sample printed at the end of training.
    c.sample = mlc.ConfigDict(dict(prompt="def ", max_new_tokens=48, temperature=0.0))
    return c


def get_config(preset: str = "tiny") -> mlc.ConfigDict:
    return base_config(preset)

"""Multi-token prediction heads (DynaMo; Tuli et al., NAACL 2024): Pythia first.

    python -m jaxdyn.train --config configs/mtp.py:tiny --workdir runs/mtp
    python -m jaxdyn.train --config configs/mtp.py:pythia-70m \
        --config.init.checkpoint=imports/pythia-70m --workdir runs/mtp-70m

The stem (layers 0..L-2) and head 1 (layer L-1 + final norm + unembedding) come from the dense
model; heads 2..n are one new decoder layer + norm each (`jaxdyn.multitoken.heads`). Learning rates
LR_B : LR_M : LR_MB = 1 : 100 : 0.1: `train.lr` is LR_B, `train.lr_groups` gives the new heads
100x, and `mtp.stem_grad_scale` scales the heads' gradient into the stem (`grad_scale`).
Presets: `tiny` (CPU, from scratch, GPT-NeoX D=64 L=4), `small`, `pythia-70m` (the paper's
77M-T3 recipe on an imported Pythia-70M). Other fields are documented in configs/standard.py.
"""

from configs.standard import base_config

PRESETS = ("tiny", "small", "pythia-70m")

# GPT-NeoX (Pythia) block fields shared by every preset.
_NEOX = dict(family="gpt_neox", activation="gelu", qkv_bias=True, o_bias=True, mlp_bias=True,
             rotary_pct=0.25, parallel_residual=True, norm_eps=1e-5, tie_embeddings=False)


def get_config(preset: str = "tiny"):
    c = base_config("small" if preset == "pythia-70m" else preset)
    c.preset = preset
    c.model.update(_NEOX)
    if preset == "tiny":
        c.model.update(num_layers=4, num_kv_heads=4, intermediate_size=256)
    elif preset == "small":
        c.model.update(num_kv_heads=8, intermediate_size=1024)
    else:  # Pythia-70M shapes; vocab 50304 (padded GPT-NeoX tokenizer)
        c.model.update(hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=8, head_dim=64,
                       intermediate_size=2048, vocab_size=50304, max_position_embeddings=2048,
                       rope_theta=10000.0)
        c.tokenizer.kind = "checkpoint"  # the tokenizer stored with init.checkpoint
        c.train.update(lr=1e-5, batch_size=64, seq_len=2048, steps=75782, warmup_steps=758,
                       eps=1e-8, min_lr_ratio=0.0)
        c.eval.every = 5000
    # ----- multi-token heads (jaxdyn.multitoken.objective.mtp_loss / jaxdyn.multitoken.heads.MultiTokenLM) -----
    c.mtp = dict(
        n_heads=3,  # n: head i predicts x_{t+i} ("T3")
        head_depth=1,  # decoder layers per extra head (ablation: 2)
        init_from_last_layer=False,  # ablation "C": heads 2..n start as copies of layer L-1
        stem_grad_scale=0.1,  # LR_MB / LR_B: heads' gradient into the stem
        unembed_grad_scale=0.1,  # (ours) heads 2..n's gradient into the shared unembedding
        weights=(),  # per-head loss weights w_i; () = all 1 (the paper gives none)
    )
    # LR_M = 100 LR_B for every parameter of heads 2..n (first match wins, others 1.0). The
    # ratio is the paper's for fine-tuning a pretrained model (pythia-70m); the from-scratch
    # presets train everything at one LR (100 x 3e-3 diverges within 30 steps).
    c.train.lr_groups = (("^heads/", 100.0 if preset == "pythia-70m" else 1.0),)
    c.train.update(weight_decay=0.0, b1=0.9, b2=0.95)  # paper AdamW; decay unstated (ours: 0)
    # DynaMo sampling defaults (`python -m jaxdyn.generate --mode multitoken`; spec §4).
    c.dynamo = dict(top_k=50, temperature=0.7, repetition_penalty=1.1, alpha_c=1.0,
                    threshold=0.5, adaptive=True, blur=True, cooccur_dir="")
    return c

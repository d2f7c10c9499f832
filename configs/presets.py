"""The preset table: one entry per name, used by every experiment config and by the bench.

A preset name means one model shape everywhere (`configs/<exp>.py:tiny` and
`python -m jaxdyn.bench --preset tiny` build the same D, L, N, Hd, F); it also carries the run
sizes that go with that shape (steps, batch, logging) and the bench workload. Shapes are
family-independent; an experiment picks the family (GPT-NeoX has no GQA, so configs/mtp.py
sets K = N). Every field is documented where its default is written: the dataclasses of
`jaxdyn.train.schema` (and `jaxdyn.model.ModelConfig`, `jaxdyn.data.DataConfig`).
"""

import ml_collections as mlc

from jaxdyn.train import schema


def shape(D: int, L: int, N: int, K: int, Hd: int, F: int, V: int, P: int, **more) -> dict:
    """A `model` block: width D, layers L, query/KV heads N/K, head dim Hd, MLP width F,
    vocabulary V and context P (plus any other ModelConfig fields)."""
    return dict(hidden_size=D, num_layers=L, num_heads=N, num_kv_heads=K, head_dim=Hd,
                intermediate_size=F, vocab_size=V, max_position_embeddings=P, **more)


def run(steps: int, batch: int, seq: int, lr: float, warmup: int, every: tuple[int, int, int],
        eval_batches: int, **more) -> dict:
    """The run sizes: train steps/batch/seq_len/lr/warm-up, (eval, checkpoint, log) every."""
    return dict(train=dict(steps=steps, batch_size=batch, seq_len=seq, lr=lr,
                           warmup_steps=warmup, **more),
                eval=dict(every=every[0], batches=eval_batches),
                checkpoint=dict(every=every[1]), log=dict(every=every[2]))


def bench(batch: int, seq: int, prompt: int, new: int, repeats: int) -> dict:
    """The bench workload: rows and length of train/forward, batch-1 decode prompt/new tokens."""
    return dict(bench=dict(batch=batch, seq_len=seq, prompt_len=prompt, new_tokens=new,
                           repeats=repeats))


QWEN = dict(family="qwen2", qkv_bias=True, tie_embeddings=True, rope_theta=1e6,
            dtype="bfloat16", remat_policy="minimal", norm_eps=1e-6)
CHECKPOINT_TOKENIZER = dict(tokenizer=dict(kind="checkpoint"))

PRESETS: dict[str, dict] = {
    # Seconds on a CPU: tests, CI and the quickstart. Byte vocabulary (256 bytes + EOS + pad).
    "tiny": dict(model=shape(64, 4, 4, 2, 16, 128, 258, 512), data=dict(max_documents=400),
                 tokenizer=dict(kind="byte", vocab_size=258),
                 **run(60, 8, 64, 3e-3, 5, (20, 30, 5), 4), **bench(2, 64, 8, 16, 2)),
    # The temporal study's backbone (configs/temporal.py:mini): minutes on 2 CPU cores.
    "mini": dict(model=shape(64, 2, 4, 2, 16, 192, 1664, 128),
                 **run(1500, 16, 56, 3e-3, 150, (500, 500, 100), 4)),
    # A CPU-hours model; the shape the CPU speed targets refer to (trained BPE, 8k vocab).
    "small": dict(model=shape(384, 8, 6, 2, 64, 1024, 8192, 2048), data=dict(max_documents=0),
                  tokenizer=dict(kind="bpe", vocab_size=8192),
                  **run(2000, 16, 256, 1e-3, 100, (100, 500, 10), 16), **bench(8, 256, 32, 64, 3)),
    # Qwen2.5-0.5B: meant to start from `init.checkpoint` of an import (the thesis setting).
    "qwen2.5-0.5b": dict(model=shape(896, 24, 14, 2, 64, 4864, 151936, 32768, **QWEN),
                         **CHECKPOINT_TOKENIZER,
                         **run(728, 1024, 1024, 1e-5, 7, (100, 100, 1), 0, grad_accum=32,
                               seed=42), **bench(8, 2048, 128, 128, 5)),
    "qwen2.5-1.5b": dict(model=shape(1536, 28, 12, 2, 128, 8960, 151936, 32768, **QWEN),
                         **CHECKPOINT_TOKENIZER, **bench(4, 2048, 128, 128, 5)),
    # Pythia-70M (GPT-NeoX; vocabulary 50304 = the padded GPT-NeoX tokenizer).
    "pythia-70m": dict(model=shape(512, 6, 8, 8, 64, 2048, 50304, 2048), **CHECKPOINT_TOKENIZER,
                       **run(75782, 64, 2048, 1e-5, 758, (5000, 1000, 10), 16)),
}


# ----- data recipes: the papers' training data as `data` blocks (docs/data.md#recipes) -----
# The DTF thesis: seven sets, each entering with a ratio of itself (`sample` keeps that hash-
# chosen fraction of its documents), 2 % of each held out, mixed as if concatenated and
# shuffled (`mixing="tokens"`). Hub names are today's homes of the datasets the thesis names.
THESIS_SOURCES = (
    {"source": "hub:Salesforce/wikitext:wikitext-103-raw-v1", "text_field": "text",
     "sample": 1.0},
    {"source": "hub:abisee/cnn_dailymail:3.0.0", "text_field": "article", "sample": 0.2},
    {"source": "hub:storytracer/US-PD-Books", "text_field": "text", "sample": 0.5},
    {"source": "hub:HuggingFaceTB/cosmopedia:openstax", "text_field": "text", "sample": 0.1},
    {"source": "hub:allenai/sciq", "text_field": "support", "sample": 1.0},
    {"source": "hub:codeparrot/codeparrot-clean-valid", "text_field": "content",
     "sample": 1.0},
    {"source": "hub:roneneldan/TinyStories", "text_field": "text", "sample": 1.0},
)
THESIS_DATA = dict(sources=THESIS_SOURCES, mixing="tokens", val_fraction=0.02)
# DynaMo (Tuli et al., 2024): a 5 % random sample of the Pile, 97/3 train/validation. The
# original Pile is no longer distributed; the default source is its public copy without the
# copyrighted subsets (point `data.sources[0].source` at a full copy to match the paper).
PILE_SOURCE = "hub:monology/pile-uncopyrighted"
DYNAMO_DATA = dict(sources=({"source": PILE_SOURCE, "text_field": "text", "sample": 0.05},),
                   val_fraction=0.03)


def base_config(preset: str, *features: str) -> mlc.ConfigDict:
    """The schema's defaults (plus the named feature blocks) with the preset's values."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    c = schema.defaults(*features)
    c.preset = preset
    for block, values in PRESETS[preset].items():
        if block != "bench":
            c[block].update(values)
    return c

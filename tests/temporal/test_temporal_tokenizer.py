"""Temporal text through an imported backbone's own tokenizer (issue #20, part 3).

A tiny random Hugging Face Qwen2 with a small byte-level BPE `tokenizer.json` (trained here on
TCG-Synth text) is imported with `python -m conversion import`; prompts, answers and node
names of the temporal batches must be that tokenizer's ids, a training step must run on it,
and every backbone/tokenizer mismatch must be refused before anything is trained.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from conversion.__main__ import main as convert
from jaxdyn.checkpoint import load_model
from jaxdyn.data.tokenizer import load_tokenizer
from jaxdyn.temporal.batching import answer_text, encode, pretrain_arrays, prompt_text
from jaxdyn.temporal.generate import generate_conditioned, load_temporal, save_temporal
from jaxdyn.temporal.objective import load_records
from jaxdyn.temporal.synth import SynthConfig
from jaxdyn.temporal.tokenizer import tokenizer as syllable
from jaxdyn.temporal.tokens import TokenizerMismatchError
from jaxdyn.train import make_objective, schema, train_and_evaluate

EOS = "<|endoftext|>"
ROWS = 512  # embedding rows of the tiny Qwen2


def bpe(texts: list[str], vocab_size: int = 400, extra: int = 0) -> HFTok:
    """A byte-level BPE like Qwen's (no prefix space), `extra` added tokens on top."""
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([f"<extra_{i}>" for i in range(extra)])
    return tok


def write_tokenizer(tok: HFTok, folder) -> None:
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast"}, f)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(records, HF folder, imported folder, reference HF tokenizer, the text tokenizer)."""
    base = schema.load("configs/temporal.py:tiny")
    recs = load_records(SynthConfig(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in base.synth.items()}))
    texts = [t for r in recs["train"] for t in (prompt_text(r), answer_text(r["answer"]))]
    texts += [" " + n["name"] for r in recs["train"] for n in r["graph"]["nodes"]]
    root = tmp_path_factory.mktemp("qwen")
    hf_dir, imp = root / "hf", root / "imp"
    torch.manual_seed(0)
    hcfg = AutoConfig.for_model("qwen2", vocab_size=ROWS, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=64, max_position_embeddings=128,
                                tie_word_embeddings=True, rope_theta=1e6)
    AutoModelForCausalLM.from_config(hcfg, dtype=torch.float32).save_pretrained(hf_dir)
    tok = bpe(texts)
    write_tokenizer(tok, hf_dir)
    assert convert(["import", str(hf_dir), str(imp)]) == 0
    assert os.path.exists(imp / "tokenizer.json")
    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    return recs, hf_dir, imp, ref, texts


def config(imp, kind: str = "checkpoint", checkpoint=None, extra=()):
    """configs/temporal.py:tiny on the imported backbone (its model fields), one train step."""
    with open(os.path.join(imp, "model_config.json")) as f:
        model = json.load(f)
    over = [f"--config.model.{k}={v}" for k, v in model.items() if k != "routing"]
    over += [f"--config.tokenizer.kind={kind}",
             f"--config.init.checkpoint={imp if checkpoint is None else checkpoint}",
             "--config.train.steps=1", "--config.train.batch_size=4", "--config.mesh.data=1",
             "--config.eval.batches=1", "--config.sample.max_new_tokens=0",
             "--config.log.tensorboard=false", "--config.shapes.ans_len=10", *extra]
    return schema.load("configs/temporal.py:tiny", over)


def test_batches_are_the_backbone_tokenizers_ids(world):
    recs, _, imp, ref, _ = world
    objective = make_objective(config(imp))
    sh = objective.shapes
    assert objective.tok.kind == "hf"
    assert objective.tok.fingerprint() == load_tokenizer(str(imp)).fingerprint()
    rows = recs["validation"][:8]
    arr = objective.examples(rows)  # what the trainer batches
    np.testing.assert_array_equal(arr["tokens"], encode(rows, sh, tok=objective.tok)["tokens"])
    ids = lambda text: ref.encode(text, add_special_tokens=False)
    for i, r in enumerate(rows):
        p, a = ids(prompt_text(r)), ids(answer_text(r["answer"]))
        assert p != syllable().encode(prompt_text(r))  # not the syllable ids
        assert list(arr["tokens"][i, :len(p) + len(a)]) == p + a
        assert not arr["tokens"][i, len(p) + len(a):].any()
        assert list(arr["ans_tok"][i, :len(a)]) == a and arr["ans_mask"][i].sum() == len(a)
        for k, node in enumerate(r["graph"]["nodes"]):
            name = ids(" " + node["name"])[:sh.name_len]
            assert list(arr["n_tokens"][i, k, :len(name)]) == name
            assert arr["n_tok_mask"][i, k].sum() == len(name)
    pairs = [(prompt_text(r), answer_text(r["answer"])) for r in rows]
    pre = pretrain_arrays(pairs, sh.seq_len, 0.1, objective.tok)
    for i, (p, a) in enumerate(pairs):
        n_p, n = len(ids(p)), len(ids(p)) + len(ids(a))
        assert list(pre["tokens"][i, :n]) == ids(p) + ids(a)
        assert (pre["weights"][i, n_p:n] == 1).all() and (pre["weights"][i, 1:n_p] == 0.1).all()


def test_training_step_and_checkpoint_keep_the_tokenizer(world, tmp_path):
    recs, hf_dir, imp, ref, _ = world
    workdir = str(tmp_path / "run")
    metrics = train_and_evaluate(config(imp), workdir)
    assert np.isfinite(metrics["train/loss"])
    model = load_temporal(workdir)  # reads the tokenizer the run saved in tokenizer/
    assert model.tok.fingerprint() == load_tokenizer(str(imp)).fingerprint()
    rec = recs["validation"][0]
    out = generate_conditioned(model, prompt_text(rec), rec["time"], rec, max_new_tokens=2)
    assert isinstance(out, str)
    # a model folder records the tokenizer's kind and fingerprint and stores its files
    folder = str(tmp_path / "folder")
    save_temporal(folder, model.cfg, model.tcfg, model.shapes, model.params, model.tok)
    with open(os.path.join(folder, "temporal_config.json")) as f:
        meta = json.load(f)
    assert meta["tokenizer"] == "hf" and meta["tokenizer_fingerprint"] == model.tok.fingerprint()
    again = load_temporal(folder)
    assert again.tok.encode(prompt_text(rec)) == ref.encode(prompt_text(rec),
                                                            add_special_tokens=False)
    # loading checks it: another tokenizer in its place is refused
    write_tokenizer(bpe(["Who leads Vornex?"], 300), folder)
    with pytest.raises(TokenizerMismatchError, match="records a 'hf' tokenizer"):
        load_temporal(folder)
    os.remove(os.path.join(folder, "tokenizer.json"))
    os.remove(os.path.join(folder, "jaxdyn_tokenizer.json"))
    with pytest.raises(TokenizerMismatchError, match="not stored"):
        load_temporal(folder)


def test_mismatches_are_refused_before_training(world, tmp_path):
    _, _, imp, _, texts = world
    # the syllable tokenizer on an imported backbone: refused before the workdir is written
    workdir = tmp_path / "run"
    with pytest.raises(TokenizerMismatchError,
                       match=r"tokenizer.kind='tcg_syllable' does not match.*"
                             r"--config.tokenizer.kind=checkpoint"):
        train_and_evaluate(config(imp, "tcg_syllable"), str(workdir))
    assert not os.path.exists(workdir / "config.json")
    # a tokenizer with more ids than the backbone has embedding rows
    big = tmp_path / "big"
    shutil.copytree(imp, big)
    write_tokenizer(bpe(texts, extra=ROWS), big)
    with pytest.raises(TokenizerMismatchError, match=f"only {ROWS} embedding rows"):
        make_objective(config(big))
    # a checkpoint folder without its tokenizer.json
    bare = tmp_path / "bare"
    shutil.copytree(imp, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(bare / name)
    with pytest.raises(TokenizerMismatchError, match="tokenizer.json is missing"):
        make_objective(config(bare))
    with pytest.raises(TokenizerMismatchError, match="comes with no tokenizer"):
        make_objective(config(bare, "tcg_syllable"))
    # a tokenizer kind that cannot encode TCG-Synth text
    with pytest.raises(TokenizerMismatchError, match="cannot encode TCG-Synth"):
        make_objective(config(imp, "bpe", checkpoint=""))
    assert load_model(str(imp))[0].vocab_size == ROWS  # the folders above were copies

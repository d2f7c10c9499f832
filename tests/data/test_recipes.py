"""The papers' data recipes (configs/presets.py THESIS_DATA, DYNAMO_DATA) are what the presets
that claim them train on, and they run end to end on local stand-ins with the same fields."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxdyn.data import DataConfig, grain_train_iterator, prepared_folders
from jaxdyn.data.prepare import read_manifest
from jaxdyn.data.tokenizer import byte_tokenizer
from jaxdyn.train import schema

# The thesis's seven sets: (dataset, config or "", text column, ratio of the set).
THESIS = [("Salesforce/wikitext", "wikitext-103-raw-v1", "text", 1.0),
          ("abisee/cnn_dailymail", "3.0.0", "article", 0.2),
          ("storytracer/US-PD-Books", "", "text", 0.5),
          ("HuggingFaceTB/cosmopedia", "openstax", "text", 0.1),
          ("allenai/sciq", "", "support", 1.0),
          ("codeparrot/codeparrot-clean-valid", "", "content", 1.0),
          ("roneneldan/TinyStories", "", "text", 1.0)]


@pytest.mark.parametrize("exp", ["dtf", "mod", "standard"])
def test_thesis_presets_train_on_the_thesis_mix(exp):
    cfg = schema.load(f"configs/{exp}.py:qwen2.5-0.5b")
    data = schema.check(cfg)["data"]
    got = [(e.source, e.text_field, e.sample, e.weight) for e in data.entries()]
    want = [(f"hub:{n}" + (f":{c}" if c else ""), f, r, 1.0) for n, c, f, r in THESIS]
    assert got == want
    assert (data.mixing, data.val_fraction) == ("tokens", 0.02)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed) == \
        (728, 1024, 1024, 42)
    assert cfg.train.clip_norm == 0.0


def test_dynamo_preset_trains_on_a_five_percent_pile_sample():
    data = schema.check(schema.load("configs/mtp.py:pythia-70m"))["data"]
    (src,) = data.entries()
    assert src.source.startswith("hub:") and "pile" in src.source.lower()
    assert (src.text_field, src.sample, data.val_fraction) == ("text", 0.05, 0.03)


def test_from_scratch_presets_name_no_paper_data():
    for exp in ("dtf", "mod", "mtp"):
        data = schema.check(schema.load(f"configs/{exp}.py:tiny"))["data"]
        assert [e.source for e in data.entries()] == ["builtin"]


def test_thesis_mix_runs_on_local_stand_ins(tmp_path):
    """Each hub set replaced by a JSON-lines file with the same text column: prepared with
    its ratio as `sample`, mixed by tokens, read by the grain pipeline."""
    cfg = schema.load("configs/dtf.py:qwen2.5-0.5b")
    rng = np.random.default_rng(0)
    stand_ins, sizes = [], []
    for i, entry in enumerate(cfg.data.sources):
        path = tmp_path / f"set{i}.jsonl"
        n = 400
        path.write_text("".join(
            json.dumps({entry["text_field"]: f"set {i} doc {j} " * int(rng.integers(2, 9)),
                        "other": "x"}) + "\n" for j in range(n)))
        stand_ins.append({**entry, "source": str(path)})
        sizes.append(n)
    dc = DataConfig(**{**cfg.data.to_dict(), "sources": tuple(stand_ins),
                       "cache_dir": str(tmp_path / "cache"), "shards": 2})
    tok = byte_tokenizer()
    folders = prepared_folders(dc, tok)
    kept = np.array([sum(read_manifest(f)["documents"].values()) for f in folders], float)
    ratios = np.array([e["sample"] for e in cfg.data.sources])
    assert np.all(np.abs(kept / np.array(sizes) - ratios) < 0.06), kept / np.array(sizes)
    it = grain_train_iterator(dc, tok, seq_len=64, batch_size=8, seed=42)
    batch = next(it)
    assert batch["tokens"].shape == (8, 64)
    tokens = np.array([read_manifest(f)["tokens"]["train"] for f in folders], float)
    assert np.allclose(np.array(it.weights) / sum(it.weights), tokens / tokens.sum())

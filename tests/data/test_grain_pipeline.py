"""Prepared shards and the grain pipeline: the prepare command, resumable and parallel writing,
per-host shards, packing equal to the in-memory packer, exact resume, mixtures, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxdyn.data import (
    DataConfig,
    DataConfigError,
    GrainTextIterator,
    PreparedDocs,
    SourceSpec,
    grain_train_iterator,
    make_eval_batches,
    make_train_iterator,
    prepare,
    prepared_eval_batches,
    prepared_folders,
    text_data,
)
from jaxdyn.data.prepare import read_manifest
from jaxdyn.data.tokenizer import byte_tokenizer, make_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOK = byte_tokenizer()


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def builtin40(tmp_path_factory) -> str:
    """The builtin corpus (40 documents) prepared into 4 shards per split."""
    out = str(tmp_path_factory.mktemp("prep") / "builtin40")
    prepare(SourceSpec(max_documents=40), TOK, out, shards=4)
    return out


def test_manifest_and_shards(builtin40):
    m = read_manifest(builtin40)
    assert m["tokenizer"]["fingerprint"] == TOK.fingerprint() and m["dtype"] == "<u2"
    assert m["source"]["source"] == "builtin" and m["split_rule"]["val_fraction"] == 0.02
    train = m["shards"]["train"]
    assert [s["file"] for s in train] == [f"train-0000{i}-of-00004.array_record"
                                          for i in range(4)]
    assert sum(s["docs"] for s in train) == m["documents"]["train"] >= 35
    docs = PreparedDocs(builtin40, "train")
    assert len(docs) == m["documents"]["train"] and docs.lengths.sum() == m["tokens"]["train"]
    # document i of the source order holds [ids..., EOS] of the i-th training text
    from jaxdyn.data import load_documents

    texts = load_documents(DataConfig(max_documents=40), "train")
    for i in (0, 5, len(texts) - 1):
        assert docs.read(i).tolist() == TOK.encode(texts[i]) + [TOK.eos_id]


def test_prepare_resumes_shard_by_shard_and_writers_split_the_work(builtin40, tmp_path):
    out = tmp_path / "p"
    spec = SourceSpec(max_documents=40)
    # two writers: the first alone leaves the manifest to the last one
    assert prepare(spec, TOK, str(out), shards=4, process_index=0, process_count=2) is None
    assert not (out / "manifest.json").exists()
    assert prepare(spec, TOK, str(out), shards=4, process_index=1, process_count=2)
    for f in sorted(os.listdir(builtin40)):
        if f.endswith(".array_record") or f.endswith(".npy"):
            assert (out / f).read_bytes() == (Path(builtin40) / f).read_bytes(), f
    # an interrupted run: one shard lost its completion marker; only it is written again
    name = "train-00002-of-00004.array_record"
    (out / "manifest.json").unlink()
    (out / (name + ".json")).unlink()
    before = {f: (out / f).stat().st_mtime_ns for f in os.listdir(out)
              if not f.startswith(name)}
    prepare(spec, TOK, str(out), shards=4)
    assert (out / (name + ".json")).exists() and (out / "manifest.json").exists()
    assert all((out / f).stat().st_mtime_ns == t for f, t in before.items()
               if f.endswith(".array_record") or f.endswith(".npy"))
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    with pytest.raises(DataConfigError, match="another preparation"):
        prepare(spec, TOK, str(out), shards=8)


def test_grain_batches_equal_the_in_memory_packer_per_process(builtin40):
    for p in range(2):
        it = GrainTextIterator([PreparedDocs(builtin40, "train", shard_index=p, shard_count=2)],
                               [1.0], seq_len=32, batch_size=3, seed=4, pad_id=TOK.pad_id,
                               process_index=p, process_count=2)
        assert [os.path.basename(f)[:11] for f in it.shard_files] == \
            [f"train-0000{s}" for s in range(p, 4, 2)]
        old = make_train_iterator(DataConfig(max_documents=40), TOK, seq_len=32, batch_size=3,
                                  seed=4, process_index=p, process_count=2)
        for _ in range(40):  # several epochs of this small corpus
            assert same(next(it), next(old))
    evals = prepared_eval_batches([builtin40], TOK, seq_len=32, batch_size=4, max_batches=0)
    ref = make_eval_batches(DataConfig(max_documents=40), TOK, seq_len=32, batch_size=4,
                            max_batches=0)
    assert len(evals) == len(ref) and all(same(a, b) for a, b in zip(evals, ref, strict=True))


@pytest.mark.parametrize("threads,workers", [
    (0, 0), (2, 0), pytest.param(1, 2, marks=pytest.mark.slow, id="worker-processes")])
def test_state_is_json_and_resume_is_exact(builtin40, threads, workers):
    make = lambda: GrainTextIterator([PreparedDocs(builtin40, "train")], [1.0], seq_len=16,
                                     batch_size=2, seed=1, pad_id=TOK.pad_id,
                                     threads=threads, workers=workers)
    a = make()
    for _ in range(7):
        next(a)
    state = json.loads(json.dumps(a.state()))
    want = [next(a) for _ in range(5)]
    b = make()
    assert b.restore(state) == []
    assert all(same(x, next(b)) for x in want)
    a.close()
    b.close()
    bad = {**state, "seed": 2}
    with pytest.raises(ValueError, match="seed"):
        make().restore(bad)
    if workers:  # worker processes deliver the batches the threads do
        ref = GrainTextIterator([PreparedDocs(builtin40, "train")], [1.0], seq_len=16,
                                batch_size=2, seed=1, pad_id=TOK.pad_id)
        assert all(same(x, y) for x, y in zip([next(ref) for _ in range(12)][7:], want,
                                              strict=True))


def test_mixture_proportions_follow_weights(builtin40, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": f"document {i} " * (i % 7 + 1)}) + "\n"
                             for i in range(50)))
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), shards=2,
                     sources=({"source": builtin40, "weight": 0.7},
                              {"source": str(other), "weight": 0.3}))
    it = grain_train_iterator(cfg, TOK, seq_len=32, batch_size=10, seed=0)
    for _ in range(100):
        next(it)
    share = it.source_rows / it.source_rows.sum()
    assert abs(share[0] - 0.7) < 0.02 and abs(share[1] - 0.3) < 0.02, share
    state = json.loads(json.dumps(it.state()))
    want = [next(it) for _ in range(3)]
    again = grain_train_iterator(cfg, TOK, seq_len=32, batch_size=10, seed=0)
    again.restore(state)
    assert all(same(x, next(again)) for x in want)


def test_token_mixing_draws_as_if_the_sources_were_concatenated(builtin40, tmp_path):
    """mixing="tokens": a source's share of rows is weight × its training tokens (normalised):
    the thesis's "take ratio r of each set, concatenate, shuffle"."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"row {i} " * 40}) + "\n" for i in range(30)))
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), shards=2, mixing="tokens",
                     sources=({"source": builtin40, "weight": 1.0},
                              {"source": str(small), "weight": 0.5}))
    folders = prepared_folders(cfg, TOK)
    tokens = np.array([read_manifest(f)["tokens"]["train"] for f in folders], float)
    want = tokens * [1.0, 0.5] / (tokens * [1.0, 0.5]).sum()
    it = grain_train_iterator(cfg, TOK, seq_len=32, batch_size=10, seed=0)
    assert np.allclose(np.array(it.weights) / sum(it.weights), want)
    for _ in range(150):
        next(it)
    share = it.source_rows / it.source_rows.sum()
    assert np.abs(share - want).max() < 0.03, (share, want)
    with pytest.raises(DataConfigError, match="mixing"):
        DataConfig(mixing="size")


def test_sample_keeps_a_hash_chosen_fraction_independent_of_the_split(tmp_path):
    from jaxdyn.data.sources import doc_key, sample_key

    src = tmp_path / "docs.jsonl"
    texts = [f"document number {i} " * (1 + i % 5) for i in range(2000)]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    m = prepare(SourceSpec(str(src), sample=0.25), TOK, str(tmp_path / "s25"),
                val_fraction=0.1, shards=2)
    kept = [t for t in texts if sample_key(t) < 0.25]
    assert m["documents"]["train"] + m["documents"]["validation"] == len(kept)
    assert 0.21 < len(kept) / len(texts) < 0.29
    # The kept subset's validation share is still ≈ val_fraction (salted, independent keys).
    assert m["documents"]["validation"] == sum(doc_key(t) < 0.1 for t in kept)
    assert 0.06 < m["documents"]["validation"] / len(kept) < 0.14
    full = prepare(SourceSpec(str(src)), TOK, str(tmp_path / "all"), val_fraction=0.1,
                   shards=2)
    assert full["documents"]["train"] + full["documents"]["validation"] == len(texts)
    with pytest.raises(DataConfigError, match="sample"):
        SourceSpec(str(src), sample=0.0)
    with pytest.raises(DataConfigError, match="prepared folder"):
        prepared_folders(DataConfig(sources=({"source": str(tmp_path / "all"),
                                              "sample": 0.5},)), TOK)


def test_config_sources_through_the_schema(tmp_path):
    from jaxdyn.train import schema

    cfg = schema.load("configs/standard.py:tiny", [
        "--config.data.sources=({'source': 'builtin', 'weight': 2.0, 'max_documents': 30},"
        " {'source': 'builtin', 'weight': 1.0, 'max_documents': 20})"])
    blocks = schema.check(cfg)
    assert [s.weight for s in blocks["data"].entries()] == [2.0, 1.0]
    assert json.loads(cfg.to_json_best_effort())["data"]["sources"][0]["source"] == "builtin"
    with pytest.raises(DataConfigError, match="unknown key"):
        DataConfig(sources=({"src": "builtin"},))
    with pytest.raises(DataConfigError, match="weight"):
        DataConfig(sources=({"source": "builtin", "weight": 0},))
    with pytest.raises(DataConfigError, match="shards"):
        DataConfig(shards=0)


def test_text_data_prepares_into_the_cache_once(tmp_path):
    from jaxdyn.train import schema

    cfg = schema.finalize(schema.load("configs/standard.py:tiny", [
        "--config.data.max_documents=30", "--config.train.seq_len=32",
        f"--config.data.cache_dir={tmp_path / 'cache'}"]))
    it, evals = text_data(cfg, TOK, rows=4)
    (folder,) = prepared_folders(DataConfig(**cfg.data.to_dict()), TOK)
    assert folder.startswith(str(tmp_path / "cache" / "prepared"))
    assert evals and next(it)["tokens"].shape == (4, 32)
    stamp = (Path(folder) / "manifest.json").stat().st_mtime_ns
    text_data(cfg, TOK, rows=4)
    assert (Path(folder) / "manifest.json").stat().st_mtime_ns == stamp  # not prepared again


def test_clear_errors(builtin40, tmp_path):
    with pytest.raises(DataConfigError, match="at least one shard per process"):
        PreparedDocs(builtin40, "train", shard_index=0, shard_count=8)
    with pytest.raises(DataConfigError, match="another tokenizer"):
        prepared_folders(DataConfig(source=builtin40), make_tokenizer("ids", directory="",
                                                                      vocab_size=10))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        PreparedDocs(str(tmp_path), "train")
    with pytest.raises(DataConfigError, match="each writer needs a shard"):
        prepare(SourceSpec(), TOK, str(tmp_path / "x"), shards=2, process_count=3)


def test_validation_falls_back_to_the_lowest_key_training_document(tmp_path):
    src = tmp_path / "few.jsonl"
    src.write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(3)))
    out = str(tmp_path / "p")
    with pytest.warns(UserWarning, match="validation reuses"):
        m = prepare(SourceSpec(str(src)), TOK, out, shards=2, val_fraction=0.01)
    assert m["documents"] == {"train": 3, "validation": 0} and "validation_fallback" in m
    val = PreparedDocs(out, "validation")
    assert len(val) == 1 and TOK.decode(val.read(0)).startswith("text number")


def test_prepare_command(tmp_path):
    from jaxdyn.cli.data import main

    main(["--out", str(tmp_path / "c"), "--max_documents", "12", "--shards", "2"])
    assert read_manifest(str(tmp_path / "c"))["documents"]["train"] >= 10


@pytest.mark.slow
def test_prepare_module_with_worker_processes(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxdyn.data.prepare", "--out",
                          str(tmp_path / "w"), "--max_documents", "20", "--shards", "4",
                          "--workers", "2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["complete"]
    bad = subprocess.run([sys.executable, "-m", "jaxdyn.data.prepare", "--out",
                          str(tmp_path / "w"), "--source", str(tmp_path / "none.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")


@pytest.mark.slow
def test_two_processes_each_read_only_their_own_shards(tmp_path):
    """`launch/local.sh 2`: each process prepares its own shards of the builtin corpus into a
    shared cache, then opens only those; its batches are those of process i of 2."""
    cache = str(tmp_path / "cache")
    env = {**os.environ, "JAXDYN_MODULE": "tests.data.shard_probe", "PYTHON": sys.executable,
           "JAXDYN_CPU_DEVICES": "1", "XLA_FLAGS": ""}
    out = subprocess.run(["bash", str(ROOT / "launch/local.sh"), "2", cache], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {r["process"]: r for r in (json.loads(line.split("] ", 1)[1])
                                      for line in out.stdout.splitlines()
                                      if line.split("] ", 1)[-1].startswith("{"))}
    assert sorted(rows) == [0, 1]
    for p, r in rows.items():
        assert r["shards"] == [f"train-0000{s}-of-00004.array_record" for s in range(p, 4, 2)]
        ref = grain_train_iterator(DataConfig(max_documents=40, cache_dir=cache, shards=4), TOK,
                                   seq_len=32, batch_size=2, seed=0, process_index=p,
                                   process_count=2)
        assert np.array_equal(next(ref)["tokens"], np.asarray(r["tokens"]))


def test_hub_sources_are_streamed(tmp_path, monkeypatch):
    """`hub:NAME` goes through `datasets.load_dataset(..., streaming=True)` (a local folder
    stands in for the hub here: no network in tests)."""
    import datasets

    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "train.jsonl").write_text(
        "".join(json.dumps({"body": f"row {i} " * 5}) + "\n" for i in range(30)))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # jaxdyn's own offline refusal
        monkeypatch.delenv(var, raising=False)
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    m = prepare(SourceSpec(f"hub:{tmp_path / 'hub'}", text_field="body", max_documents=20),
                TOK, str(tmp_path / "p"), shards=2, val_fraction=0.3)
    assert calls and all(kw.get("streaming") is True for kw in calls)
    assert sum(m["documents"].values()) == 20


def test_a_state_of_the_in_memory_packer_continues_at_its_row(builtin40):
    """Checkpoints written before this pipeline hold PackedIterator states (version 2)."""
    old = make_train_iterator(DataConfig(max_documents=40), TOK, seq_len=32, batch_size=3,
                              seed=2)
    for _ in range(9):
        next(old)
    it = GrainTextIterator([PreparedDocs(builtin40, "train")], [1.0], seq_len=32,
                           batch_size=3, seed=2, pad_id=TOK.pad_id)
    assert it.restore(json.loads(json.dumps(old.state())))
    assert all(same(next(it), next(old)) for _ in range(4))

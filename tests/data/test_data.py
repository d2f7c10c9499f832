"""Data pipeline and tokenizers: packing, resumption, sharding, sources, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxdyn.data import (
    DataConfig,
    DataConfigError,
    DataSourceNotFoundError,
    EmptyDatasetError,
    PackedIterator,
    UnknownSourceError,
    builtin_corpus_files,
    load_documents,
    make_eval_batches,
    make_train_iterator,
    tokenize_documents,
)
from jaxdyn.data.tokenizer import (
    TokenizerNotFoundError,
    byte_tokenizer,
    load_tokenizer,
    make_tokenizer,
    train_bpe,
)

EOS = 99


def random_docs(n: int = 23, seed: int = 0, max_len: int = 40) -> list[np.ndarray]:
    """Token docs with distinct content, each ending in EOS, some longer than a row."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        d = rng.integers(1, 90, rng.integers(1, max_len)).astype(np.int32)
        docs.append(np.concatenate([d, [EOS]]).astype(np.int32))
    return docs


def rows_of(it: PackedIterator, batches: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for _ in range(batches):
        b = next(it)
        for k in ("tokens", "positions", "segment_ids"):
            assert b[k].dtype == np.int32 and b[k].shape == (it.batch_size, it.seq_len)
        out.extend(zip(b["tokens"], b["positions"], b["segment_ids"], strict=True))
    return out


def pieces(rows, pad_id: int = 0) -> list[np.ndarray]:
    """Segments of rows in order, checking segment/position consistency on the way."""
    out = []
    for tok, pos, seg in rows:
        valid = seg > 0
        n = int(valid.sum())
        if n == 0:  # an all-padding row (end of the eval pass)
            assert (tok == pad_id).all() and (pos == 0).all()
            continue
        assert valid[:n].all() and not valid[n:].any(), "padding only at the end of a row"
        assert (tok[n:] == pad_id).all() and (pos[n:] == 0).all()
        ids = seg[:n]
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
        for s in np.unique(ids):
            m = seg == s
            assert (pos[m] == np.arange(m.sum())).all(), "positions restart per segment"
            out.append(tok[m])
    return out


def epoch_rows(it: PackedIterator):
    """Rows until the iterator reaches the next epoch (batch_size must be 1)."""
    assert it.batch_size == 1
    start = it.state()["epoch"]
    rows = []
    while it.state()["epoch"] == start:
        rows.extend(rows_of(it, 1))
    return rows


@pytest.mark.parametrize("shuffle", [False, True])
def test_packing_covers_every_token_once_in_order(shuffle):
    docs = random_docs()
    it = PackedIterator(docs, seq_len=16, batch_size=1, seed=3, shuffle=shuffle)
    for epoch in range(2):
        order = it.epoch_order(epoch)
        assert sorted(order) == list(range(len(docs)))
        rows = epoch_rows(it)
        served = it.row_order(epoch, len(rows))  # rows in packing order, then served
        assert sorted(served) == list(range(len(rows)))
        packed = [None] * len(rows)
        for r, k in zip(rows, served, strict=True):
            packed[k] = r
        got = pieces(packed)
        np.testing.assert_array_equal(np.concatenate(got), np.concatenate([docs[i] for i in
                                                                          order]))
        # every piece lies within one document: EOS only at a piece's end
        for p in got:
            assert (p[:-1] != EOS).all()
        assert sum(int(p[-1] == EOS) for p in got) == len(docs)
        # pieces are whole documents unless the document is longer than the row space left
        assert all(len(p) <= 16 for p in got)
        assert (served.tolist() != sorted(served)) == shuffle  # shuffle mixes the rows too
    assert it.epoch_order(0).tolist() != it.epoch_order(1).tolist() or not shuffle


def test_a_shuffled_batch_mixes_documents():
    """Rows of one batch come from many documents, not consecutive pieces of one."""
    docs = [np.full(400, i + 1, np.int32) for i in range(6)]  # long documents, 25 rows each
    it = PackedIterator(docs, seq_len=16, batch_size=8, seed=0)
    first = next(it)["tokens"][:, 0]
    assert len(set(first.tolist())) >= 4, first


def test_short_documents_are_not_split():
    docs = [np.full(n, i + 1, np.int32) for i, n in enumerate([5, 6, 7, 3, 12, 2])]
    it = PackedIterator(docs, seq_len=12, batch_size=1, seed=0, shuffle=False)
    segs = pieces(epoch_rows(it))
    assert [len(s) for s in segs] == [5, 6, 7, 3, 12, 2]


def test_long_document_split_into_segments():
    docs = [np.arange(1, 4, dtype=np.int32), np.arange(10, 40, dtype=np.int32)]
    it = PackedIterator(docs, seq_len=8, batch_size=1, seed=0, shuffle=False)
    rows = epoch_rows(it)
    assert [len(p) for p in pieces(rows)] == [3, 5, 8, 8, 8, 1]
    tok, pos, seg = rows[0]
    assert seg.tolist() == [1, 1, 1, 2, 2, 2, 2, 2] and pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 4]


@pytest.mark.parametrize("batches_before", [3, 11])
def test_resume_mid_epoch_and_across_epoch_boundary(batches_before):
    docs = random_docs(n=17, seed=1)
    kw = dict(seq_len=16, batch_size=4, seed=7)
    a = PackedIterator(docs, **kw)
    for _ in range(batches_before):
        next(a)
    state = json.loads(json.dumps(a.state()))
    expected = [next(a) for _ in range(12)]  # 11 + 12 batches span several epochs
    b = PackedIterator(docs, **kw)
    b.restore(state)
    for e in expected:
        got = next(b)
        for k in e:
            np.testing.assert_array_equal(got[k], e[k])
    assert a.state()["epoch"] >= 1


def test_restore_refuses_other_setup():
    docs = random_docs()
    state = PackedIterator(docs, seq_len=16, batch_size=2, seed=0).state()
    with pytest.raises(ValueError, match="seed"):
        PackedIterator(docs, seq_len=16, batch_size=2, seed=1).restore(state)


def test_processes_disjoint_and_cover_all_documents():
    docs = random_docs(n=25)
    seen = []
    for p in range(2):
        it = PackedIterator(docs, seq_len=16, batch_size=1, seed=5, process_index=p,
                            process_count=2)
        assert set(it.epoch_order(0).tolist()) == set(range(p, 25, 2))
        seen.append(np.concatenate(pieces(epoch_rows(it))))
    whole = np.concatenate(pieces(epoch_rows(PackedIterator(docs, seq_len=16, batch_size=1,
                                                            seed=5))))
    assert len(seen[0]) + len(seen[1]) == len(whole)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.sort(whole))
    with pytest.raises(EmptyDatasetError, match="process 3 of 4"):
        PackedIterator(docs[:3], seq_len=16, batch_size=1, seed=0, process_index=3,
                       process_count=4)


def test_seed_determinism():
    docs = random_docs()
    kw = dict(seq_len=16, batch_size=3)
    a, b, c = (PackedIterator(docs, seed=s, **kw) for s in (1, 1, 2))
    xs, ys, zs = ([next(i)["tokens"] for _ in range(6)] for i in (a, b, c))
    assert all((x == y).all() for x, y in zip(xs, ys, strict=True))
    assert any((x != z).any() for x, z in zip(xs, zs, strict=True))


def test_seq_len_and_process_errors():
    with pytest.raises(DataConfigError, match="seq_len=1"):
        PackedIterator(random_docs(), seq_len=1, batch_size=1, seed=0)
    with pytest.raises(DataConfigError, match="process_index"):
        PackedIterator(random_docs(), seq_len=8, batch_size=1, seed=0, process_index=2,
                       process_count=2)


def _write_sources(tmp_path):
    texts = [f"document number {i}: " + "word " * (i % 7 + 1) for i in range(60)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    d = tmp_path / "txt"
    d.mkdir()
    for i, t in enumerate(texts):
        (d / f"{i:03d}.txt").write_text(t)
    (tmp_path / "one.txt").write_text("\n\n".join(texts))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": texts}), str(tmp_path / "a.parquet"))
    return texts


@pytest.mark.parametrize("source,field", [("a.jsonl", "body"), ("a.parquet", "body"),
                                          ("txt", "text"), ("txt/*.txt", "text"),
                                          ("one.txt", "text")])
def test_local_sources(tmp_path, source, field):
    texts = _write_sources(tmp_path)
    cfg = DataConfig(source=str(tmp_path / source), text_field=field, val_fraction=0.2,
                     cache_dir=str(tmp_path / "cache"))
    train, val = load_documents(cfg, "train"), load_documents(cfg, "validation")
    assert sorted(d.strip() for d in train + val) == sorted(t.strip() for t in texts)
    assert val and not set(train) & set(val)
    assert load_documents(cfg, "train") == train  # deterministic


def test_iterator_and_eval_from_files_use_token_cache(tmp_path):
    texts = _write_sources(tmp_path)
    cache = tmp_path / "cache"
    cfg = DataConfig(source=str(tmp_path / "a.jsonl"), text_field="body", cache_dir=str(cache))
    tok = byte_tokenizer()
    it = make_train_iterator(cfg, tok, seq_len=32, batch_size=4, seed=0)
    assert sorted(p.name for p in cache.glob("tokens-*.npy"))
    train = load_documents(cfg, "train")
    cached = tokenize_documents(train, tok, str(cache))
    assert [d.tolist() for d in cached] == [tok.encode(t) + [tok.eos_id] for t in train]
    b = next(it)
    assert (b["tokens"][b["segment_ids"] == 0] == tok.pad_id).all()
    assert (b["tokens"] == tok.eos_id).any()
    evals = make_eval_batches(cfg, tok, seq_len=32, batch_size=4, max_batches=0)
    val = load_documents(cfg, "validation")
    got = np.concatenate(pieces([r for e in evals for r in zip(
        e["tokens"], e["positions"], e["segment_ids"], strict=True)], tok.pad_id))
    assert tok.decode(got).replace("\n", "") == "".join(val).replace("\n", "")
    assert len(texts) == len(train) + len(val)


def test_empty_missing_and_unknown_sources(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    (tmp_path / "data.csv").write_text("a,b\n")
    for name in ("empty.txt", "blank.jsonl"):
        with pytest.raises(EmptyDatasetError, match="no non-empty documents"):
            load_documents(DataConfig(source=str(tmp_path / name)), "train")
    with pytest.raises(DataSourceNotFoundError, match="does not exist"):
        load_documents(DataConfig(source=str(tmp_path / "missing.jsonl")), "train")
    with pytest.raises(FileNotFoundError, match="matches no files"):
        load_documents(DataConfig(source=str(tmp_path / "nope" / "*.txt")), "train")
    with pytest.raises(UnknownSourceError, match="csv|no .txt"):
        load_documents(DataConfig(source=str(tmp_path / "data.csv")), "train")
    with pytest.raises(UnknownSourceError, match="not a known kind"):
        load_documents(DataConfig(source="s3://bucket/x"), "train")
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(KeyError, match="text_field"):
        load_documents(DataConfig(source=str(tmp_path / "x.jsonl")), "train")


def test_builtin_corpus_split_and_iterator(tmp_path):
    files = builtin_corpus_files()
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    cfg = DataConfig(max_documents=120, val_fraction=0.1, cache_dir=str(tmp_path))
    train, val = load_documents(cfg, "train"), load_documents(cfg, "validation")
    assert train and val and not set(train) & set(val) and len(train) + len(val) <= 120
    tok = byte_tokenizer()
    it = make_train_iterator(cfg, tok, seq_len=128, batch_size=8, seed=0)
    b = next(it)
    assert b["tokens"].max() < tok.vocab_size and (b["segment_ids"] > 0).mean() > 0.9
    assert len(make_eval_batches(cfg, tok, seq_len=128, batch_size=8, max_batches=3)) == 3


def test_byte_tokenizer_round_trip(tmp_path):
    tok = byte_tokenizer()
    text = "héllo, wörld ✓ \n\t"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id) == (258, 256, 257, None)
    tok.save(str(tmp_path / "t"))
    again = load_tokenizer(str(tmp_path / "t"))
    assert again.encode(text) == ids and again.vocab_size == 258


def test_bpe_train_save_reload(tmp_path):
    texts = [open(f, encoding="utf-8").read() for f in builtin_corpus_files()[:40]]
    d = str(tmp_path / "tokenizer")  # a workdir layout
    tok = train_bpe(texts, 600, d)
    assert tok.vocab_size == 600 and tok.bos_id is None
    sample = "def main(argv):\n    return sorted(argv) ✓\n"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample and len(ids) < len(sample.encode())
    for again in (load_tokenizer(d), make_tokenizer("bpe", directory=d, vocab_size=600),
                  make_tokenizer("checkpoint", directory="", checkpoint_dir=str(tmp_path))):
        assert again.encode(sample) == ids
        assert (again.eos_id, again.pad_id, again.vocab_size) == (tok.eos_id, tok.pad_id, 600)
    with pytest.raises(ValueError, match="vocab 600"):
        make_tokenizer("bpe", directory=d, vocab_size=700)


def test_load_hf_tokenizer_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<s>", "</s>"])
    d = tmp_path / "hf"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    tok = load_tokenizer(str(d))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 5)
    assert tok.encode("hello world") == [3, 4]
    docs = tokenize_documents(["hello world"], tok)
    assert docs[0].tolist() == [1, 3, 4, 2]
    with pytest.raises(TokenizerNotFoundError, match=str(tmp_path / "none")):
        load_tokenizer(str(tmp_path / "none"))
    (tmp_path / "bare").mkdir()
    with pytest.raises(TokenizerNotFoundError, match="bare"):
        load_tokenizer(str(tmp_path / "bare"))


def test_hf_folder_bos_from_post_processor(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    hf = Tokenizer(models.WordLevel({"<unk>": 0, "<bos>": 1, "<eos>": 2, "a": 3},
                                    unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<bos>", "<eos>"])
    hf.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                      special_tokens=[("<bos>", 1)])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tok = load_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.encode("a a") == [3, 3]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert load_tokenizer(str(tmp_path)).bos_id is None

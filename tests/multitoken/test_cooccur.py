"""Co-occurrence tables: exact counts within documents, run merging, lookup, ratio, CLI."""

import itertools
import json
from collections import Counter

import numpy as np
import pytest

from jaxdyn.cli.multitoken import main as cli
from jaxdyn.multitoken.cooccur import CooccurTables, build_tables, encode


def brute_counts(docs, order):
    c = Counter()
    for d in docs:
        for i in range(len(d) - order + 1):
            c[tuple(int(t) for t in d[i:i + order])] += 1
    return c


@pytest.fixture(scope="module")
def docs():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 12, int(rng.integers(1, 40))) for _ in range(60)]


@pytest.mark.parametrize("buffer_keys", [7, 1 << 20])  # many small runs vs one run
def test_counts_match_brute_force_within_documents(tmp_path, docs, buffer_keys):
    meta = build_tables(docs, 12, tmp_path, max_order=4, buffer_keys=buffer_keys)
    t = CooccurTables(tmp_path)
    assert np.array_equal(np.asarray(t.unigram), np.bincount(np.concatenate(docs), minlength=12))
    for order in (2, 3, 4):
        ref = brute_counts(docs, order)
        keys = np.asarray(t.keys[order])
        assert keys.dtype == np.int64 and np.all(np.diff(keys) > 0)  # sorted, unique
        grams = np.array(sorted(ref), np.int64)
        assert np.array_equal(keys, encode(grams, 12))
        assert np.array_equal(t.count(grams), [ref[tuple(g)] for g in grams])
        assert meta[f"N{order}"] == sum(ref.values())
    # A pair that only exists across a document boundary is never counted.
    cross = (int(docs[0][-1]), int(docs[1][0]))
    assert t.count(np.array([cross]))[0] == brute_counts(docs, 2)[cross]
    assert not (tmp_path / "_runs").exists()
    for f in tmp_path.glob("*.npy"):
        np.load(f, allow_pickle=False)


def test_runs_and_single_pass_give_identical_files(tmp_path, docs):
    build_tables(docs, 12, tmp_path / "a", buffer_keys=5)
    build_tables(docs, 12, tmp_path / "b", buffer_keys=1 << 20)
    for name in ("pairs_keys", "pairs_counts", "triples_keys", "triples_counts"):
        assert np.array_equal(np.load(tmp_path / "a" / f"{name}.npy"),
                              np.load(tmp_path / "b" / f"{name}.npy"))


def test_ratio_and_mask(tmp_path):
    docs = [np.array([0, 1, 2, 0, 1]), np.array([3, 3])]
    build_tables(docs, 5, tmp_path)
    t = CooccurTables(tmp_path)
    N1, N2 = 7, 5  # tokens; pairs (0,1),(1,2),(2,0),(0,1),(3,3)
    p1 = np.array([2, 2, 1, 2, 0]) / N1
    rho = t.ratio(np.array([[0, 1], [3, 3], [1, 0], [4, 4]]))
    assert np.allclose(rho[:2], [(2 / N2) / (p1[0] * p1[1]), (1 / N2) / (p1[3] ** 2)])
    assert rho[2] == 0.0 and rho[3] == 0.0  # unseen pair, unseen tokens
    assert t.ratio(np.array([[1, 2, 0]]))[0] == pytest.approx((1 / 3) / (p1[1] * p1[2] * p1[0]))
    assert t.ratio(np.array([[1, 0]]), smoothing=1.0)[0] > 0
    assert t.count(np.array([[0, 99]]))[0] == 0  # id outside V: absent, no error


def test_min_count_prunes(tmp_path):
    build_tables([np.array([0, 1, 0, 1, 2])], 3, tmp_path, min_count=2)
    t = CooccurTables(tmp_path)
    assert np.array_equal(np.asarray(t.keys[2]), encode(np.array([[0, 1]]), 3))
    assert np.asarray(t.counts[2]).tolist() == [2]


def test_cli_jsonl_and_npy(tmp_path, capsys):
    rows = [[1, 2, 3, 1, 2], [4, 5]]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"tokens": r}) for r in rows))
    cli(["cooccur", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "j")])
    stream = np.array([1, 2, 3, 1, 2, 0, 4, 5], np.int32)  # 0 separates documents
    np.save(tmp_path / "s.npy", stream)
    cli(["cooccur", "--data", str(tmp_path / "s.npy"), "--doc_sep", "0", "--vocab_size", "6",
         "--out", str(tmp_path / "n")])
    capsys.readouterr()
    a, b = CooccurTables(tmp_path / "j"), CooccurTables(tmp_path / "n")
    assert a.vocab_size == 6 and a.meta["documents"] == 2 and b.meta["documents"] == 2
    assert np.array_equal(np.asarray(a.keys[3]), np.asarray(b.keys[3]))
    assert a.count(np.array([[1, 2], [2, 4]])).tolist() == [2, 0]


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        build_tables([np.array([0, 7])], 5, tmp_path)
    with pytest.raises(ValueError, match="too large"):
        build_tables([np.array([0])], 100_000, tmp_path, max_order=4)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        CooccurTables(tmp_path / "nothing")


def test_grid_ratio_equals_ratio_of_every_tuple(tmp_path, docs):
    build_tables(docs, 12, tmp_path)
    t = CooccurTables(tmp_path)
    ids = np.array([[0, 3, 5, 11], [1, 2, 3, 4], [7, 0, 9, 2]])
    tuples = np.array(list(itertools.product(*ids)))
    for smoothing in (0.0, 0.5):
        ref = t.ratio(tuples, smoothing).reshape(4, 4, 4)
        assert np.allclose(t.grid_ratio(ids, smoothing), ref, rtol=1e-12, atol=0)
    assert t.grid_ratio(ids[:2]).shape == (4, 4)


# ----------------------------------------------------------------------------- bad input


def _hidden_leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_cli_missing_tokens_field_is_one_line_exit_2(tmp_path):
    """A record without 'tokens' (here: text JSONL): one `error:` line naming file:line and the
    expected format, status 2, no traceback, no output folder."""
    import os
    import subprocess
    import sys

    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"tokens": [1, 2]}) + "\n" + json.dumps({"text": "hi"}) + "\n")
    out = subprocess.run([sys.executable, "-m", "jaxdyn.multitoken", "cooccur", "--data",
                          str(data), "--out", str(tmp_path / "tables")], cwd=tmp_path,
                         env={**os.environ, "JAXDYN_TRACEBACK": ""}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(f"error: {data}:2: ") and "'tokens'" in lines[0]
    assert '{"tokens": [id, ...]}' in lines[0]
    assert not (tmp_path / "tables").exists() and not _hidden_leftovers(tmp_path)


@pytest.mark.parametrize("line,says", [
    ('{"tokens": [1, "x"]}', "not a flat list of integer ids"),
    ('{"tokens": [1.5, 2]}', "not a flat list of integer ids"),
    ('{"tokens": [1, 2', "not valid JSON"),
    ('"just a string"', "not a flat list of integer ids"),
])
def test_bad_records_fail_midway_and_leave_old_tables_alone(tmp_path, capsys, line, says):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"tokens": r}) for r in ([1, 2, 3], [3, 2, 1])))
    out = tmp_path / "tables"
    cli(["cooccur", "--data", str(good), "--out", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"tokens": [4, 5]}) + "\n" + line + "\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # --vocab_size: the error comes while counting
        cli(["cooccur", "--data", str(good), str(bad), "--vocab_size", "8", "--out", str(out)])
    assert e.value.code == 2 and f"{bad}:2: " in str(e.value) and says in str(e.value)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not _hidden_leftovers(tmp_path)
    cli(["cooccur", "--data", str(good), "--vocab_size", "8", "--out", str(out)])  # rebuilt
    assert CooccurTables(out).vocab_size == 8 and not _hidden_leftovers(tmp_path)


def test_cli_refuses_missing_data_and_bad_numbers(tmp_path, capsys):
    for argv, says in [(["--data", str(tmp_path / "none.jsonl")], "does not exist"),
                       (["--data", "builtin", "--vocab_size", "0"], "--vocab_size 0"),
                       (["--data", "builtin", "--min_count", "-1"], "--min_count -1")]:
        with pytest.raises(SystemExit) as e:
            cli(["cooccur", *argv, "--out", str(tmp_path / "t")])
        assert e.value.code == 2 and says in str(e.value)
        assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "t").exists()

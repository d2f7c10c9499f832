"""Bad local data: a non-UTF-8, binary, malformed-JSON(L) or non-Parquet `data.source` is one
named `DataFormatError` naming the file (and line) and the fix, leaves nothing in the caches,
and is a one-line `error:` with exit status 2 from the commands; caches are written whole."""

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
    DataFieldError,
    DataFormatError,
    load_documents,
    tokenize_documents,
)
from jaxdyn.data.tokenizer import _write_atomic, byte_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parents[2]

# name, bytes, what the message must say (besides the file name)
BAD = [
    ("latin1.txt", "caf\xe9 au lait\n\nsecond paragraph\n".encode("latin-1"),
     ["line 1", "not UTF-8", "byte 0xe9", "convert it to UTF-8"]),
    ("utf16.txt", "hello there\n".encode("utf-16"), ["UTF-16", "convert it to UTF-8"]),
    ("binary.txt", b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\n", ["line 1", "NUL", "binary"]),
    ("broken.jsonl", b'{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n',
     ["line 3", "not valid JSON", "JSON object with a 'text' text field"]),
    ("list.jsonl", b'{"text": "a"}\n["not", "an", "object"]\n',
     ["line 2", "JSON list, not an object", "'text'"]),
    ("bytes.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', ["line 2", "not UTF-8"]),
    ("garbage.json", b'[{"text": "a"}, {"text": ',
     ["not valid JSON", "JSON list of objects"]),
    ("items.json", b'[{"text": "a"}, 3]', ["item 1", "not an object"]),
    ("random.parquet", bytes(range(256)) * 3, ["not a readable Parquet file", "to_parquet"]),
]


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


@pytest.mark.parametrize("name,content,says", BAD, ids=[b[0] for b in BAD])
def test_bad_file_is_one_named_error_and_leaves_no_cache(tmp_path, name, content, says):
    (tmp_path / name).write_bytes(content)
    cache = tmp_path / "cache"
    cfg = DataConfig(source=str(tmp_path / name), cache_dir=str(cache))
    with pytest.raises(DataFormatError) as e:
        load_documents(cfg, "train")
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg
    assert msg.startswith(f"data file {str(tmp_path / name)!r}: "), msg
    for s in says:
        assert s in msg, (s, msg)
    assert not cache.exists(), _tree(cache)  # created by this read, so removed with it


def test_bad_file_in_a_folder_is_named_and_an_existing_cache_is_kept(tmp_path):
    data = tmp_path / "docs"
    data.mkdir()
    for i in range(4):
        (data / f"{i}.jsonl").write_text(json.dumps({"text": f"document {i} " * 3}) + "\n")
    cache = tmp_path / "cache"
    good = DataConfig(source=str(data), cache_dir=str(cache), val_fraction=0.0)
    assert len(load_documents(good, "train")) == 4
    before = _tree(cache)
    assert before  # the good read cached its Arrow files
    (data / "2.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    bad = DataConfig(source=str(data / "*.jsonl"), cache_dir=str(cache), val_fraction=0.0)
    with pytest.raises(DataFormatError, match=r"2\.jsonl'.*line 2 is not valid JSON"):
        load_documents(bad, "train")
    assert _tree(cache) == before  # nothing new, nothing of the good read lost


def test_default_datasets_cache_gets_nothing_from_a_bad_file(tmp_path, monkeypatch):
    import datasets

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "keep.lock").write_text("")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(hf))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "some text"}) + "\n")
    assert load_documents(DataConfig(source=str(good), val_fraction=0.0), "train")
    before = _tree(hf)
    assert len(before) > 1  # the default cache is the one `datasets` used
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\xfa\n")
    with pytest.raises(DataFormatError, match="line 2 is not UTF-8"):
        load_documents(DataConfig(source=str(tmp_path / "bad.txt")), "train")
    assert _tree(hf) == before


def test_missing_text_field_is_a_named_error_and_still_a_key_error(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(DataFieldError) as e:
        load_documents(DataConfig(source=str(tmp_path / "x.jsonl")), "train")
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    assert str(e.value).startswith("json data ") and "data.text_field" in str(e.value)


def test_escaped_nul_in_json_is_data_not_binary(tmp_path):
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "a\u0000b"}) + "\n")
    cfg = DataConfig(source=str(tmp_path / "ok.jsonl"), val_fraction=0.0)
    assert load_documents(cfg, "train") == ["a\x00b"]


def test_token_cache_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    tok, cache = byte_tokenizer(), tmp_path / "tok"
    real_save = np.save

    def save_then_fail(path, arr, **kw):  # a disk that fills up in the middle of a write
        real_save(path, arr[: len(arr) // 2], **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        tokenize_documents(["one document", "another"], tok, str(cache))
    assert os.listdir(cache) == []
    monkeypatch.setattr(np, "save", real_save)
    out = tokenize_documents(["one document", "another"], tok, str(cache))
    assert sorted(p.name.split(".", 1)[1] for p in cache.iterdir()) == ["offsets.npy",
                                                                        "tokens.npy"]
    again = tokenize_documents(["one document", "another"], tok, str(cache))
    assert [a.tolist() for a in again] == [a.tolist() for a in out]


def test_tokenizer_files_are_written_whole(tmp_path):
    target = tmp_path / "tokenizer.json"

    def half_then_fail(path):
        Path(path).write_text('{"half": ')
        raise OSError("interrupted")

    with pytest.raises(OSError, match="interrupted"):
        _write_atomic(str(target), half_then_fail)
    assert list(tmp_path.iterdir()) == []
    tok = train_bpe(["some text to learn from " * 20] * 5, 300, str(tmp_path / "bpe"))
    assert sorted(p.name for p in (tmp_path / "bpe").iterdir()) == [
        "jaxdyn_tokenizer.json", "tokenizer.json"]
    assert tok.vocab_size <= 300


def _run(*argv, cwd=None):
    env = {**os.environ, "JAXDYN_TRACEBACK": ""}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def test_evaluate_cli_bad_data_is_one_line_exit_2(tmp_path):
    """`python -m jaxdyn.evaluate --data latin1.txt`: one `error:` line naming the file."""
    import jax

    from jaxdyn.checkpoint import save_params
    from jaxdyn.model import init_params, tiny

    cfg = tiny("qwen2", vocab_size=258, num_layers=1, max_position_embeddings=64)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg.save(str(ckpt / "model_config.json"))
    save_params(str(ckpt / "params"), init_params(cfg, jax.random.key(0)))
    byte_tokenizer().save(str(ckpt))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    out = _run("-m", "jaxdyn.evaluate", "--checkpoint", str(ckpt), "--data", str(bad),
               "--seq_len", "32", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --data "), out.stderr
    assert str(bad) in lines[0] and "line 1 is not UTF-8" in lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "latin1.txt"]

"""`python -m conversion import/export` lose nothing (conversion/paths.py): outputs never
replace what conversion did not write, weight indexes cannot reach outside their folder,
object-store paths are refused, and every bad input is one line on stderr with exit code 2 and
no output left behind.

A tiny random Qwen2 model is built once per module (test_conversion's helpers); every refusal is
checked through the CLI's `main(argv)` and the trees it must not touch are hashed before and
after.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

import conversion
from conversion import paths
from conversion.__main__ import main as cli
from tests.conversion.test_conversion import _add_tokenizer, flat, make_hf

OBJECT_STORE = "object-store paths are not supported by conversion yet; copy the files locally"
OBJECT_STORE_OUT = "conversion writes a local folder (built aside, then renamed into place"


def tree_hash(root) -> dict[str, str]:
    """Relative path -> sha256 of every file (symlinks: their target text) below `root`,
    plus every folder, so an added, removed or changed entry shows."""
    out = {}
    root = str(root)
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        rel = os.path.relpath(dirpath, root)
        out[rel + "/"] = "dir"
        for n in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, n)
            if os.path.islink(p):
                out[os.path.join(rel, n)] = "link:" + os.readlink(p)
            else:
                with open(p, "rb") as f:
                    out[os.path.join(rel, n)] = hashlib.sha256(f.read()).hexdigest()
    return out


def run(argv, capsys) -> tuple[int, str]:
    """Exit code and stderr of the CLI; stderr must be at most one line, with no traceback."""
    capsys.readouterr()
    code = cli([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code:
        assert err.startswith("error: ") and err.count("\n") == 1, err
    return code, err


def leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n or ".old-" in n)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "qwen"
    make_hf("qwen2", rope_theta=1e6, tie_word_embeddings=True).save_pretrained(str(d))
    _add_tokenizer(str(d))
    return d


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    """A `conversion import` output (read-only for the tests: they copy it)."""
    out = tmp_path_factory.mktemp("imp") / "imp"
    assert cli(["import", str(hf_dir), str(out)]) == 0
    return out


@pytest.fixture
def workdir(imported, tmp_path):
    """runs/a: a training workdir (metrics.jsonl, checkpoints/, model_config.json; its params/
    make it exportable), beside a sibling run runs/b."""
    runs = tmp_path / "runs"
    shutil.copytree(imported, runs / "a")
    (runs / "a" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 5.0}\n')
    (runs / "a" / "checkpoints" / "1").mkdir(parents=True)
    (runs / "a" / "checkpoints" / "1" / "state").write_bytes(os.urandom(64))
    (runs / "b").mkdir()
    (runs / "b" / "metrics.jsonl").write_text("{}\n")
    (runs / "notes.txt").write_text("keep me\n")
    return runs / "a"


# ------------------------------------------------------------------ 1. destructive outputs

def test_export_into_the_workdir_or_its_parent_is_refused(workdir, capsys):
    runs = workdir.parent
    before = tree_hash(runs)
    for out, words in ((workdir, "is the source CKPT_DIR"),
                       (runs, "contains the source CKPT_DIR"),
                       (workdir / "hf", "is inside the source CKPT_DIR"),
                       (str(workdir) + "/../a", "is the source CKPT_DIR")):
        for flag in ([], ["--overwrite"]):
            code, err = run(["export", workdir, out, *flag], capsys)
            assert code == 2 and words in err and "--overwrite" in err, err
            assert str(out) in err
            assert tree_hash(runs) == before
    assert leftovers(runs) == [] and leftovers(workdir) == []


def test_output_inside_or_containing_another_training_workdir_is_refused(
        imported, workdir, tmp_path, capsys):
    runs = workdir.parent
    before = tree_hash(runs)
    for out, words in ((runs / "b", "is the training workdir"),
                       (runs / "b" / "hf", "is inside the training workdir"),
                       (runs / "b" / "x" / "y", "is inside the training workdir")):
        for flag in ([], ["--overwrite"]):
            code, err = run(["export", imported, out, *flag], capsys)
            assert code == 2 and words in err and "metrics.jsonl" in err, err
    assert tree_hash(runs) == before and not (runs / "b" / "x").exists()
    # A folder that looks like a previous output but holds a workdir below params/.
    fake = tmp_path / "fake"
    (fake / "params" / "run").mkdir(parents=True)
    (fake / "params" / "run" / "metrics.jsonl").write_text("{}\n")
    (fake / "config.json").write_text("{}")
    before = tree_hash(fake)
    code, err = run(["export", imported, fake, "--overwrite"], capsys)
    assert code == 2 and "contains the training workdir" in err, err
    assert tree_hash(fake) == before


def test_import_never_replaces_an_existing_folder_silently(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    (out / "config.json").write_text("{}")
    before = tree_hash(out)
    code, err = run(["import", hf_dir, out], capsys)
    assert code == 2 and "exists and is not empty" in err and "--overwrite" in err, err
    # --overwrite replaces only previous conversion outputs: notes.txt is not one of its files.
    code, err = run(["import", hf_dir, out, "--overwrite"], capsys)
    assert code == 2 and "notes.txt" in err and "config.json" not in err.split("holds")[1] \
        .split("which")[0], err
    assert tree_hash(out) == before and leftovers(tmp_path) == []
    # An existing file is not a folder to replace.
    f = tmp_path / "file"
    f.write_text("x")
    code, err = run(["import", hf_dir, f, "--overwrite"], capsys)
    assert code == 2 and "not a folder" in err and f.read_text() == "x"


def test_import_into_its_source_is_refused(hf_dir, tmp_path, capsys):
    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    before = tree_hash(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    for out, words in ((src, "is the source HF_DIR"), (link, "is the source HF_DIR"),
                       (src / "sub", "is inside the source HF_DIR"),
                       (str(src) + "/../hf", "is the source HF_DIR")):
        for flag in ([], ["--overwrite"]):
            code, err = run(["import", src, out, *flag], capsys)
            assert code == 2 and words in err, err
    link.unlink()
    assert tree_hash(tmp_path) == before  # model.safetensors and all intact


def test_import_into_the_current_folder_is_refused(hf_dir, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "project"
    cwd.mkdir()
    (cwd / "train.py").write_text("print('hi')\n")
    shutil.copytree(hf_dir, cwd / "hf")
    monkeypatch.chdir(cwd)
    before = tree_hash(cwd)
    for flag in ([], ["--overwrite"]):
        code, err = run(["import", "hf", ".", *flag], capsys)
        assert code == 2 and "contains the source HF_DIR" in err, err
        code, err = run(["import", hf_dir, ".", *flag], capsys)  # source elsewhere
        assert code == 2 and ("not empty" in err if not flag else "train.py" in err), err
    assert tree_hash(cwd) == before and leftovers(tmp_path) == []


def test_overwrite_replaces_a_previous_output_by_an_atomic_swap(imported, tmp_path, capsys,
                                                               monkeypatch):
    out = tmp_path / "exp"
    assert run(["export", imported, out], capsys)[0] == 0
    (out / "README.md").write_text("old card\n")
    old = tree_hash(out)
    code, err = run(["export", imported, out], capsys)
    assert code == 2 and "--overwrite" in err and tree_hash(out) == old

    # While the new output is written, the old one is still complete in place.
    import conversion.__main__ as main_mod

    seen = {}
    real_write = main_mod.write_hf

    def spy(cfg, params, folder, **kw):
        seen["old"] = tree_hash(out)
        seen["tmp"] = os.path.basename(folder)
        return real_write(cfg, params, folder, **kw)

    monkeypatch.setattr(main_mod, "write_hf", spy)
    assert run(["export", imported, out, "--overwrite", "--max_shard_size", "40KB"],
               capsys)[0] == 0
    assert seen["old"] == old and seen["tmp"].startswith("exp.tmp-")
    assert "old card" not in (out / "README.md").read_text()
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    assert leftovers(tmp_path) == []

    # A failure half-way leaves the previous output as it was and no temporary folder.
    new = tree_hash(out)

    def fail(cfg, params, folder, **kw):
        open(os.path.join(folder, "model-00001-of-00009.safetensors"), "wb").close()
        raise conversion.ConversionError("boom")

    monkeypatch.setattr(main_mod, "write_hf", fail)
    code, err = run(["export", imported, out, "--overwrite"], capsys)
    assert code == 2 and "boom" in err and tree_hash(out) == new and leftovers(tmp_path) == []
    monkeypatch.setattr(main_mod, "write_hf", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        cli(["export", str(imported), str(out), "--overwrite"])
    assert tree_hash(out) == new and leftovers(tmp_path) == []
    # Parents this run created are removed with it.
    with pytest.raises(KeyboardInterrupt):
        cli(["export", str(imported), str(tmp_path / "n1" / "n2" / "out")])
    assert not (tmp_path / "n1").exists()


def test_overwrite_without_renameat2_and_through_a_symlink(hf_dir, imported, tmp_path,
                                                          monkeypatch, capsys):
    out = tmp_path / "imp2"
    shutil.copytree(imported, out)
    (out / "hf_config.json").write_text("{}")  # marks the old copy
    monkeypatch.setattr(paths, "_exchange", lambda a, b: False)  # the two-rename fallback
    assert run(["import", hf_dir, out, "--overwrite"], capsys)[0] == 0
    top = lambda d: {k: v for k, v in tree_hash(d).items()  # noqa: E731
                     if not k.startswith("params/")}  # orbax's files differ run to run
    assert top(out) == top(imported)
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    # OUT given as a symlink: replaced at its real path; the link still points to it.
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    (out / "hf_config.json").write_text("{}")
    assert run(["import", hf_dir, link, "--overwrite", "--unrolled"], capsys)[0] == 0
    assert link.is_symlink() and os.path.realpath(link) == str(out)
    assert json.loads((out / "model_config.json").read_text())["scan_layers"] is False
    assert leftovers(tmp_path) == []


def test_to_hf_refuses_too(imported, workdir, tmp_path):
    from jaxdyn.checkpoint import load_model

    cfg, params, _ = load_model(str(imported))
    with pytest.raises(conversion.OutputRefusedError, match="training workdir"):
        conversion.to_hf(cfg, params, str(workdir / "hf"), overwrite=True)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x.txt").write_text("x")
    with pytest.raises(conversion.OutputRefusedError, match="overwrite=True"):
        conversion.to_hf(cfg, params, str(tmp_path / "o"))
    conversion.to_hf(cfg, params, str(tmp_path / "p"))
    conversion.to_hf(cfg, params, str(tmp_path / "p"), overwrite=True)
    assert (tmp_path / "o" / "x.txt").read_text() == "x" and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- 2. input paths

@pytest.fixture
def sharded(hf_dir, tmp_path):
    d = tmp_path / "sharded"
    make_hf("qwen2", rope_theta=1e6, tie_word_embeddings=True).save_pretrained(
        str(d), max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").exists()
    return d


def _set_entry(folder, value) -> str:
    """Point the first weight_map entry at `value`; returns that tensor's name."""
    idx = folder / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    name = sorted(data["weight_map"])[0]
    data["weight_map"][name] = value
    idx.write_text(json.dumps(data))
    return name


def _opened(monkeypatch) -> list[str]:
    import safetensors

    files = []
    real = safetensors.safe_open

    def spy(file, *a, **k):
        files.append(os.path.realpath(file))
        return real(file, *a, **k)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    return files


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "url"])
def test_index_entries_outside_the_folder_are_refused(sharded, tmp_path, kind, monkeypatch,
                                                      capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shutil.copy(shard, elsewhere / "x.safetensors")
    value = {"dotdot": "../elsewhere/x.safetensors",
             "absolute": str(elsewhere / "x.safetensors"),
             "symlink": "link.safetensors", "url": "s3://bucket/x.safetensors"}[kind]
    if kind == "symlink":
        (sharded / "link.safetensors").symlink_to(elsewhere / "x.safetensors")
    name = _set_entry(sharded, value)
    opened = _opened(monkeypatch)
    err_type = conversion.UnsupportedPathError if kind == "url" else conversion.UnsafePathError
    with pytest.raises(err_type) as e:
        conversion.from_hf(str(sharded))
    msg = str(e.value)
    assert "model.safetensors.index.json" in msg and name in msg and value in msg, msg
    assert (OBJECT_STORE in msg) == (kind == "url")
    assert not any(f.startswith(str(elsewhere)) for f in opened) and opened == []
    code, err = run(["import", sharded, tmp_path / "out"], capsys)
    assert code == 2 and name in err and not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_single_weights_file_symlinked_outside_is_refused(hf_dir, tmp_path, monkeypatch):
    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    shutil.move(d / "model.safetensors", tmp_path / "real.safetensors")
    (d / "model.safetensors").symlink_to(tmp_path / "real.safetensors")
    opened = _opened(monkeypatch)
    with pytest.raises(conversion.UnsafePathError, match="model.safetensors.*outside"):
        conversion.from_hf(str(d))
    assert opened == []


def test_hub_cache_snapshot_may_point_into_its_blobs(sharded, tmp_path):
    """models--ORG--NAME/snapshots/REV/* are symlinks into models--ORG--NAME/blobs/."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in sharded.iterdir():
        blob = blobs / hashlib.sha256(f.name.encode()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    cfg, params = conversion.from_hf(str(snap))
    ref_cfg, ref = conversion.from_hf(str(sharded))
    assert cfg == ref_cfg
    got, want = flat(params), flat(ref)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    # but not into another repo's blobs
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    name = sorted(snap.glob("model-*.safetensors"))[0]
    shutil.copy(name, other / "x")
    name.unlink()
    name.symlink_to(other / "x")
    with pytest.raises(conversion.UnsafePathError, match="outside"):
        conversion.from_hf(str(snap))


def test_object_store_paths_are_refused(hf_dir, imported, tmp_path, monkeypatch, capsys):
    """HF_DIR and OUT_DIR stay local; export reads a gs:// / s3:// CKPT_DIR
    (tests/train/test_object_store.py) but no other scheme."""
    monkeypatch.chdir(tmp_path)
    for argv, flag, why in (
            (["import", "gs://bucket/qwen", "out"], "HF_DIR", OBJECT_STORE),
            (["import", hf_dir, "s3://bucket/out"], "OUT_DIR", OBJECT_STORE_OUT),
            (["export", "https://example.com/ckpt", "out"], "CKPT_DIR",
             "https:// is not an object store jaxdyn can use"),
            (["export", imported, "http://example.com/out"], "OUT_DIR", OBJECT_STORE_OUT),
            (["export", imported, "gs://b/out", "--overwrite"], "OUT_DIR", OBJECT_STORE_OUT)):
        code, err = run(argv, capsys)
        assert code == 2 and why in err and flag in err and "://" in err, err
    assert os.listdir(tmp_path) == []  # nothing like ./gs:/bucket was made
    with pytest.raises(conversion.UnsupportedPathError, match="object-store"):
        conversion.from_hf("gs://bucket/qwen")


# ------------------------------------------------------------------------ 3. bad input: exit 2

def test_bad_inputs_are_one_line_exit_2_and_leave_nothing(hf_dir, imported, tmp_path,
                                                          capsys):
    bad_cfg = tmp_path / "badcfg"
    shutil.copytree(hf_dir, bad_cfg)
    c = json.loads((bad_cfg / "config.json").read_text())
    del c["hidden_size"]
    (bad_cfg / "config.json").write_text(json.dumps(c))
    out = tmp_path / "out"
    cases = [
        (["import", tmp_path / "missing", out], "HF_DIR"),
        (["import", hf_dir, out, "--dtype", "int8"], "--dtype"),
        (["import", hf_dir, out, "--dtype", "nonsense"], "--dtype"),
        (["import", bad_cfg, out], "hidden_size"),
        (["export", imported, out, "--max_shard_size", "lots"], "max_shard_size"),
        (["export", imported, out, "--dtype", "int32"], "--dtype"),
        (["export", tmp_path / "missing", out], "CKPT_DIR"),
        (["export", hf_dir, out], "model_config.json"),
        (["import", hf_dir], "out_dir"),
        (["import", hf_dir, out, "--bogus"], "--bogus"),
        (["frobnicate"], "frobnicate"),
    ]
    for argv, named in cases:
        code, err = run(argv, capsys)
        assert code == 2 and named in err, (argv, err)
    assert sorted(os.listdir(tmp_path)) == ["badcfg"]  # no output, no temporary folder

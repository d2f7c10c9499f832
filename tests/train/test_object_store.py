"""Workdirs on an object store (docs/training.md#workdirs-on-object-stores), offline.

The store is a local Google Cloud Storage emulator (`gcp-storage-emulator`, pure Python)
started by the `gcs` fixture on a free localhost port: run files, metrics and the lock reach
it through epath/gcsfs (`STORAGE_EMULATOR_HOST`), checkpoint arrays through tensorstore's own
`gcs` driver (`TENSORSTORE_GCS_HTTP_URL`). Without those packages the store tests skip, naming
what to install; the URL unit tests always run.

One gap of the emulator is filled in the fixture: real GCS answers a read with the object's
generation (`x-goog-generation`), which tensorstore needs for its conditional writes (OCDBT
manifests); the emulator omits it, so `_with_generation` adds it. The emulator does not
enforce write preconditions (`ifGenerationMatch`), so this test checks one writer, not races.
"""

import http.server
import json
import os
import socket

import jax
import numpy as np
import pytest

from jaxdyn.checkpoint import Checkpointer
from jaxdyn.config import paths
from jaxdyn.train import ObjectStorePathError, WorkdirLockedError, schema, train_and_evaluate
from jaxdyn.train.metrics import read_metrics
from jaxdyn.train.workdir import check_inside, safe_write

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "standard.py") + ":tiny"
RUN = ["--config.data.max_documents=60", "--config.train.batch_size=4",
       "--config.train.seq_len=32", "--config.log.tensorboard=false",
       "--config.checkpoint.async_save=false", "--config.sample.max_new_tokens=0",
       "--config.mesh.data=1", "--config.train.steps=4", "--config.checkpoint.every=2",
       "--config.log.every=1", "--config.eval.every=2", "--config.eval.batches=1"]
BUCKET = "jaxdyn-test"


def cfg_for(*overrides):
    return schema.load(CONFIG, [*RUN, *overrides])


# ----------------------------------------------------------------------------- URL helpers


def test_urls_are_never_made_local_paths(tmp_path, monkeypatch):
    assert paths.absolute("gs://b/x") == "gs://b/x" and paths.absolute("s3://b/x/") == "s3://b/x"
    assert paths.join("gs://b/x/", "checkpoints", "4") == "gs://b/x/checkpoints/4"
    assert paths.is_url("gs://b") and not paths.is_url("runs/gs:") and not paths.is_url(None)
    assert check_inside("gs://b/x", "config.json") == "gs://b/x/config.json"
    monkeypatch.chdir(tmp_path)
    assert paths.absolute("runs/a") == str(tmp_path / "runs" / "a")
    with pytest.raises(paths.UnsupportedURLError, match="http:// is not an object store"):
        paths.check_store("http://example.com/x", "--workdir")
    for url in ("https://example.com/run", "hf://org/run"):  # no store jaxdyn can use
        with pytest.raises(ObjectStorePathError, match="is not an object store"):
            train_and_evaluate(cfg_for(), url)
    with pytest.raises(ObjectStorePathError, match="object-store caches"):
        train_and_evaluate(cfg_for("--config.data.cache_dir=gs://b/cache"), "gs://b/run")
    assert os.listdir(tmp_path) == []  # nothing like ./gs:/b/run or ./https:


def test_local_writes_stay_atomic(tmp_path):
    """The #19 rule on local disks: temp file + rename, no temp left, symlinks refused."""
    safe_write(str(tmp_path), "config.json", "{}")
    assert os.listdir(tmp_path) == ["config.json"]
    paths.write_atomic(str(tmp_path / "x.bin"), b"\0\1")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "x.bin"]


# ----------------------------------------------------------------------------- the store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_generation(handler, storage_error):
    """The emulator's GET handler, plus the `x-goog-generation` header real GCS sends."""
    def get(request, response, storage, *args, **kwargs):
        handler(request, response, storage, *args, **kwargs)
        if response.status.value in (200, 206):
            try:
                obj = storage.get_file_obj(request.params["bucket_name"],
                                           request.params["object_id"])
            except storage_error:
                return
            response["x-goog-generation"] = obj["generation"]
    return get


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A GCS emulator on localhost with bucket BUCKET; stopped after the module."""
    server = pytest.importorskip(
        "gcp_storage_emulator.server",
        reason="the object-store tests need `pip install gcp-storage-emulator gcsfs`")
    pytest.importorskip("gcsfs", reason="the object-store tests need `pip install gcsfs`")
    import gcsfs

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs (epath's gs:// backend)
        mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # tensorstore's gcs driver (arrays)
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))  # local token cache
        # clients that hang up early make the emulator print tracebacks: harmless here
        mp.setattr(http.server.HTTPServer, "handle_error", lambda *a: None)
        from gcp_storage_emulator.exceptions import NotFound
        from gcp_storage_emulator.handlers import objects
        for _, handlers in server.HANDLERS:
            if handlers.get(server.GET) in (objects.get, objects.download):
                mp.setitem(handlers, server.GET,
                           _with_generation(handlers[server.GET], NotFound))
        gcsfs.GCSFileSystem.clear_instance_cache()
        srv = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
        srv.start()
        try:
            yield f"gs://{BUCKET}"
        finally:
            srv.stop()
            gcsfs.GCSFileSystem.clear_instance_cache()


def _params(workdir: str):
    ck = Checkpointer(paths.join(workdir, "checkpoints"), async_save=False)
    try:
        return ck.latest_step(), ck.restore_params(ck.latest_step())[0]
    finally:
        ck.close()


@pytest.mark.slow
@pytest.mark.parity
def test_train_resume_evaluate_generate_export_on_the_store(gcs, tmp_path, monkeypatch,
                                                             capsys):
    """Train 2 steps on gs://, stop, resume to 4 == 4 uninterrupted local steps (parameters
    and losses); then evaluate, generate, draw and export, all reading the store workdir."""
    monkeypatch.chdir(tmp_path)
    real_abspath = os.path.abspath

    def guarded(p):  # no URL ever reaches os.path.abspath
        assert not paths.is_url(os.fspath(p)), f"os.path.abspath({p!r})"
        return real_abspath(p)

    local, store = str(tmp_path / "local"), f"{gcs}/runs/a"
    train_and_evaluate(cfg_for(), local)
    monkeypatch.setattr(os.path, "abspath", guarded)
    train_and_evaluate(cfg_for("--config.train.stop_at_step=2"), store)
    assert _params(store)[0] == 2
    assert not paths.exists(paths.join(store, ".lock"))  # released
    train_and_evaluate(cfg_for(), store)  # resume from step 2 on the store
    capsys.readouterr()

    names = set(paths.listdir(store))
    assert {"config.json", "model_config.json", "run.json", "metrics.jsonl", "tokenizer",
            "checkpoints"} <= names and ".lock" not in names, names
    assert not any(":" in n for n in os.listdir(tmp_path)), os.listdir(tmp_path)  # no ./gs:
    (step_a, want), (step_b, got) = _params(local), _params(store)
    assert step_a == step_b == 4
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loss = lambda rows: [(r["step"], r["train/loss"]) for r in rows if r["split"] == "train"]
    assert loss(read_metrics(store)) == loss(read_metrics(local))  # one consistent file

    # A lock object of a trainer on another host refuses a second trainer (best effort).
    lock = paths.join(store, ".lock")
    paths.write_atomic(lock, json.dumps({"host": "elsewhere", "pid": 1, "token": "x"}))
    with pytest.raises(WorkdirLockedError, match="host elsewhere"):
        train_and_evaluate(cfg_for("--config.train.steps=6"), store)
    paths.remove(lock)

    from conversion.__main__ import main as conversion_main
    from jaxdyn.cli.evaluate import main as evaluate_main
    from jaxdyn.cli.generate import main as generate_main
    from jaxdyn.viz.dashboard import dashboard

    ev = ["--max_batches", "1", "--seq_len", "32", "--batch_size", "2"]
    evaluate_main(["--checkpoint", store, *ev, "--out", paths.join(store, "eval.json")])
    evaluate_main(["--checkpoint", local, *ev])
    out = capsys.readouterr().out
    got_ev = json.loads(paths.read_text(paths.join(store, "eval.json")))
    want_ev = json.loads(out[out.rindex("\n{\n") + 1:])  # the last top-level JSON object
    assert got_ev["ppl"] == want_ev["ppl"] and np.isfinite(got_ev["ppl"])

    gen = ["--prompt", "def ", "--max_new_tokens", "6"]
    generate_main(["--checkpoint", store, *gen])
    from_store = capsys.readouterr().out
    generate_main(["--checkpoint", local, *gen])
    assert from_store == capsys.readouterr().out and from_store.startswith("=== 'def '")

    assert dashboard(store) == paths.join(store, "dashboard.png")
    assert paths.read_bytes(paths.join(store, "dashboard.png"))[:4] == b"\x89PNG"

    hf = tmp_path / "hf"
    assert conversion_main(["export", store, str(hf)]) == 0
    assert {"config.json", "README.md"} <= set(os.listdir(hf)), os.listdir(hf)
    assert any(n.endswith(".safetensors") for n in os.listdir(hf))
    assert conversion_main(["export", store, paths.join(gcs, "hf")]) == 2
    assert "conversion writes a local folder" in capsys.readouterr().err
    assert not paths.exists(paths.join(gcs, "hf"))

    # A damaged newest step on the store is set aside (its objects copied, then deleted) and
    # training resumes from the step before it.
    paths.remove(paths.join(store, "checkpoints", "4", "state", "manifest.ocdbt"))
    train_and_evaluate(cfg_for("--config.train.steps=6"), store)
    names = paths.listdir(paths.join(store, "checkpoints"))
    aside = [n for n in names if n.startswith("damaged-4-")]
    assert aside and "6" in names, names
    assert paths.exists(paths.join(store, "checkpoints", aside[0], "state", "_METADATA"))
    assert "warning: checkpoint step 4 is damaged" in capsys.readouterr().err

"""launch/colab.ipynb runs headlessly: every code cell, in order, in one namespace (install cell
skipped by JAXDYN_NOTEBOOK_TEST=1), a few training steps via JAXDYN_NOTEBOOK_OVERRIDES."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab.ipynb"

# Executes the code cells like a kernel would (no nbclient/IPython needed).
RUNNER = """
import json, sys
cells = [c for c in json.load(open(sys.argv[1]))["cells"] if c["cell_type"] == "code"]
ns = {"__name__": "__main__"}
for i, cell in enumerate(cells):
    print(f"--- cell {i}", flush=True)
    exec(compile("".join(cell["source"]), f"<cell {i}>", "exec"), ns)
print("--- notebook done")
"""


def code_cells():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_structure():
    cells = code_cells()
    assert 'os.environ.get("JAXDYN_NOTEBOOK_TEST") != "1"' in cells[0]  # install is skippable
    assert "pip" in cells[0] and "install" in cells[0]
    text = "\n".join(cells)
    for needle in ("configs/dtf.py:tiny", "train_and_evaluate", "metrics", "routing_figure",
                   "generate("):
        assert needle in text, needle
    for c in cells:  # plain Python: no IPython magics, so the cells run anywhere
        assert not any(line.lstrip().startswith(("%", "!")) for line in c.splitlines())


@pytest.mark.slow
def test_notebook_executes_headlessly(tmp_path):
    work = tmp_path / "run"
    # A smoke run of the cells (nothing compared to a reference): most XLA optimisations off
    # (docs/testing.md), which cuts the compile-bound run by about half.
    env = {**os.environ, "JAXDYN_NOTEBOOK_TEST": "1", "JAXDYN_NOTEBOOK_WORKDIR": str(work),
           "MPLBACKEND": "Agg", "XLA_FLAGS": "", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
           "JAXDYN_NOTEBOOK_OVERRIDES": " ".join([
               "--config.train.steps=2", "--config.eval.every=2", "--config.log.every=1",
               "--config.checkpoint.every=2", "--config.checkpoint.async_save=false",
               "--config.data.max_documents=60", "--config.train.batch_size=2",
               "--config.train.seq_len=32", "--config.eval.batches=1"])}
    out = subprocess.run([sys.executable, "-c", RUNNER, str(NOTEBOOK)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "--- notebook done" in out.stdout
    assert "generated: 'def " in out.stdout
    for name in ("loss.png", "routing.png", "metrics.jsonl", "checkpoints"):
        assert (work / name).exists(), name
    assert (work / "routing.png").stat().st_size > 1000

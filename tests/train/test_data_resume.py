"""Resume with the grain pipeline: a two-source mixture with background prefetch trains 8 steps
uninterrupted == 4 steps, stop, resume to 8, bit for bit; the checkpoint holds grain's state."""

import json

import jax
import numpy as np

from jaxdyn.train import schema, train_and_evaluate
from jaxdyn.train.metrics import read_metrics
from tests.train.test_faults import final_params  # the newest checkpoint's parameters

MIX = ("--config.data.sources=({'source': 'builtin', 'weight': 0.6, 'max_documents': 40}, "
       "{'source': 'builtin', 'weight': 0.4, 'max_documents': 16})")
FAST = ["--config.train.batch_size=4", "--config.train.seq_len=32",
        "--config.log.tensorboard=false", "--config.checkpoint.async_save=false",
        "--config.sample.max_new_tokens=0", "--config.mesh.data=1", "--config.train.steps=8",
        "--config.checkpoint.every=4", "--config.log.every=2", "--config.eval.every=100",
        "--config.data.prefetch_threads=2", MIX]


def test_mixture_resume_is_exact(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cfg = lambda *o: schema.load("configs/standard.py:tiny", [*FAST, *o])
    train_and_evaluate(cfg(), a)
    train_and_evaluate(cfg("--config.train.stop_at_step=4"), b)
    # orbax's JSON item of step 4: the grain iterator's state
    data = json.loads((tmp_path / "b" / "checkpoints" / "4" / "data" / "metadata").read_text())
    assert data["version"] == 3 and data["batches"] == 4 and data["grain"] == {"next_index": 4}
    assert data["source_rows"] == [10, 6]  # 16 rows drawn 0.6 : 0.4
    train_and_evaluate(cfg(), b)
    jax.tree.map(np.testing.assert_array_equal, final_params(a), final_params(b))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time" and "per_sec" not in k
                           and "mfu" not in k} for r in rows if r["split"] == "train"]
    assert strip(read_metrics(a)) == strip(read_metrics(b))

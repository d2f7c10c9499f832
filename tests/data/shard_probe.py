"""Helper of tests/data/test_grain_pipeline.py, run under `launch/local.sh 2` as
`python -m tests.data.shard_probe CACHE_DIR`: each process builds the trainer's data pipeline
(preparing the builtin corpus into CACHE_DIR, every process its own shards) and prints one JSON
line with the shard files it opened and its first batch."""

import json
import os
import sys

from jaxdyn import distributed

distributed.init()

import jax  # noqa: E402

from jaxdyn.data import DataConfig, grain_train_iterator  # noqa: E402
from jaxdyn.data.tokenizer import byte_tokenizer  # noqa: E402

it = grain_train_iterator(DataConfig(max_documents=40, cache_dir=sys.argv[1], shards=4),
                          byte_tokenizer(), seq_len=32, batch_size=2, seed=0,
                          process_index=jax.process_index(), process_count=jax.process_count())
batch = next(it)
print(json.dumps({"process": jax.process_index(),
                  "shards": [os.path.basename(f) for f in it.shard_files],
                  "tokens": batch["tokens"].tolist()}), flush=True)

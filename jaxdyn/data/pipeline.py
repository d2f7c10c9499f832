"""Training batches from prepared shards with grain: per-host shards, seeded shuffling,
packing, weighted mixtures and background prefetch, with a JSON-able, exact resume state.

Per source, the host's documents (its shards only) are packed into rows by `PackedRows`
(the layout and orders of `PackedIterator`: same seed, same rows); rows of several sources
are mixed by weight with `grain.MapDataset.mix`, batched, and read ahead by grain threads
(`data.prefetch_threads`, `data.prefetch_buffer`) and optionally worker processes
(`data.workers`). The iterator's position is grain's own state plus the rows each source
started at, saved with every checkpoint.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import numpy as np

from jaxdyn.data.errors import DataConfigError
from jaxdyn.data.packing import PackedRows, check_shape
from jaxdyn.data.prepare import PreparedDocs

STATE_VERSION = 3  # grain state + per-source start rows; version 2 was PackedIterator's


class _Row:
    """Global row index -> packed row of one source (picklable for grain worker processes)."""

    def __init__(self, rows: PackedRows, source: int) -> None:
        self.rows, self.source = rows, source

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        out = self.rows.row(int(index))
        out["source"] = np.int32(self.source)
        return out


def _int_keys(state):
    """Grain's state after a JSON round trip: the integer keys of `future_states` (grain's
    interleave, used by the worker processes) came back as strings."""
    if isinstance(state, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v)
                for k, v in state.items()}
    if isinstance(state, list):
        return [_int_keys(v) for v in state]
    return state


def _stack(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class GrainTextIterator:
    """Endless [B, T] batches ("tokens", "positions", "segment_ids", int32) of this host's
    shards of each source, mixed by `weights`; `state()` / `restore(state)` resume exactly.

    `source_rows` counts the rows drawn from each source so far (the mixture check)."""

    def __init__(self, docs: Sequence[PreparedDocs], weights: Sequence[float], *, seq_len: int,
                 batch_size: int, seed: int, pad_id: int, process_index: int = 0,
                 process_count: int = 1, threads: int = 2, buffer: int = 4,
                 workers: int = 0) -> None:
        check_shape(seq_len, batch_size)
        if len(docs) != len(weights) or not docs:
            raise DataConfigError("one weight per source is needed, and at least one source")
        self.docs, self.weights = list(docs), [float(w) for w in weights]
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.threads, self.buffer, self.workers = threads, buffer, workers
        self.rows = []
        for d in self.docs:
            if not len(d):
                raise DataConfigError(
                    f"process {process_index} of {process_count} has no training documents "
                    f"in {d.folder!r}; use more data or prepare more shards")
            self.rows.append(PackedRows(d.lengths, d.read, seq_len=seq_len, seed=seed,
                                        pad_id=pad_id))
        self.source_rows = np.zeros(len(self.docs), np.int64)
        self._build([0] * len(self.rows))

    @property
    def shard_files(self) -> list[str]:
        """The shard files this host reads (its own, of every source)."""
        return [f for d in self.docs for f in d.files]

    def _build(self, starts: list[int]) -> None:
        import grain.python as grain

        self._starts = [int(s) for s in starts]
        parts = [grain.MapDataset.range(s, sys.maxsize).map(_Row(r, k))
                 for k, (r, s) in enumerate(zip(self.rows, self._starts, strict=True))]
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, self.weights)
        ds = ds.batch(self.batch_size, batch_fn=_stack)
        its = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.threads,
                                                   prefetch_buffer_size=self.buffer))
        if self.workers:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a program
                flags.FLAGS.mark_as_parsed()  # that never parsed them keeps their defaults
            its = its.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        self._it = iter(its)
        self._batches = 0
        self._drawn = np.zeros(len(self.rows), np.int64)  # rows per source since the build

    def __iter__(self) -> GrainTextIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = next(self._it)
        self._batches += 1
        drawn = np.bincount(b.pop("source"), minlength=len(self.rows))
        self._drawn += drawn
        self.source_rows += drawn
        return b

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close:
            close()

    # ------------------------------------------------------------------ state

    def _checks(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "process_index": self.process_index, "process_count": self.process_count,
                "docs": [len(d) for d in self.docs], "weights": self.weights,
                "workers": self.workers}  # grain's state layout depends on the worker count

    def state(self) -> dict:
        """JSON-able position: grain's iterator state (bytes decoded), the start row of each
        source, and what must match on restore."""
        g = self._it.get_state()
        if isinstance(g, bytes):
            g = {"bytes": g.decode()}
        json.dumps(g)  # fails loudly if grain ever returns something JSON cannot hold
        epoch = max(r.locate(s + int(n))[0]
                    for r, s, n in zip(self.rows, self._starts, self._drawn, strict=True))
        return {"version": STATE_VERSION, "grain": g, "starts": self._starts,
                "drawn": self._drawn.tolist(), "batches": self._batches, "epoch": int(epoch),
                "source_rows": self.source_rows.tolist(), **self._checks()}

    def restore(self, state: dict) -> list[str]:
        """Continue exactly where `state()` was taken (same data, seed, shapes and process
        layout). A version-2 state (the in-memory packer, single source) continues at the
        same row; returns the notes to log."""
        mine = self._checks()
        if state.get("version") == 2 and len(self.rows) == 1:
            for k in ("seed", "seq_len", "process_index", "process_count"):
                if state.get(k) != mine[k]:
                    raise ValueError(f"data iterator state has {k}={state.get(k)!r} but this "
                                     f"iterator has {mine[k]!r}; resume with the same data, "
                                     "seed, seq_len and process layout")
            self._build([self.rows[0].epoch_start(int(state["epoch"])) + int(state["row"])])
            return ["data: a version-2 (in-memory packer) state; continuing at its row"]
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state {state} is not a version-{STATE_VERSION} "
                             "state of this iterator")
        for k, v in mine.items():
            if state.get(k) != v:
                raise ValueError(f"data iterator state has {k}={state.get(k)!r} but this "
                                 f"iterator has {v!r}; resume with the same data, tokenizer, "
                                 "seed, batch, seq_len, mixture, data.workers and process "
                                 "layout")
        self._build(state["starts"])
        g = state["grain"]
        self._it.set_state(g["bytes"].encode() if set(g) == {"bytes"} else _int_keys(g))
        self._batches = int(state["batches"])
        self._drawn = np.asarray(state["drawn"], np.int64)
        self.source_rows = np.asarray(state["source_rows"], np.int64)
        return []

    def restart_after(self, states: Sequence[dict]) -> list[str]:
        """Resume a checkpoint written by another process count: positions cannot be mapped
        (each host reads its own shards), so every source restarts at the epoch after the
        furthest one any process had reached."""
        epoch = max(int(st.get("epoch", 0)) for st in states) + 1
        self._build([r.epoch_start(epoch) for r in self.rows])
        return [f"data: checkpoint from {len(states)} processes resumed on "
                f"{self.process_count}; data order restarts at epoch {epoch}"]

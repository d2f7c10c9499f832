"""Packing token documents into fixed [B, T] rows: deterministic, resumable, per-process."""

from __future__ import annotations

import array
import threading

import numpy as np

from jaxdyn.data.errors import DataConfigError, EmptyDatasetError

STATE_VERSION = 2  # (epoch, row); version 1 was a document cursor


def check_shape(seq_len: int, batch_size: int) -> None:
    if seq_len < 2:
        raise DataConfigError(f"seq_len={seq_len} is too short: next-token training needs at "
                              "least 2 tokens per row; raise train.seq_len")
    if batch_size < 1:
        raise DataConfigError(f"batch_size={batch_size} must be >= 1; raise train.batch_size")


class PackedIterator:
    """Infinite iterator of packed batches over this process's documents.

    Each epoch visits the process's documents (global index % process_count ==
    process_index) once, in a fresh order drawn from (seed, epoch) when `shuffle`. Rows are
    filled with consecutive documents; every document (or piece of one) is its own segment
    (ids 1, 2, ... within a row, 0 = padding) and its positions restart at 0. A document that
    would fit in an empty row but not in the current row's space starts the next row (the
    rest is padding); longer documents fill the current row and continue in the next rows
    as new segments. The last row of an epoch is padded, so epochs never share a row.

    With `shuffle`, the rows of an epoch are then served in a random order too (drawn from
    (seed, epoch)): without it, a batch would hold consecutive pieces of one long document
    (a stdlib module fills a whole tiny batch), which makes the gradient far noisier. The
    layout is computed from document lengths only; the state is (epoch, row).

    Labels are NOT shifted here: "tokens" are both inputs and targets; the loss shifts once
    (`jaxdyn.model.loss.shifted_targets`) and drops targets that cross a segment boundary.
    """

    def __init__(self, token_docs: list[np.ndarray], *, seq_len: int, batch_size: int,
                 seed: int, process_index: int = 0, process_count: int = 1,
                 shuffle: bool = True, pad_id: int = 0) -> None:
        check_shape(seq_len, batch_size)
        if not 0 <= process_index < process_count:
            raise DataConfigError(f"process_index={process_index} must be in [0, "
                                  f"process_count={process_count})")
        self.docs = token_docs
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, int(seed)
        self.shuffle, self.pad_id = shuffle, pad_id
        self.process_index, self.process_count = process_index, process_count
        self.local = np.array([i for i in range(process_index, len(token_docs), process_count)
                               if self._length(i)], dtype=np.int64)
        if not len(self.local):
            raise EmptyDatasetError(
                f"process {process_index} of {process_count} has no documents ({len(token_docs)}"
                " in total); use more data (data.max_documents=0) or fewer processes")
        self._epoch, self._row = 0, 0
        self._plan_epoch, self._plan = -1, None

    # ------------------------------------------------------------------ order and state

    def _length(self, doc: int) -> int:
        """Token count of document `doc` (subclasses answer without reading it)."""
        return len(self.docs[doc])

    def _tokens(self, doc: int, start: int, stop: int) -> np.ndarray:
        return self.docs[doc][start:stop]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global document indices in the order epoch `epoch` packs them."""
        if not self.shuffle:
            return self.local
        rng = np.random.default_rng([self.seed, epoch])
        return self.local[rng.permutation(len(self.local))]

    def epoch_layout(self, epoch: int) -> np.ndarray:
        """[R, 2] (position in `epoch_order`, token offset) where each row of the epoch starts,
        in packing order."""
        order = self.epoch_order(epoch)
        lengths = [self._length(d) for d in order]
        starts, doc, offset = [], 0, 0
        while doc < len(order):
            starts.append((doc, offset))
            doc, offset = self._fill(lengths, doc, offset)
        return np.asarray(starts, np.int64).reshape(-1, 2)

    def row_order(self, epoch: int, n_rows: int) -> np.ndarray:
        """The order in which the epoch's rows are served (packing order without `shuffle`)."""
        if not self.shuffle:
            return np.arange(n_rows)
        return np.random.default_rng([self.seed, epoch, 1]).permutation(n_rows)

    def _plan_of(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, row starts in serving order, served row count) of an epoch."""
        if self._plan_epoch != epoch:
            layout = self.epoch_layout(epoch)
            order = self.row_order(epoch, len(layout))
            self._plan, self._plan_epoch = (self.epoch_order(epoch), layout[order]), epoch
        return self._plan

    def state(self) -> dict:
        """JSON-able position: the next row is row `row` (serving order) of epoch `epoch`."""
        return {"version": STATE_VERSION, "epoch": self._epoch, "row": self._row,
                "seed": self.seed, "num_docs": int(len(self.local)), "seq_len": self.seq_len,
                "process_index": self.process_index, "process_count": self.process_count}

    def restore(self, state: dict) -> list[str]:
        """Continue exactly where `state()` was taken (same data, seed and sharding). A state
        of the first release (version 1, a document cursor) restarts at its next epoch;
        returns the note to log."""
        mine = self.state()
        for k in ("seed", "num_docs", "seq_len", "process_index", "process_count"):
            if state.get(k) != mine[k]:
                raise ValueError(f"data iterator state has {k}={state.get(k)!r} but this "
                                 f"iterator has {mine[k]!r}; resume with the same data, "
                                 "tokenizer, seed, seq_len and process layout")
        if state.get("version") == 1:
            self._epoch, self._row = int(state["epoch"]) + 1, 0
            return [f"data: a version-1 iterator state; data order restarts at epoch "
                    f"{self._epoch}"]
        if state.get("version") != STATE_VERSION or int(state["row"]) < 0:
            raise ValueError(f"data iterator state {state} is not a version-{STATE_VERSION} "
                             "state of this iterator")
        self._epoch, self._row = int(state["epoch"]), int(state["row"])
        return []

    # ------------------------------------------------------------------ packing

    def _fill(self, lengths, doc: int, offset: int, order=None, out=None) -> tuple[int, int]:
        """Pack one row starting at (doc, offset) of the epoch's order; returns where the next
        row starts. `lengths` are the documents' lengths in that order; with `order` and
        `out` = (tokens, positions, segs) the row is written (the arrays arrive as padding)."""
        T, filled, seg = self.seq_len, 0, 0
        while filled < T and doc < len(lengths):
            rest, space = lengths[doc] - offset, T - filled
            if space < rest <= T and filled:
                break  # fits in a fresh row: do not split it
            n = min(rest, space)
            seg += 1
            if out is not None:
                tokens, positions, segs = out
                tokens[filled:filled + n] = self._tokens(order[doc], offset, offset + n)
                positions[filled:filled + n] = np.arange(n)
                segs[filled:filled + n] = seg
            filled += n
            offset += n
            if offset == lengths[doc]:
                doc, offset = doc + 1, 0
        return doc, offset

    def next_row(self, tokens: np.ndarray, positions: np.ndarray, segs: np.ndarray) -> None:
        """Fill one row in place (the arrays arrive set to padding) and advance."""
        order, starts = self._plan_of(self._epoch)
        doc, offset = starts[self._row]
        lengths = [self._length(d) for d in order[doc:doc + self.seq_len + 1]]
        self._fill(lengths, 0, int(offset), order[doc:], (tokens, positions, segs))
        self._row += 1
        if self._row == len(starts):  # normalise: the next row starts the next epoch
            self._epoch, self._row = self._epoch + 1, 0

    def empty_batch(self, rows: int) -> dict[str, np.ndarray]:
        shape = (rows, self.seq_len)
        return {"tokens": np.full(shape, self.pad_id, np.int32),
                "positions": np.zeros(shape, np.int32), "segment_ids": np.zeros(shape, np.int32)}

    def __iter__(self) -> PackedIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """int32 [B, T] "tokens", "positions", "segment_ids"."""
        b = self.empty_batch(self.batch_size)
        for r in range(self.batch_size):
            self.next_row(b["tokens"][r], b["positions"][r], b["segment_ids"][r])
        return b

    def one_pass(self, max_batches: int = 0) -> list[dict[str, np.ndarray]]:
        """Batches covering every document once from the start of epoch 0 (in order without
        `shuffle`); the last batch is padded with empty rows (segment 0). At most
        `max_batches` if > 0."""
        saved = self.state()
        self._epoch, self._row = 0, 0
        out = []
        try:
            while self._epoch == 0 and (max_batches <= 0 or len(out) < max_batches):
                b = self.empty_batch(self.batch_size)
                for r in range(self.batch_size):
                    if self._epoch:
                        break
                    self.next_row(b["tokens"][r], b["positions"][r], b["segment_ids"][r])
                out.append(b)
        finally:
            self.restore(saved)
        return out


class PackedRows(PackedIterator):
    """The rows `PackedIterator` serves, by number: row i of the endless sequence (epoch after
    epoch) is built on demand from the documents' lengths and the plan of its epoch, so a
    random-access pipeline (grain) can read, prefetch and checkpoint rows by index. Same
    layout, order and segments as `PackedIterator` over the same documents and seed.

    `lengths` (one int per document) lets the layout be planned without reading any document;
    `read(doc, start, stop)` returns a document's tokens. Thread-safe: plans are cached per
    epoch under a lock (at most `keep` epochs)."""

    def __init__(self, lengths: np.ndarray, read, *, seq_len: int, seed: int,
                 shuffle: bool = True, pad_id: int = 0, keep: int = 2) -> None:
        self.lengths = np.asarray(lengths, np.int64)
        self.read = read
        super().__init__(_Sized(len(self.lengths)), seq_len=seq_len, batch_size=1, seed=seed,
                         shuffle=shuffle, pad_id=pad_id)
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._starts = [0]  # global row index where epoch e starts, for the epochs planned
        self._keep = keep
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # picklable for grain worker processes
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _length(self, doc: int) -> int:
        return int(self.lengths[doc])

    def epoch_layout(self, epoch: int) -> np.ndarray:
        """As `PackedIterator.epoch_layout`, kept compact: 16 bytes per row, no Python
        objects per row (the plan is the only memory that grows with the corpus)."""
        lengths = self.lengths[self.epoch_order(epoch)].tolist()
        small = len(lengths) < 2**31 and max(lengths, default=0) < 2**31
        starts = array.array("i" if small else "q")
        doc, offset = 0, 0
        while doc < len(lengths):
            starts.extend((doc, offset))
            doc, offset = self._fill(lengths, doc, offset)
        return np.frombuffer(starts, np.int32 if small else np.int64).reshape(-1, 2)

    def _tokens(self, doc: int, start: int, stop: int) -> np.ndarray:
        return self.read(int(doc), start, stop)

    def _plan_of(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, row starts in packing order, serving order of the rows): the
        serving order is kept as a permutation (int32) rather than a reordered copy."""
        with self._lock:
            plan = self._plans.get(epoch)
        if plan is None:
            layout = self.epoch_layout(epoch)
            serve = self.row_order(epoch, len(layout))
            if len(layout) < 2**31:
                serve = serve.astype(np.int32)
            plan = (self.epoch_order(epoch), layout, serve)
            with self._lock:
                self._plans[epoch] = plan
                for old in sorted(self._plans)[:-self._keep]:
                    del self._plans[old]
        return plan

    def locate(self, index: int) -> tuple[int, int]:
        """(epoch, row in serving order) of global row `index`."""
        with self._lock:
            starts = list(self._starts)
        while starts[-1] <= index:  # plan epochs until `index` is inside one
            starts.append(starts[-1] + len(self._plan_of(len(starts) - 1)[1]))
            with self._lock:
                if len(starts) > len(self._starts):
                    self._starts = starts
        epoch = int(np.searchsorted(starts, index, side="right")) - 1
        return epoch, index - starts[epoch]

    def epoch_start(self, epoch: int) -> int:
        """Global index of the first row of `epoch`."""
        while len(self._starts) <= epoch:
            self.locate(self._starts[-1])
        return self._starts[epoch]

    def row(self, index: int) -> dict[str, np.ndarray]:
        """Global row `index`: int32 [T] "tokens", "positions", "segment_ids"."""
        epoch, r = self.locate(index)
        order, starts, serve = self._plan_of(epoch)
        doc, offset = starts[serve[r]]
        out = {k: v[0] for k, v in self.empty_batch(1).items()}
        lengths = [self._length(d) for d in order[doc:doc + self.seq_len + 1]]
        self._fill(lengths, 0, int(offset), order[doc:],
                   (out["tokens"], out["positions"], out["segment_ids"]))
        return out


class _Sized:
    """A stand-in document list of `n` entries for `PackedRows` (lengths come separately)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

"""Suite `data`: tokens/s the grain data pipeline delivers, and its peak RSS as the corpus grows.

1. Throughput: the builtin corpus is prepared (byte tokenizer) into a temporary folder, then
   the trainer's iterator (`jaxdyn.data.GrainTextIterator`, default prefetch settings) is
   drained for a fixed number of [B, T] batches of the preset after a warm-up; tokens/s counts
   B·T per batch. Target: ≥ 20× what the trainer consumes at the `small` preset (the `train`
   suite's jaxdyn tokens/s; `ctx["train_tokens_per_s"]` when given, else the figure recorded
   in docs/results/performance.md, `TRAIN_TOKENS_PER_S`).
2. Memory: the corpus replicated 1× and 10× (each copy a distinct document) is prepared, and
   a fresh subprocess per size builds the iterator and draws the same number of batches;
   its peak RSS is compared. Target: the 10× peak within +10 % of the 1× peak (memory does
   not grow with the corpus: documents are read from the shards on demand).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from jaxdyn.bench import common
from jaxdyn.data import (
    DataConfig,
    GrainTextIterator,
    PreparedDocs,
    SourceSpec,
    builtin_corpus_files,
    prepare,
)
from jaxdyn.data.tokenizer import byte_tokenizer

THROUGHPUT_TARGET = 20.0  # × the trainer's tokens/s
RSS_TARGET = 1.10  # 10× corpus peak RSS / 1× peak RSS
# jaxdyn `train` suite, preset small, 2-core CPU (docs/results/performance.md).
TRAIN_TOKENS_PER_S = 664.0
MARK = "DATA_RESULT "
# The memory check's subprocess: this module's `drain` without jaxdyn.bench's imports (it
# does), so the figure is the pipeline's own.
CHILD = f"""
import importlib.util, json, sys
import grain.python  # (imports jax) before the peak is reset: not the pipeline's memory
spec = importlib.util.spec_from_file_location("_bench_data", {__file__!r})
mod = importlib.util.module_from_spec(spec)
sys.modules["jaxdyn.bench.common"] = type(sys)("jaxdyn.bench.common")  # jax-free stand-in
spec.loader.exec_module(mod)
r = mod.drain(sys.argv[1], *map(int, sys.argv[2:]))
print({MARK!r} + json.dumps(r), flush=True)
"""


def _iterator(folder: str, batch: int, seq_len: int) -> GrainTextIterator:
    d = DataConfig()
    return GrainTextIterator([PreparedDocs(folder, "train")], [1.0], seq_len=seq_len,
                             batch_size=batch, seed=0, pad_id=byte_tokenizer().pad_id,
                             threads=d.prefetch_threads, buffer=d.prefetch_buffer,
                             workers=d.workers)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def _reset_peak() -> int:
    """Reset the peak RSS to the current RSS (Linux: /proc/self/clear_refs "5"), so the imports'
    own peak does not hide the pipeline's; returns the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None else _rss_peak()


def _rss_peak() -> int:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def drain(folder: str, batch: int, seq_len: int, batches: int, warmup: int = 5) -> dict:
    """Time `batches` batches after `warmup`; tokens/s, the peak RSS before the iterator was
    built (`base_rss`: interpreter and imports) and after the batches (`peak_rss`)."""
    base = _reset_peak()
    it = _iterator(folder, batch, seq_len)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    it.close()
    return {"tokens_per_s": batches * batch * seq_len / dt, "seconds": dt,
            "base_rss": base, "peak_rss": _rss_peak()}


def _corpus(folder: str, copies: int, max_files: int) -> str:
    """A .jsonl of the builtin corpus `copies` times (each copy's documents distinct)."""
    path = os.path.join(folder, f"corpus-{copies}x.jsonl")
    files = builtin_corpus_files()[:max_files or None]
    with open(path, "w", encoding="utf-8") as out:
        for c in range(copies):
            for f in files:
                with open(f, encoding="utf-8", errors="replace") as src:
                    out.write(json.dumps({"text": f"# copy {c}\n" + src.read()}) + "\n")
    return path


def run(preset_name: str, ctx: dict) -> list[dict]:
    p = common.get_preset(preset_name)
    tiny = preset_name == "tiny"
    batches = 20 if tiny else 400
    max_files = 60 if tiny else 0
    tok = byte_tokenizer()
    train_tps = float(ctx.get("train_tokens_per_s") or TRAIN_TOKENS_PER_S)
    rows = []
    with tempfile.TemporaryDirectory(prefix="jaxdyn_bench_data_") as d:
        folders = {}
        for copies in (1, 10):
            src = _corpus(d, copies, max_files)
            folders[copies] = os.path.join(d, f"prepared-{copies}x")
            prepare(SourceSpec(src), tok, folders[copies], shards=8)
            os.remove(src)
        r = drain(folders[1], p.batch, p.seq_len, batches)
        ratio = r["tokens_per_s"] / train_tps
        rows.append({"suite": "data", "name": "pipeline tokens/s", "impl": "jaxdyn",
                     "tokens_per_s": r["tokens_per_s"], "ratio": ratio,
                     "ref": f"trainer small: {train_tps:,.0f} tokens/s",
                     "target": f">= {THROUGHPUT_TARGET:.0f}x trainer",
                     "meets_target": ratio >= THROUGHPUT_TARGET,
                     "notes": f"B={p.batch} T={p.seq_len}, {batches} batches, threads "
                              f"{DataConfig().prefetch_threads}, workers {DataConfig().workers}"})
        peaks = {}
        for copies, folder in folders.items():
            code = CHILD
            proc = subprocess.run([sys.executable, "-c", code, folder, str(p.batch),
                                   str(p.seq_len), str(batches)], capture_output=True,
                                  text=True, timeout=ctx.get("timeout", 1800),
                                  env={**os.environ, "JAX_PLATFORMS": "cpu"})
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
            if proc.returncode or not lines:
                rows.append({"suite": "data", "name": f"peak RSS {copies}x", "impl": "jaxdyn",
                             "meets_target": False,
                             "notes": f"failed (rc {proc.returncode}): {proc.stderr[-400:]}"})
                return rows
            peaks[copies] = json.loads(lines[-1][len(MARK):])
        growth = peaks[10]["peak_rss"] / peaks[1]["peak_rss"]
        inc = {c: (v["peak_rss"] - v["base_rss"]) / 2**20 for c, v in peaks.items()}
        docs = {c: len(PreparedDocs(f, "train")) for c, f in folders.items()}
        rows.append({"suite": "data", "name": "peak RSS, corpus 10x vs 1x", "impl": "jaxdyn",
                     "peak_mem_bytes": peaks[10]["peak_rss"],
                     "ref_peak_mem_bytes": peaks[1]["peak_rss"],
                     "ratio": growth, "ref": "1x corpus", "target": f"<= {RSS_TARGET:.2f}x",
                     "meets_target": growth <= RSS_TARGET,
                     "notes": f"train documents {docs[1]} vs {docs[10]}; subprocess peak RSS "
                              f"{peaks[1]['peak_rss'] / 2**20:.0f} vs "
                              f"{peaks[10]['peak_rss'] / 2**20:.0f} MiB, of which the "
                              f"pipeline {inc[1]:.1f} vs {inc[10]:.1f} MiB"})
    return rows

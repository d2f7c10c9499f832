"""Suite `attention`: peak memory and time of a packed train step, blockwise vs XLA attention.

The step is forward + backward (parameter gradients of the chunked next-token loss) of the
preset's model shape (the `small` preset: D 384, 8 layers, 6 query / 2 kv heads, Hd 64) on one
packed row of several documents plus trailing padding, at T = 1k, 2k, 4k, 8k (256…2k for the
CI preset `tiny`), once with
`attention_impl="blockwise"` and once with the dense-mask reference `"xla"`.

Peak memory is the compiled executable's `memory_analysis()`: temp + argument + output bytes.
It is a property of the compiled program, deterministic on CPU and independent of machine
load, so it needs no idle machine. Time is the median of `repeats` calls after a warm-up; it is
skipped (memory still reported) when the program would need more than half the free memory.

Each row's `ratio` is its memory growth against the same implementation at T/2. Target: ≤ 2.3×
per doubling for the blockwise path (activations grow linearly in T; attention's O(T·block)
working set does not add a T² term; the block is at most half the shortest T, since one tile as
long as the row would itself grow as T²). The dense reference grows towards 4× (its [T, T] mask and
per-head probabilities).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxdyn.bench import common
from jaxdyn.model import build, init_params
from jaxdyn.model.loss import lm_loss

LENGTHS = (1024, 2048, 4096, 8192)
TINY_LENGTHS = (256, 512, 1024, 2048)  # preset `tiny` (CI: `--suite all --preset tiny`)
IMPLS = ("blockwise", "xla")
GROWTH_TARGET = 2.3  # memory growth per doubling of T, blockwise path
PAD_FRACTION = 0.05  # trailing padding (segment 0) of the packed row


def packed_row(T: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(positions [1, T], segment ids [1, T]): documents of 128..1024 tokens, then padding."""
    rng = np.random.default_rng(seed)
    pos, seg = np.zeros((1, T), np.int32), np.zeros((1, T), np.int32)
    t, doc, end = 0, 1, int(T * (1 - PAD_FRACTION))
    while t < end:
        n = min(int(rng.integers(128, 1025)), end - t)
        pos[0, t:t + n], seg[0, t:t + n] = np.arange(n), doc
        t, doc = t + n, doc + 1
    return pos, seg


def free_bytes() -> int | None:
    """Available memory (Linux `MemAvailable`), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def step_fn(mcfg):
    """jit(grad of the packed-row LM loss) for model config `mcfg`."""
    model = build(mcfg)

    def loss(params, tokens, pos, seg):
        out = model.apply({"params": params}, tokens, pos, seg, compute_logits=False)
        return lm_loss(out.hidden, out.unembed, tokens, seg)[0]

    return jax.jit(jax.grad(loss))


def measure(preset: common.Preset, impl: str, T: int, repeats: int, block: int) -> dict:
    """Peak bytes from memory_analysis and (if it fits) the median step seconds."""
    mcfg = common.model_config(preset, attention_impl=impl, attention_block=block,
                               max_position_embeddings=max(T, preset.model.get(
                                   "max_position_embeddings", T)))
    params = jax.eval_shape(lambda r: init_params(mcfg, r), jax.random.key(0))
    pos, seg = packed_row(T)
    tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)
    step = step_fn(mcfg)
    compiled = step.lower(params, tokens, jax.ShapeDtypeStruct(pos.shape, jnp.int32),
                          jax.ShapeDtypeStruct(seg.shape, jnp.int32)).compile()
    mem = compiled.memory_analysis()
    peak = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
    row = {"peak_mem_bytes": peak, "temp_bytes": int(mem.temp_size_in_bytes),
           "documents": int(seg.max())}
    avail = free_bytes()
    if repeats > 0 and (avail is None or peak < avail // 2):
        real = init_params(mcfg, jax.random.key(0))
        tok = jax.random.randint(jax.random.key(1), (1, T), 0, mcfg.vocab_size, jnp.int32)
        args = (real, tok, jnp.asarray(pos), jnp.asarray(seg))
        t = common.time_fn(lambda: compiled(*args), repeats)
        row.update(step_ms=1e3 * t["median_s"], tokens_per_s=T / t["median_s"],
                   compile_s=t["warmup_s"])
    else:
        row["timing_skipped"] = "needs more than half the free memory" if repeats > 0 else "0"
    return row


def run(preset_name: str, ctx: dict) -> list[dict]:
    p = common.get_preset(preset_name)
    lengths = tuple(ctx.get("attention_lengths")
                    or (TINY_LENGTHS if preset_name == "tiny" else LENGTHS))
    repeats = int(ctx.get("attention_repeats", p.repeats))
    # A tile as long as the row would be quadratic in T: keep at least two blocks per row.
    block = min(common.model_config(p).attention_block, lengths[0] // 2)
    rows, by_impl = [], {}
    for impl in IMPLS:
        prev = None
        for T in lengths:
            m = measure(p, impl, T, repeats, block)
            row = {"suite": "attention", "name": f"T={T}", "impl": impl, "seq_len": T, **m,
                   "notes": f"packed row, {m['documents']} documents, "
                            f"{int(100 * PAD_FRACTION)}% padding; "
                            f"temp {m['temp_bytes'] / 2**20:,.0f} MiB"}
            if prev is not None:
                growth = (m["peak_mem_bytes"] / prev["peak_mem_bytes"]) ** (
                    1.0 / np.log2(T / prev["seq_len"]))
                row.update(ratio=growth, ref=f"T={prev['seq_len']} (memory, per doubling)")
                if impl == "blockwise":
                    row.update(target=f"memory <= {GROWTH_TARGET}x per doubling",
                               meets_target=bool(growth <= GROWTH_TARGET))
            by_impl[(impl, T)] = row
            rows.append(row)
            prev = row
    for T in lengths:  # blockwise against the reference at the same length
        b, x = by_impl[("blockwise", T)], by_impl[("xla", T)]
        b["notes"] += f"; {x['peak_mem_bytes'] / b['peak_mem_bytes']:.1f}x less than xla"
    rows[0]["notes"] += f"; block {block}, cpu {os.cpu_count()}"
    return rows

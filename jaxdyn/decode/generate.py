"""KV-cached, jitted autoregressive generation for every architecture.

Prompts are left-padded to a bucketed length so the prefill compiles once per bucket; the decode
step has fully static shapes ([B, 1] tokens, [B, S] cache) and compiles once per
(config, sampling, batch, cache size). Routed models decode with their causal routers
(`routing_mode="causal"`), so a routed layer's cache holds keys only for tokens it processed.

On a mesh (given, or the one the params are placed on) the steps are jitted with in/out
shardings: parameters by the rules table (`jaxdyn.sharding`, as in training), prompts, tokens
and KV caches split along the batch over the `batch` rule's axes (data x fsdp; the batch is
padded with copies of the last prompt to a multiple of that size, the copies dropped) and the
cache's KV heads over `tensor`. Greedy output equals one device's; sampled output depends on
the padded batch size.

Dimension legend: B batch, P padded prompt length, S cache slots, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdyn import sharding
from jaxdyn.decode.sampling import SamplingConfig, sample
from jaxdyn.model import ModelConfig, build, init_cache, param_shardings
from jaxdyn.model.routing.causal import cache_overflow


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt (EOS included when emitted)
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    # Per prompt: selected tokens a compact routed KV cache had no room for (treated as not
    # selected, docs/features/routing.md §7); all zeros for dense models and full caches.
    cache_overflow: list[int] = dataclasses.field(default_factory=list)

    @property
    def tokens_per_sec(self) -> float:
        """Decode throughput over all rows (new tokens after the first / decode time)."""
        n = sum(max(len(t) - 1, 0) for t in self.tokens)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def _seen_update(seen_BV, tok_B):
    if seen_BV is None:
        return None
    return seen_BV.at[jnp.arange(tok_B.shape[0]), tok_B].set(True)


@functools.lru_cache(maxsize=16)
def trunk_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
    """The rules-table shardings of `cfg`'s parameters on `mesh` (cached)."""
    return param_shardings(cfg, mesh)


@functools.lru_cache(maxsize=16)
def cache_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
    """KV-cache shardings: the batch dimension over the `batch` rule's axes, KV heads over
    `tensor` where they divide; the write index replicated. The batch dimension of each leaf
    is found by comparing the cache shapes of two batch sizes."""
    n = sharding.batch_multiple(mesh)
    a, b = (jax.eval_shape(lambda k=k: init_cache(cfg, k, 1)) for k in (n, 2 * n))
    batch_axes = dict(sharding.RULES)["batch"]

    def one(x, y):
        spec = [None] * len(x.shape)
        for d, (i, j) in enumerate(zip(x.shape, y.shape, strict=True)):
            if i != j:
                spec[d] = batch_axes
                if len(x.shape) == d + 4:  # [..., B, S, K, Hd] keys/values
                    spec[d + 2] = "tensor"
        return NamedSharding(mesh, sharding.fit_spec(x.shape, PartitionSpec(*spec), mesh))

    return jax.tree.map(one, a, b)


def _empty_cache(cfg: ModelConfig, batch: int, slots: int, mesh: Mesh | None):
    if mesh is None:
        return init_cache(cfg, batch, slots)
    return _cache_fn(cfg, batch, slots, mesh)()


@functools.lru_cache(maxsize=16)
def _cache_fn(cfg: ModelConfig, batch: int, slots: int, mesh: Mesh) -> Callable:
    """An empty cache made on the devices in its shardings (no full copy anywhere)."""
    return jax.jit(lambda: init_cache(cfg, batch, slots), out_shardings=cache_shardings(cfg, mesh))


def compiled_steps(cfg: ModelConfig, sampling: SamplingConfig, mesh: Mesh | None = None
                   ) -> tuple[Callable, Callable]:
    """(prefill, decode_step), jitted (with in/out shardings on `mesh`: see the module
    docstring); cached so repeated calls never recompile. Call them under
    `jax.set_mesh(mesh)` and `sharding.rules_context()` when a mesh is given."""
    return _compiled_steps(cfg, sampling, mesh)


@functools.lru_cache(maxsize=16)
def _compiled_steps(cfg: ModelConfig, sampling: SamplingConfig, mesh: Mesh | None
                    ) -> tuple[Callable, Callable]:
    model = build(cfg, routing_mode="causal")
    track_seen = sampling.repetition_penalty != 1.0

    def prefill(params, tokens_BP, pos_BP, valid_BP, cache, rng):
        out = model.apply({"params": params}, tokens_BP, pos_BP, valid_BP.astype(jnp.int32),
                          cache)
        seen = None
        if track_seen:
            hit_BPV = jax.nn.one_hot(tokens_BP, cfg.vocab_size, dtype=bool) & valid_BP[..., None]
            seen = jnp.any(hit_BPV, axis=1)
        tok_B = sample(out.logits[:, -1], jax.random.fold_in(rng, 0), sampling, seen)
        return tok_B, out.cache, _seen_update(seen, tok_B)

    def decode_step(params, tok_B, pos_B, cache, seen_BV, rng, step):
        out = model.apply({"params": params}, tok_B[:, None], pos_B[:, None], None, cache)
        nxt_B = sample(out.logits[:, 0], jax.random.fold_in(rng, step), sampling, seen_BV)
        return nxt_B, out.cache, _seen_update(seen_BV, nxt_B)

    if mesh is None:
        return jax.jit(prefill, donate_argnums=(4,)), jax.jit(decode_step, donate_argnums=(3,))
    p_sh, c_sh = trunk_shardings(cfg, mesh), cache_shardings(cfg, mesh)
    rows, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    seen_sh = rows if track_seen else None
    return (jax.jit(prefill, donate_argnums=(4,), in_shardings=(p_sh, rows, rows, rows, c_sh, rep),
                    out_shardings=(rows, c_sh, seen_sh)),
            jax.jit(decode_step, donate_argnums=(3,),
                    in_shardings=(p_sh, rows, rows, c_sh, seen_sh, rep, rep),
                    out_shardings=(rows, c_sh, seen_sh)))


def place_params(cfg: ModelConfig, params, mesh: Mesh) -> dict:
    """The model's own parameters (feature subtrees such as heads dropped) in their
    rules-table shardings on `mesh`; a no-op for params already placed so."""
    p_sh = trunk_shardings(cfg, mesh)
    return jax.device_put({k: params[k] for k in p_sh}, p_sh)


def left_pad(prompts: Sequence[Sequence[int]], bucket: int, pad_id: int = 0):
    """tokens, positions, valid [B, P] with P the longest prompt rounded up to `bucket`."""
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token (e.g. BOS)")
    longest = max(len(p) for p in prompts)
    P = -(-longest // bucket) * bucket
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    valid = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = p
        valid[i, P - len(p):] = True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    return tokens, positions, valid


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             eos_id: int | None = None, bucket: int = 16,
             on_tokens: Callable[[int, np.ndarray], None] | None = None,
             mesh: Mesh | None = None) -> GenerationResult:
    """Generate up to `max_new_tokens` per prompt; rows stop after emitting `eos_id`.

    `on_tokens(step, tokens_B)` is called after each step (for streaming). `mesh`: shard the
    computation over it (default: the mesh the params are placed on, if any).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    mesh = mesh if mesh is not None else sharding.mesh_of(params)
    n_real = len(prompts)
    if mesh is not None and prompts:
        params = place_params(cfg, params, mesh)
        prompts = list(prompts) + [prompts[-1]] * (-n_real % sharding.batch_multiple(mesh))
    with _on(mesh):
        return _generate(cfg, params, prompts, n_real, max_new_tokens, sampling, seed, eos_id,
                         bucket, on_tokens, mesh)


def _on(mesh: Mesh | None):
    """The mesh and the rules table while tracing and running (nothing without a mesh)."""
    stack = contextlib.ExitStack()
    if mesh is not None:
        stack.enter_context(jax.set_mesh(mesh))
        stack.enter_context(sharding.rules_context())
    return stack


def _generate(cfg, params, prompts, n_real, max_new_tokens, sampling, seed, eos_id, bucket,
              on_tokens, mesh) -> GenerationResult:
    tokens, positions, valid = left_pad(prompts, bucket)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's context of {cfg.max_position_embeddings}; shorten the "
                         "prompt or ask for fewer tokens")
    B, P = tokens.shape
    S = P + -(-max_new_tokens // bucket) * bucket
    prefill, decode_step = compiled_steps(cfg, sampling, mesh)
    rng = jax.random.key(seed)
    pos_B, step_of = jnp.asarray(positions[:, -1] + 1), jnp.int32
    if mesh is not None:  # host inputs as global arrays (multi-host safe)
        rows, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
        pos_B = sharding.put_global(positions[:, -1] + 1, rows)
        tokens, positions, valid = (sharding.put_global(x, rows)
                                    for x in (tokens, positions, valid))
        rng = jax.device_put(rng, rep)
        step_of = lambda s: sharding.put_global(np.int32(s), rep)  # noqa: E731

    t0 = time.perf_counter()
    tok_B, cache, seen = prefill(params, tokens, positions, valid,
                                 _empty_cache(cfg, B, S, mesh), rng)
    host_tok = sharding.to_host(tok_B)[:n_real]
    t1 = time.perf_counter()
    out = [[int(t)] for t in host_tok]
    done = np.zeros(n_real, bool) if eos_id is None else host_tok == eos_id
    if on_tokens:
        on_tokens(0, host_tok)
    steps = 0
    for step in range(1, max_new_tokens):
        if done.all():
            break
        tok_B, cache, seen = decode_step(params, tok_B, pos_B, cache, seen, rng, step_of(step))
        pos_B = pos_B + 1
        host_tok = sharding.to_host(tok_B)[:n_real]
        steps += 1
        for i, t in enumerate(host_tok):
            if not done[i]:
                out[i].append(int(t))
        if eos_id is not None:
            done |= host_tok == eos_id
        if on_tokens:
            on_tokens(step, host_tok)
    t2 = time.perf_counter()
    per_row = np.asarray(sharding.to_host(cache_overflow(cache)))  # [B], or 0-d: no routed cache
    overflow = [int(x) for x in np.broadcast_to(per_row, (len(tok_B),))[:n_real]]
    if any(overflow):
        warnings.warn(f"compact routed KV cache overflow: {overflow} selected tokens per prompt "
                      "were skipped for lack of cache room; raise model.routing.cache_fraction "
                      "(1 = full-size caches)", stacklevel=3)
    return GenerationResult(out, t1 - t0, t2 - t1, steps, overflow)


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` cut at the first of the stop strings, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def sample_text(cfg: ModelConfig, params, tok, prompt: str, max_new_tokens: int,
                temperature: float = 0.0, seed: int = 0, mesh: Mesh | None = None) -> str:
    """The continuation of one text prompt (EOS dropped), decoded to text; `mesh` as in
    `generate`."""
    ids = tok.encode(prompt) or [tok.eos_id]
    res = generate(cfg, params, [ids], max_new_tokens, SamplingConfig(temperature=temperature),
                   seed=seed, eos_id=tok.eos_id, mesh=mesh)
    new = res.tokens[0]
    return tok.decode(new[:-1] if new and new[-1] == tok.eos_id else new)


def prompt_sample(sample_cfg, cfg: ModelConfig, params, tok) -> str | None:
    """A run config's `sample` block (prompt, max_new_tokens, temperature) as the line the
    trainer prints at the end; None when max_new_tokens is 0."""
    if sample_cfg.max_new_tokens < 1:
        return None
    text = sample_text(cfg, params, tok, sample_cfg.prompt, sample_cfg.max_new_tokens,
                       sample_cfg.temperature)
    return f"{sample_cfg.prompt!r} -> {text!r}"

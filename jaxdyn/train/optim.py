"""Optimiser construction from the `train` config block, plus LoRA.

Parameters are addressed by slash paths (`layers/attn/q/kernel`, `lora/layers.attn.q.kernel/a`),
and every per-parameter choice (learning-rate group, frozen or trainable, weight decay) is a
list of regex rules matched in order — one mechanism for the MoD/DTF learning-rate groups
(routing spec §6), multi-token head groups, frozen backbones and LoRA.

The optimised tree is `{"params": model params, "lora": LoRA factors or {}}`; rule paths are
written without the leading `params/`. Gradient accumulation is the trainer's (a scan over
micro-batches inside the step), so one `tx.update` is one optimizer step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

FROZEN = "__frozen__"


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def rule_paths(tree) -> Any:
    """Tree of rule-matching paths (`params/` prefix removed)."""
    def strip(p):
        s = path_str(p)
        return s[len("params/"):] if s.startswith("params/") else s
    return jax.tree_util.tree_map_with_path(lambda p, _: strip(p), tree)


def first_match(path: str, rules: Sequence[tuple[str, Any]], default):
    for pattern, value in rules:
        if re.search(pattern, path):
            return value
    return default


def make_schedule(tc) -> optax.Schedule:
    """Linear warm-up from 0 to `lr`, then cosine/linear decay to `lr * min_lr_ratio`."""
    warm = max(int(tc.warmup_steps), 0)
    decay_steps = max(int(tc.steps) - warm, 1)
    if tc.decay == "cosine":
        decay = optax.cosine_decay_schedule(tc.lr, decay_steps, alpha=tc.min_lr_ratio)
    elif tc.decay == "linear":
        decay = optax.linear_schedule(tc.lr, tc.lr * tc.min_lr_ratio, decay_steps)
    elif tc.decay == "constant":
        decay = optax.constant_schedule(tc.lr)
    else:
        raise ValueError(f"train.decay={tc.decay!r}; use 'cosine', 'linear' or 'constant'")
    if not warm:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, tc.lr, warm), decay], [warm])


def group_labels(tree, tc) -> Any:
    """Label per leaf: FROZEN, or the LR multiplier (as a string) of its group."""
    trainable = list(tc.trainable)

    def label(path: str) -> str:
        if not path.startswith("lora/"):
            named = any(re.search(p, path) for p in trainable)
            if (trainable or tc.lora.enabled) and not named:
                return FROZEN  # with LoRA the factors train; base weights only when named
        return str(float(first_match(path, tc.lr_groups, 1.0)))

    return jax.tree.map(label, rule_paths(tree))


def trainable_mask(tree, tc) -> Any:
    """True for leaves the optimizer updates."""
    return jax.tree.map(lambda lab: lab != FROZEN, group_labels(tree, tc))


def decay_mask(tree, tc) -> Any:
    return jax.tree.map(lambda p: not any(re.search(r, p) for r in tc.no_decay), rule_paths(tree))


def make_optimizer(tc, tree) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule): frozen grads zeroed first (so they neither count in the clipping norm
    nor get computed, nor hold Adam state), global-norm clipping, then AdamW per LR group."""
    schedule = make_schedule(tc)
    labels = group_labels(tree, tc)
    frozen = jax.tree.map(lambda lab: lab == FROZEN, labels)
    mask = decay_mask(tree, tc)
    transforms = {FROZEN: optax.set_to_zero()}
    for lab in set(jax.tree.leaves(labels)) - {FROZEN}:
        mult = float(lab)
        transforms[lab] = optax.adamw(lambda s, m=mult: schedule(s) * m, b1=tc.b1, b2=tc.b2,
                                      eps=tc.eps, weight_decay=tc.weight_decay, mask=mask)
    parts = [optax.masked(optax.set_to_zero(), frozen)]
    if tc.clip_norm and tc.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(tc.clip_norm))
    parts.append(optax.multi_transform(transforms, labels))
    return optax.chain(*parts), schedule


def trainable_fraction(tree, tc) -> float:
    sizes = jax.tree.leaves(jax.tree.map(lambda x: int(x.size), tree))
    keep = jax.tree.leaves(trainable_mask(tree, tc))
    total = sum(sizes)
    return sum(s for s, k in zip(sizes, keep, strict=True) if k) / max(total, 1)


# ----------------------------------------------------------------------------- LoRA
# Hu et al., 2021: W' = W + (alpha / r) · A·B with B = 0 at init, so training starts at W.


def _lora_split(path: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(leading layer dims, input size, output size) of a kernel, from its path."""
    lead = 1 if path.startswith("layers/") else 0  # scanned stacks carry a [U] axis
    n_in = 2 if "/attn/o/" in path else 1  # o maps [N, Hd] -> [D]
    dims = shape[lead:]
    return lead, math.prod(dims[:n_in]), math.prod(dims[n_in:])


def init_lora(params, lc, rng) -> dict:
    """LoRA factors {"a": [.., in, r], "b": [.., r, out]} for kernels whose module name is in
    `lc.targets` (e.g. `q`, `down`); keys are the kernel paths with dots for slashes."""
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = jax.random.split(rng, max(len(flat), 1))
    for (p, w), k in zip(flat, keys, strict=True):
        path = path_str(p)
        parts = path.split("/")
        if parts[-1] != "kernel" or len(parts) < 2 or parts[-2] not in lc.targets:
            continue
        lead, d_in, d_out = _lora_split(path, w.shape)
        lead_shape = w.shape[:lead]
        a = jax.random.normal(k, (*lead_shape, d_in, lc.rank), jnp.float32) / math.sqrt(d_in)
        b = jnp.zeros((*lead_shape, lc.rank, d_out), jnp.float32)
        out[path.replace("/", ".")] = {"a": a, "b": b}
    if not out:
        raise ValueError(f"train.lora.targets={list(lc.targets)} matched no kernel; use module "
                         "names such as q, k, v, o, gate, up, down")
    return out


def merge_lora(params, lora: dict, alpha: float, rank: int) -> Any:
    """Base params with every LoRA update folded in (inside the loss, and for export)."""
    if not lora:
        return params
    scale = alpha / rank

    def merge(p, w):
        key = path_str(p).replace("/", ".")  # dots: checkpoint keys must not contain slashes
        if key not in lora:
            return w
        ab = jnp.matmul(lora[key]["a"], lora[key]["b"])
        return (w + scale * ab.reshape(w.shape)).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(merge, params)

"""The one optimizer builder: AdamW per learning-rate group from the `train` config block.

Parameters are addressed by slash paths (`layers/attn/q/kernel`, `lora/layers/attn/q/a`),
and every per-parameter choice (learning-rate group, frozen or trainable, weight decay) is a
list of regex rules matched in order — one mechanism for the MoD/DTF learning-rate groups
(docs/features/routing.md), multi-token head groups, frozen backbones and LoRA.

The optimised tree is `{"params": model params, "lora": LoRA factors or {}}`; rule paths are
written without the leading `params/`. Gradient accumulation is the trainer's (a scan over
micro-batches inside the step), so one `tx.update` is one optimizer step.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
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


def group_labels(tree, tc, trainable: Sequence[str] = ()) -> Any:
    """Label per leaf: FROZEN, or the LR multiplier (as a string) of its group. `trainable`:
    regexes of the trainable params (() = all; LoRA factors always train)."""
    trainable = list(trainable)

    def label(path: str) -> str:
        if not path.startswith("lora/"):
            named = any(re.search(p, path) for p in trainable)
            if (trainable or tc.lora.enabled) and not named:
                return FROZEN  # with LoRA the factors train; base weights only when named
        return str(float(first_match(path, tc.lr_groups, 1.0)))

    return jax.tree.map(label, rule_paths(tree))


def trainable_mask(tree, tc, trainable: Sequence[str] = ()) -> Any:
    """True for leaves the optimizer updates."""
    return jax.tree.map(lambda lab: lab != FROZEN, group_labels(tree, tc, trainable))


def decay_mask(tree, tc) -> Any:
    return jax.tree.map(lambda p: not any(re.search(r, p) for r in tc.no_decay), rule_paths(tree))


def make_optimizer(tc, tree, trainable: Sequence[str] = ()
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule): frozen grads zeroed first (so they neither count in the clipping norm
    nor get computed, nor hold Adam state), global-norm clipping, then AdamW per LR group."""
    schedule = make_schedule(tc)
    labels = group_labels(tree, tc, trainable)
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


def trainable_fraction(tree, tc, trainable: Sequence[str] = ()) -> float:
    sizes = jax.tree.leaves(jax.tree.map(lambda x: int(x.size), tree))
    keep = jax.tree.leaves(trainable_mask(tree, tc, trainable))
    total = sum(sizes)
    return sum(s for s, k in zip(sizes, keep, strict=True) if k) / max(total, 1)

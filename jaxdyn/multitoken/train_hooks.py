"""Multi-token heads inside the general trainer (`python -m jaxdyn.train --config configs/mtp.py`).

A config with an `mtp` block (configs/mtp.py) trains `MultiTokenLM`; any other config trains
the plain `CausalLM`. `jaxdyn.train.loop` calls these hooks where it builds the model, its
parameters and their shardings, so nothing else in the trainer knows about heads:

- `train_model(cfg)`: an object with CausalLM's training surface. Its output carries head 1's
  hidden states (the trainer's own `lm_loss` gives L_1) and, as an aux loss, the weighted
  losses of heads 2..n, `Σ_{i≥2} w_i L_i + (w_1 − 1) L_1`, so the trainer minimises
  `Σ_i w_i L_i`. Per-head `mtp/loss_i`, `mtp/ppl_i`, `mtp/acc_i` ride along in `aux["mtp"]`
  (`flat_metrics` turns them into log rows).
- `initial_params`, `init_params`, `param_shardings`: the dense ones plus `heads/...` (new heads
  random; an `init.checkpoint` dense import fills the stem and head 1 via `from_dense`).

The checkpoint is an ordinary workdir whose params hold `heads/`; `jaxdyn.decode.generate` and
`jaxdyn.evaluate.perplexity` detect it with `heads_of(params)`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdyn.model.loss import chunked_cross_entropy, shifted_targets
from jaxdyn.multitoken.heads import all_hidden, from_dense, grad_scale, multitoken_model
from jaxdyn.train.metrics import flatten_aux


def is_mtp(cfg) -> bool:
    """True for a trainer config with an `mtp` block (configs/mtp.py)."""
    return "mtp" in cfg


def _settings(cfg) -> dict:
    m = cfg.mtp
    n = int(m.n_heads)
    weights = tuple(m.get("weights", ()) or ()) or (1.0,) * n
    if len(weights) != n:
        raise ValueError(f"mtp.weights has {len(weights)} entries for mtp.n_heads={n}; give one "
                         "weight per head or () for all 1")
    ugs = m.get("unembed_grad_scale", m.get("stem_grad_scale", 0.1))
    return dict(n_heads=n, head_depth=int(m.get("head_depth", 1)),
                stem_grad_scale=float(m.get("stem_grad_scale", 0.1)),
                unembed_grad_scale=None if ugs is None else float(ugs), weights=weights,
                init_from_last_layer=bool(m.get("init_from_last_layer", False)))


class MTPTrainModel:
    """`apply(variables, tokens, positions, segment_ids, compute_logits=False)` like CausalLM,
    returning an object with `hidden` (head 1), `unembed`, `cache` and `aux` (see module doc)."""

    def __init__(self, mcfg, settings: dict, chunk: int):
        self.cfg, self.s, self.chunk = mcfg, settings, chunk
        self.module = multitoken_model(mcfg, settings["n_heads"], settings["head_depth"],
                                   settings["stem_grad_scale"])

    def apply(self, variables, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None,
              compute_logits: bool = False):
        from jaxdyn.model.decoder import ModelOutput

        out = self.module.apply(variables, tokens_BT, positions_BT, segment_ids_BT, cache)
        hidden = all_hidden(out)
        extra, mets = jnp.zeros((), jnp.float32), {}
        for i in range(1, self.s["n_heads"] + 1):
            tgt_BT, mask_BT = shifted_targets(tokens_BT, segment_ids_BT, i)
            h_BTD, w_DV = hidden[i - 1], out.unembed
            if i == 1:  # the trainer's lm_loss trains head 1; this is a forward-only metric
                h_BTD, w_DV = jax.lax.stop_gradient((h_BTD, w_DV))
            elif self.s["unembed_grad_scale"] is not None:
                w_DV = grad_scale(w_DV, self.s["unembed_grad_scale"])
            loss_i, m = chunked_cross_entropy(h_BTD, w_DV, tgt_BT, mask_BT, self.chunk)
            w = self.s["weights"][i - 1]
            if i > 1:
                extra = extra + w * loss_i
            elif w != 1.0:  # the trainer adds L_1 itself; this makes it w_1 L_1
                extra = extra + (w - 1.0) * chunked_cross_entropy(
                    hidden[0], out.unembed, tgt_BT, mask_BT, self.chunk)[0]
            mets.update({f"mtp/loss_{i}": loss_i, f"mtp/ppl_{i}": jnp.exp(loss_i),
                         f"mtp/acc_{i}": m["accuracy"]})
        aux = {"losses": {"mtp_heads": extra}, "metrics": {}, "mtp": mets}
        logits = None
        if compute_logits:
            logits = jnp.einsum("btd,dv->btv", hidden[0], out.unembed.astype(hidden.dtype),
                                preferred_element_type=jnp.float32)
        return ModelOutput(logits=logits, hidden=hidden[0], unembed=out.unembed,
                           cache=out.cache, aux=aux)


def train_model(cfg, routing_mode: str = "topk"):
    """The model object the trainer applies: MTPTrainModel for MTP configs, else CausalLM
    (`routing_mode` "causal": a routed model decides with its causal routers)."""
    from jaxdyn.config import loader as configlib
    from jaxdyn.model import build

    mcfg = configlib.model_config(cfg)
    if not is_mtp(cfg):
        return build(mcfg, routing_mode)
    return MTPTrainModel(mcfg, _settings(cfg), int(cfg.train.loss_chunk))


def init_params(cfg, rng: jax.Array) -> dict:
    """Random parameters of the configured model (heads included for MTP configs)."""
    from jaxdyn.config import loader as configlib
    from jaxdyn.model import init_params as dense_init

    mcfg = configlib.model_config(cfg)
    if not is_mtp(cfg):
        return dense_init(mcfg, rng)
    s = _settings(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    return nn.unbox(multitoken_model(mcfg, s["n_heads"], s["head_depth"]).init(
        rng, tokens)["params"])


def initial_params(cfg, rng: jax.Array, mesh=None) -> tuple[Any, list[str]]:
    """`train_setup.initial_params` (random or `init.checkpoint`, created in `mesh`'s
    shardings) plus the heads for MTP configs: the dense tensors are consumed unchanged,
    heads 2..n are new."""
    from jaxdyn.train.setup import initial_params as dense_initial

    k_dense, k_heads = jax.random.split(rng)
    params, report = dense_initial(cfg, k_dense, mesh)
    if not is_mtp(cfg):
        return params, report
    from jaxdyn.config import loader as configlib
    s = _settings(cfg)
    params, rep = from_dense(configlib.model_config(cfg), params, s["n_heads"], k_heads,
                             s["head_depth"], s["init_from_last_layer"])
    return params, report + [f"mtp: {s['n_heads']} heads, {len(rep.new)} new head tensors "
                             f"({rep.extra_params / 1e6:.3f}M params, overhead "
                             f"{100 * rep.overhead:.2f}%)"]


def param_shardings(cfg, mesh) -> Any:
    """Parameter shardings from the logical axes (the heads' stacked axis is `layers`)."""
    from jaxdyn import sharding
    from jaxdyn.config import loader as configlib
    mcfg = configlib.model_config(cfg)
    if not is_mtp(cfg):
        return sharding.param_shardings(mcfg, mesh)
    s = _settings(cfg)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    boxed = jax.eval_shape(lambda r, t: multitoken_model(mcfg, s["n_heads"], s["head_depth"]).init(
        r, t)["params"], jax.random.key(0), tokens)
    return sharding.logical_to_sharding(boxed, mesh)


def flat_metrics(aux: dict) -> dict[str, float]:
    """`flatten_aux` plus the per-head `mtp/...` scalars (absent for other models)."""
    out = flatten_aux(aux)
    out.update({k: float(v) for k, v in aux.get("mtp", {}).items()})
    return out

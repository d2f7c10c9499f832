"""lm-evaluation-harness adapter: the `lm_eval` model "jaxdyn" for any jaxdyn checkpoint.

    pip install -e ".[eval]"
    python -m jaxdyn.evaluate --checkpoint runs/std --tasks arc_challenge,hellaswag
    # or, in Python:
    import lm_eval
    from jaxdyn.evaluate.lm_eval import JaxdynLM  # registers the lm_eval model "jaxdyn"
    lm_eval.simple_evaluate(model="jaxdyn", model_args="checkpoint=runs/std", tasks=[...])

`JaxdynScorer` does the work and needs no lm_eval: `loglikelihood` scores continuations
(tokenized like lm_eval's causal `TemplateLM`: whole string encoded, then split, trailing
context spaces moved to the continuation; an empty context conditions on BOS, else EOS),
`loglikelihood_rolling` scores whole texts in disjoint windows of `max_length` tokens (each
window conditions on the token before it, lm_eval's `context_len=1`), `generate_until` decodes
greedily (or samples) with `jaxdyn.decode.generate` and cuts at the stop strings. Scoring runs one
jitted forward per right-padded batch; routed models (MoD, DTF) use their causal routers, as in
generation, so no score sees future tokens. `JaxdynLM` wraps the scorer as an `lm_eval` LM.

A `mesh` (or `data=`, `fsdp=`, `tensor=` model args) shards the model as training does: the
checkpoint is read straight into its rules-table shardings, each scoring batch is split over
the `batch` rule's axes (data x fsdp; `batch_size` is rounded up to a multiple of their size)
and generation runs on the same mesh (`jaxdyn.decode.generate`).

Dimension legend: B batch, T padded length, V vocab.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxdyn import sharding
from jaxdyn.checkpoint import load_for_inference
from jaxdyn.decode.generate import generate, place_params, truncate_at_stop, trunk_shardings
from jaxdyn.decode.sampling import SamplingConfig
from jaxdyn.model import ModelConfig, build


@functools.lru_cache(maxsize=8)
def _score_fn(cfg: ModelConfig, mesh: Mesh | None = None):
    """Jitted (tokens [B, T], targets [B, T]) -> (target log-prob, target is arg-max)."""
    model = build(cfg, routing_mode="causal")

    def fn(params, tokens_BT, targets_BT, valid_BT):
        pos_BT = jnp.maximum(jnp.cumsum(valid_BT, axis=1) - 1, 0).astype(jnp.int32)
        out = model.apply({"params": params}, tokens_BT, pos_BT, valid_BT.astype(jnp.int32))
        logp_BTV = jax.nn.log_softmax(out.logits, axis=-1)
        lp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], -1)[..., 0]
        return lp_BT, jnp.argmax(out.logits, -1) == targets_BT

    if mesh is None:
        return jax.jit(fn)
    rows = sharding.batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(trunk_shardings(cfg, mesh), rows, rows, rows),
                   out_shardings=rows)


class JaxdynScorer:
    """Log-likelihoods and generations of a jaxdyn checkpoint (workdir or import folder), or
    of an in-memory (cfg, params, tokenizer); sharded over `mesh` when one is given (default:
    the mesh the params are placed on, if any)."""

    def __init__(self, checkpoint: str | None = None, *, cfg: ModelConfig | None = None,
                 params=None, tokenizer=None, batch_size: int = 8, max_length: int | None = None,
                 bucket: int = 32, mesh: Mesh | None = None):
        if checkpoint is not None:
            cfg, params, tokenizer = load_for_inference(checkpoint, mesh)
        if cfg is None or params is None or tokenizer is None:
            raise ValueError("give checkpoint=DIR, or cfg, params and tokenizer")
        self.mesh = mesh if mesh is not None else sharding.mesh_of(params)
        if self.mesh is not None:
            params = place_params(cfg, params, self.mesh)
            batch_size = -(-int(batch_size) // sharding.batch_multiple(self.mesh)) * \
                sharding.batch_multiple(self.mesh)
        self.cfg, self.params, self.tok = cfg, params, tokenizer
        self.batch_size, self.bucket = int(batch_size), int(bucket)
        self.max_length = int(max_length or cfg.max_position_embeddings)
        if self.max_length > cfg.max_position_embeddings:
            raise ValueError(f"max_length={self.max_length} exceeds the model's context of "
                             f"{cfg.max_position_embeddings}")

    @property
    def prefix_id(self) -> int:
        """What an empty context conditions on: BOS when the tokenizer has one, else EOS."""
        return self.tok.eos_id if self.tok.bos_id is None else self.tok.bos_id

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.prefix_id], self.tok.encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, ctx = self.tok.encode(context + continuation), self.tok.encode(context)
        return ctx, whole[len(ctx):]

    def score_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
                     ) -> list[tuple[float, bool]]:
        """(Σ log p(continuation | context), continuation is the greedy one) per pair; the
        input is truncated from the left to `max_length` tokens."""
        fn = _score_fn(self.cfg, self.mesh)
        rows = []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("empty continuation: nothing to score")
            if not ctx:
                raise ValueError("empty context: condition on at least one token (BOS/EOS)")
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]
            rows.append((full[:-1], full[1:], len(cont)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            T = -(-max(len(rows[i][0]) for i in idx) // self.bucket) * self.bucket
            B = self.batch_size  # a fixed batch shape: one compile per length bucket
            tokens, targets = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
            valid = np.zeros((B, T), bool)
            for r, i in enumerate(idx):
                inp, tgt, _ = rows[i]
                tokens[r, :len(inp)], targets[r, :len(tgt)], valid[r, :len(inp)] = inp, tgt, True
            lp, greedy = self._run(fn, tokens, targets, valid)
            for r, i in enumerate(idx):
                n_in, n_cont = len(rows[i][0]), min(rows[i][2], len(rows[i][0]))
                sl = slice(n_in - n_cont, n_in)
                out[i] = (float(np.sum(lp[r, sl], dtype=np.float64)), bool(np.all(greedy[r, sl])))
        return out

    def _run(self, fn, *batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.mesh is None:
            return jax.device_get(fn(self.params, *batch))
        rows = sharding.batch_sharding(self.mesh)
        with jax.set_mesh(self.mesh), sharding.rules_context():
            out = fn(self.params, *(sharding.put_global(x, rows) for x in batch))
        return tuple(sharding.to_host(x) for x in out)

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.score_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Total log-likelihood of each text (every token, the first given BOS/EOS)."""
        pairs, owner = [], []
        for k, text in enumerate(texts):
            ids = self.tok.encode(text)
            seq = [self.prefix_id] + ids
            for s in range(0, len(ids), self.max_length):
                pairs.append((seq[s:s + 1], ids[s:s + self.max_length]))
                owner.append(k)
        totals = [0.0] * len(texts)
        for k, (lp, _) in zip(owner, self.score_tokens(pairs), strict=True):
            totals[k] += lp
        return totals

    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        """Continuations cut at the first stop string (`until`, default EOS only)."""
        outs = []
        for context, kw in requests:
            kw = dict(kw or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", 256))
            temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            ids = self.tok.encode(context) or [self.prefix_id]
            ids = ids[-max(self.max_length - max_new, 1):]
            res = generate(self.cfg, self.params, [ids], max_new,
                           SamplingConfig(temperature=temp), seed=int(kw.get("seed", 0)),
                           eos_id=self.tok.eos_id, mesh=self.mesh)
            new = [t for t in res.tokens[0] if t != self.tok.eos_id]
            outs.append(truncate_at_stop(self.tok.decode(new), until)[0])
        return outs


def _lm_class():
    """Define and register `JaxdynLM` (needs lm_eval: `pip install -e ".[eval]"`)."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError as e:
        raise ImportError('the lm_eval adapter needs lm-evaluation-harness: pip install -e '
                          '".[eval]" (or pip install "lm-eval>=0.4")') from e

    @register_model("jaxdyn")
    class JaxdynLM(LM):
        """`lm_eval --model jaxdyn --model_args checkpoint=DIR,batch_size=8,max_length=2048`;
        add `data=…,fsdp=…,tensor=…` to shard over a mesh of every device (`make_mesh`:
        one of them may be -1; default data=-1, fsdp=1, tensor=1 when any is given)."""

        def __init__(self, checkpoint: str | None = None, batch_size: int | str = 8,
                     max_length: int | str | None = None, scorer: JaxdynScorer | None = None,
                     data: int | str | None = None, fsdp: int | str | None = None,
                     tensor: int | str | None = None, **_ignored):
            super().__init__()
            bs = 8 if str(batch_size).startswith("auto") else int(batch_size)
            mesh = None
            if (data, fsdp, tensor) != (None, None, None):
                mesh = sharding.make_mesh(int(-1 if data is None else data), int(fsdp or 1),
                                          int(tensor or 1))
            self.scorer = scorer or JaxdynScorer(
                checkpoint, batch_size=bs, max_length=None if max_length is None
                else int(max_length), mesh=mesh)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood([r.args for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.scorer.generate_until([r.args for r in requests])

    return JaxdynLM


def __getattr__(name: str):  # `from jaxdyn.evaluate.lm_eval import JaxdynLM` registers it
    if name == "JaxdynLM":
        cls = _lm_class()
        globals()["JaxdynLM"] = cls
        return cls
    raise AttributeError(name)


def run_tasks(cfg: ModelConfig, params, tokenizer, tasks: Sequence[str], *, batch_size: int = 8,
              max_length: int | None = None, num_fewshot: int | None = None,
              limit: float | None = None, include_path: str | None = None,
              mesh: Mesh | None = None) -> dict:
    """lm-evaluation-harness results (`results` of `simple_evaluate`) of a loaded model
    (sharded over `mesh`, default the one the params are placed on)."""
    import lm_eval  # optional dependency: pip install -e ".[eval]"
    from lm_eval.tasks import TaskManager

    scorer = JaxdynScorer(cfg=cfg, params=params, tokenizer=tokenizer, batch_size=batch_size,
                          max_length=max_length, mesh=mesh)
    lm = __getattr__("JaxdynLM")(scorer=scorer)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot,
                                  limit=limit, task_manager=TaskManager(include_path=include_path),
                                  log_samples=False)
    return res["results"]

"""Suite `profile`: one train step taken apart, op by op, jaxdyn beside PyTorch.

For the preset's shapes, each op is timed forward (`fwd`) and forward + backward
(`fwd+bwd`) on both sides, in interleaved rounds (`jaxdyn.bench.protocol.interleave`), so every
row carries its load, spread and noisy flag like the other suites:

- embedding: `jnp.take(table, tokens)` | `embed_tokens`;
- rmsnorm: `layers.Norm` | `Qwen2RMSNorm` (`input_layernorm`);
- attention: `attention.Attention` (q/k/v/o, RoPE, attention) | `rotary_emb` + `Qwen2Attention`;
- mlp: `layers.MLP` (SwiGLU) | `Qwen2MLP`;
- decoder layer: `block.DecoderLayer` | `rotary_emb` + `Qwen2DecoderLayer`;
- lm head + CE: `model.loss.lm_loss` (vocab-chunked) | `lm_head` + `F.cross_entropy`;
- optimizer (pass `update`): the trainer's optax chain (clip + AdamW) on the whole tree,
  donated | `clip_grad_norm_` + `torch.optim.AdamW.step`;
- train step: trunk + loss `fwd` and `fwd+bwd` (the trainer's loss function | HF
  `model(labels=)`), `backward` = their difference (derived), `whole` = the steps of suite
  `train` (jaxdyn's trainer step | the reference's AdamW step).

The PyTorch modules are those of `common.hf_model` (layer 0 for the per-layer ops), and the
jaxdyn parameters are converted from its weights (`conversion.mapping`), so both sides compute
the same function on the same inputs (tests/bench/test_profile.py checks the forwards).
`fwd+bwd` takes the gradient with respect to the float inputs and the parameters for a fixed
random cotangent (`jax.vjp` / `out.backward(ct)`); PyTorch's `fwd` runs under `no_grad`, as
jaxdyn's jitted forward keeps no residuals. Columns: `jaxdyn_ms`, `torch_ms`, `ratio` =
torch ms ÷ jaxdyn ms (> 1: jaxdyn faster), `per_step` (how often the op runs in one step),
`share` = per_step × jaxdyn ms ÷ jaxdyn's whole step (`torch_share` likewise), `spread` = the
larger of the two sides' spreads.

`xla_sweep` (`--xla-sweep`): jaxdyn's whole train step alone re-timed in one subprocess per
`XLA_FLAGS` set (the flags are read when the backend starts), the default set first and again
last; each set's whole step against the mean of the two defaults (`ratio` = default ms ÷ ms,
> 1: faster). A row's spread is the larger of its own and the two default runs' difference
(÷ their mean), so drift between the subprocesses makes the sweep noisy (`protocol.judge`);
each worker's own load facts are kept in `child_facts`. The hidden worker is
`python -m jaxdyn.bench --worker profile --child=FLAGS --preset-json ...` (prints MARK + one
JSON line).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from conversion import mapping
from jaxdyn import sharding
from jaxdyn.bench import common, protocol, train
from jaxdyn.model import abstract_params, init_params, stack_layers
from jaxdyn.model.attention import Attention
from jaxdyn.model.block import DecoderLayer
from jaxdyn.model.layers import MLP, Norm
from jaxdyn.model.loss import lm_loss
from jaxdyn.train import create_train_state, schema
from jaxdyn.train.objectives import make_objective
from jaxdyn.train.setup import make_mesh
from jaxdyn.train.step import variables_of

MARK = "PROFILE_RESULT "
# XLA:CPU flag sets tried by `--xla-sweep` (each one on top of the caller's XLA_FLAGS). Only
# flags jaxlib 0.10 parses: an unknown flag aborts the backend (that set's row then says so);
# `--xla_cpu_use_thunk_runtime` is accepted but "no longer supported" (ignored), and
# `--xla_cpu_use_onednn`, `--xla_cpu_experimental_xnn_graph_fusion_mode=..._GREEDY` left the
# compiled dots of a matmul's fwd+bwd unchanged, so they are left out.
XLA_CANDIDATES = (
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_use_xnnpack=true",
    # dots go to YNNPACK one by one by default, except shapes it cannot take (a transposed
    # lhs: the weight gradients), which stay on Eigen; these move all dots to Eigen, or also
    # elementwise and reduce ops to YNNPACK
    "--xla_cpu_experimental_ynn_fusion_type=-individual_dot",
    "--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce",
)
STEP = "train step"
COMPONENTS = ("embedding", "rmsnorm", "attention", "mlp", "decoder layer", "lm head + CE")
OPS = (*COMPONENTS, "optimizer", STEP)
SWEEP = (STEP, "whole")  # what a sweep worker times (jaxdyn only): the trainer's step


@dataclasses.dataclass
class Pair:
    """One (op, pass) measured on both sides; `check` gives both forward outputs (numpy)."""

    op: str
    pass_: str  # fwd | fwd+bwd | update | whole
    per_step: int  # how many times the op runs in one train step
    jaxdyn: Callable[[], Any]
    torch: Callable[[], Any] | None
    check: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None


# ----------------------------------------------------------------------------- weights


def params_from_torch(mcfg, model) -> dict:
    """jaxdyn parameters (scanned or unrolled as `mcfg` says) holding the weights of the
    transformers model `model`, by the conversion tables."""
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    flat = {}
    for name, (rule, i) in mapping.expand(mcfg, mapping.rules_for(mcfg), set(sd)).items():
        for path, arr in zip(rule.jx, rule.load(sd[name]), strict=True):
            flat[path if i is None else f"layers_{i}/{path}"] = arr
    tree: dict = {}
    for path, arr in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(arr, jnp.dtype(mcfg.param_dtype))
    tree = stack_layers(tree) if mcfg.scan_layers else tree
    want = jax.tree.structure(jax.tree.map(lambda x: 0, abstract_params(mcfg),
                                           is_leaf=lambda x: hasattr(x, "unbox")))
    got = jax.tree.structure(jax.tree.map(lambda x: 0, tree))
    if want != got:
        raise ValueError(f"converted reference weights do not match the model tree:\n{got}\n"
                         f"vs\n{want}")
    return tree


# ----------------------------------------------------------------------------- both sides


def _jax_fns(f: Callable, args: tuple, diff: tuple[int, ...], ct, mesh):
    """(fwd, fwd+bwd) no-argument callables of `f(*args)`: the jitted forward, and the jitted
    vjp with cotangent `ct` w.r.t. the args at positions `diff`."""
    def grads(*a):
        def g(*d):
            full = list(a)
            for i, x in zip(diff, d, strict=True):
                full[i] = x
            return f(*full)
        out, vjp = jax.vjp(g, *(a[i] for i in diff))
        return vjp(jax.tree.map(lambda o, c: c.astype(o.dtype), out, ct))

    fwd, bwd = jax.jit(f), jax.jit(grads)

    def call(fn):
        def run():
            with jax.set_mesh(mesh), sharding.rules_context():
                return fn(*args)
        return run
    return call(fwd), call(bwd)


def _torch_fns(f: Callable, leaves: list, ct):
    """(fwd, fwd+bwd) of the torch callable `f()`: under no_grad, and with `backward(ct)`
    after clearing the grads of `leaves` (parameters and inputs that require them)."""
    import torch

    def fwd():
        with torch.no_grad():
            return f()

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        out = f()
        out.backward(ct)
        return [t.grad for t in leaves]
    return fwd, fwd_bwd


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(jax.device_get(x), dtype=np.float32)


def build(preset_name: str, with_torch: bool = True, ops: tuple[str, ...] = OPS) -> list[Pair]:
    """Every (op, pass) pair of the preset (`ops` of OPS only); torch side None without torch
    (then the jaxdyn parameters are random)."""
    p = common.get_preset(preset_name)
    cfg = common.train_config(p)
    mcfg = schema.model_config(cfg)
    mesh = make_mesh(cfg)
    B, T, D, V = (cfg.train.batch_size, cfg.train.seq_len, mcfg.hidden_size, mcfg.vocab_size)
    with_torch = with_torch and p.torch and common.torch_available()
    ref = None
    if with_torch:
        common.torch_threads()
        ref = common.hf_model(mcfg, dtype="float32").train()
        params = params_from_torch(mcfg, ref)
    else:
        params = jax.jit(lambda r: init_params(mcfg, r))(jax.random.key(1))
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((B, T, D), dtype=np.float32),
            "ct": rng.standard_normal((B, T, D), dtype=np.float32),
            "ids": rng.integers(0, V, (B, T)).astype(np.int32)}
    jax_side = _jax_components(cfg, mcfg, params, data)
    torch_side = _torch_components(mcfg, ref, data) if with_torch else {}
    pairs: list[Pair] = []
    for op, (f, args, diff, ct, per_step) in jax_side.items():
        if op not in ops:
            continue
        jfwd, jbwd = _jax_fns(f, args, diff, ct, mesh)
        tfwd = tbwd = check = None
        if op in torch_side:
            tfwd, tbwd = _torch_fns(*torch_side[op])
            check = lambda jfwd=jfwd, tfwd=tfwd: (_np(jfwd()), _np(tfwd()))
        pairs.append(Pair(op, "fwd", per_step, jfwd, tfwd, check))
        pairs.append(Pair(op, "fwd+bwd", per_step, jbwd, tbwd))
    if "optimizer" in ops:
        pairs.append(_optimizer_pair(cfg, params, mesh, ref))
    if STEP in ops:
        pairs += _step_pairs(cfg, params, jnp.asarray(data["ids"]), mesh, ref)
    return pairs


def _jax_components(cfg, mcfg, params, data) -> dict[str, tuple]:
    """op -> (f, args, indices of the differentiated args, cotangent, times per step)."""
    B, T = data["ids"].shape
    L = mcfg.num_layers
    dt, pdt = jnp.dtype(mcfg.dtype), jnp.dtype(mcfg.param_dtype)
    x, ct = jnp.asarray(data["x"], dt), jnp.asarray(data["ct"], dt)
    ids = jnp.asarray(data["ids"])
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    ctx = {"pos_BT": pos, "seg_BT": None, "attn_mask_BTT": None}
    layer0 = (jax.tree.map(lambda a: a[0], params["layers"]) if mcfg.scan_layers
              else params["layers_0"])
    w_DV = params["embed"]["embedding"].T if mcfg.tie_embeddings else params["unembed"]["kernel"]
    norm = Norm(mcfg.norm_type, mcfg.norm_eps, dt, pdt)
    attn, mlp, layer = Attention(mcfg), MLP(mcfg), DecoderLayer(mcfg)

    def head(h, w):
        return lm_loss(h, w, ids, None, chunk=cfg.train.loss_chunk, z_loss=cfg.train.z_loss)[0]

    return {
        "embedding": (lambda t, i: jnp.take(t, i, axis=0).astype(dt),
                      (params["embed"]["embedding"], ids), (0,), ct, 1),
        "rmsnorm": (lambda w, h: norm.apply({"params": w}, h), (layer0["attn_norm"], x),
                    (0, 1), ct, 2 * L + 1),
        "attention": (lambda w, h: attn.apply({"params": w}, h, ctx)[0], (layer0["attn"], x),
                      (0, 1), ct, L),
        "mlp": (lambda w, h: mlp.apply({"params": w}, h), (layer0["mlp"], x), (0, 1), ct, L),
        "decoder layer": (lambda w, h: layer.apply({"params": w}, h, None, ctx)[0],
                          (layer0, x), (0, 1), ct, L),
        "lm head + CE": (head, (x, w_DV), (0, 1), jnp.ones((), jnp.float32), 1),
    }


def _torch_components(mcfg, ref, data) -> dict[str, tuple]:
    """op -> (f, tensors whose grads fwd+bwd computes, cotangent): the reference's modules."""
    import torch

    T, V = data["ids"].shape[1], mcfg.vocab_size
    x = torch.from_numpy(data["x"]).requires_grad_(True)
    ct = torch.from_numpy(data["ct"])
    ids = torch.from_numpy(data["ids"]).long()
    pos = torch.arange(T)[None]
    layer, rotary = ref.model.layers[0], ref.model.rotary_emb
    # HF's causal-LM loss: labels padded with -100 and shifted, so no logits are sliced.
    labels = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:].reshape(-1)
    w = lambda m: list(m.parameters())

    def head():
        logits = ref.lm_head(x).float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels,
                                                 ignore_index=-100)

    return {
        "embedding": (lambda: ref.model.embed_tokens(ids), w(ref.model.embed_tokens), ct),
        "rmsnorm": (lambda: layer.input_layernorm(x), [*w(layer.input_layernorm), x], ct),
        "attention": (lambda: layer.self_attn(x, rotary(x, pos), None)[0],
                      [*w(layer.self_attn), x], ct),
        "mlp": (lambda: layer.mlp(x), [*w(layer.mlp), x], ct),
        "decoder layer": (lambda: layer(x, attention_mask=None, position_ids=pos,
                                        position_embeddings=rotary(x, pos)),
                          [*w(layer), x], ct),
        "lm head + CE": (head, [*w(ref.lm_head), x], torch.ones(())),
    }


def _optimizer_pair(cfg, params, mesh, ref) -> Pair:
    """The trainer's optax chain (frozen mask, clip, AdamW per group) on the whole tree with
    params and state donated, vs clip_grad_norm_ + AdamW.step on a copy of the reference."""
    own = jax.tree.map(jnp.copy, params)  # donated below: keep the components' weights
    state = create_train_state(cfg, jax.random.key(0), params=own, mesh=mesh)
    tx = state.tx
    grads = jax.tree.map(lambda a: jnp.full_like(a, 1e-3), state.params)

    def update(tree, opt_state, g):
        updates, opt_state = tx.update(g, opt_state, tree)
        return optax.apply_updates(tree, updates), opt_state

    update = jax.jit(update, donate_argnums=(0, 1))
    box = [state.params, state.opt_state]

    def jstep():
        box[:] = update(box[0], box[1], grads)
        return box

    tstep = None
    if ref is not None:
        import torch

        model = copy.deepcopy(ref)
        ps = list(model.parameters())
        for p in ps:
            p.grad = torch.full_like(p, 1e-3)
        t = cfg.train
        opt = torch.optim.AdamW(ps, lr=t.lr, betas=(t.b1, t.b2), eps=t.eps,
                                weight_decay=t.weight_decay)

        def tstep():
            torch.nn.utils.clip_grad_norm_(ps, t.clip_norm)
            opt.step()
    return Pair("optimizer", "update", 1, jstep, tstep)


def _step_pairs(cfg, params, ids, mesh, ref) -> list[Pair]:
    """Trunk + loss forward and forward + backward (the trainer's loss function), and the
    trainer's whole step (suite `train`), each beside the reference."""
    objective = make_objective(cfg)
    model = objective.model()
    B, T = ids.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    batch = {"tokens": ids, "positions": pos, "segment_ids": None}
    tree = {"params": params, "lora": {}}
    key = jax.random.key(0)

    def loss_fn(tr, b):
        loss, stats, _ = objective.loss(model, variables_of(tr, cfg), b, key)
        return loss, stats

    fwd = jax.jit(loss_fn)
    bwd = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

    def inside(fn):
        def run():
            with jax.set_mesh(mesh), sharding.rules_context():
                return fn(tree, batch)
        return run

    jfwd, jbwd = inside(fwd), inside(bwd)
    whole = train.jaxdyn_step(cfg)
    tfwd = tbwd = twhole = check = None
    if ref is not None:
        import torch

        tids = torch.from_numpy(np.array(ids)).long()

        def tfwd():
            with torch.no_grad():
                return ref(input_ids=tids, labels=tids).loss

        def tbwd():
            ref.zero_grad(set_to_none=True)
            loss = ref(input_ids=tids, labels=tids).loss
            loss.backward()
            return loss.detach()

        twhole = train.torch_step(schema.model_config(cfg), cfg.train.batch_size,
                                  cfg.train.seq_len)
        check = lambda: (_np(jfwd()[0]), _np(tfwd()))
    return [Pair(STEP, "fwd", 1, jfwd, tfwd, check), Pair(STEP, "fwd+bwd", 1, jbwd, tbwd),
            Pair(STEP, "whole", 1, whole, twhole)]


# ----------------------------------------------------------------------------- rows


def _row(pair: Pair, t: dict[str, dict]) -> dict:
    j, r = t["jaxdyn"], t.get("torch")
    row = {"suite": "profile", "name": f"{pair.op} {pair.pass_}", "impl": "jaxdyn",
           "op": pair.op, "pass": pair.pass_, "per_step": pair.per_step,
           "jaxdyn_ms": 1e3 * j["median_s"], "best_ms": 1e3 * j["best_s"],
           "spread_jaxdyn": j["spread"], "spread": j["spread"], "range": j["range"],
           "rounds": j["rounds"], "round_ms": [round(1e3 * x, 3) for x in j["times"]],
           "compile_s": j["warmup_s"]}
    if r is not None:
        row.update({"torch_ms": 1e3 * r["median_s"], "spread_torch": r["spread"],
                    "spread": max(j["spread"], r["spread"]),
                    "round_ms_torch": [round(1e3 * x, 3) for x in r["times"]],
                    "ratio": r["median_s"] / j["median_s"], "ref": "torch"})
    return row


def _backward_row(fwd: dict, both: dict) -> dict:
    """`backward` = fwd+bwd − fwd of the train step (derived, not timed on its own)."""
    row = {"suite": "profile", "name": f"{STEP} backward", "impl": "jaxdyn", "op": STEP,
           "pass": "backward", "per_step": 1, "derived": True,
           "jaxdyn_ms": both["jaxdyn_ms"] - fwd["jaxdyn_ms"],
           "spread": max(fwd["spread"], both["spread"]), "rounds": both["rounds"],
           "notes": "fwd+bwd − fwd (derived)"}
    if both.get("torch_ms") is not None and fwd.get("torch_ms") is not None:
        row["torch_ms"] = both["torch_ms"] - fwd["torch_ms"]
        row["ratio"] = row["torch_ms"] / row["jaxdyn_ms"] if row["jaxdyn_ms"] > 0 else None
        row["ref"] = "torch"
    return row


def _shares(rows: list[dict]) -> None:
    whole = next((r for r in rows if r.get("op") == STEP and r.get("pass") == "whole"), None)
    if whole is None:
        return
    for r in rows:
        r["share"] = r["per_step"] * r["jaxdyn_ms"] / whole["jaxdyn_ms"]
        if r.get("torch_ms") is not None and whole.get("torch_ms"):
            r["torch_share"] = r["per_step"] * r["torch_ms"] / whole["torch_ms"]


def time_pairs(pairs: list[Pair], rounds: int, warmup: int = 2,
               pause_s: float = protocol.PAUSE_S) -> list[dict]:
    """One row per pair, each timed in its own interleaved jaxdyn/torch rounds, plus the
    train step's derived backward row; shares of the jaxdyn whole step."""
    rows = []
    for pair in pairs:
        fns = {"jaxdyn": pair.jaxdyn}
        if pair.torch is not None:
            fns["torch"] = pair.torch
        rows.append(_row(pair, protocol.interleave(fns, rounds, warmup, pause_s)))
    by = {(r["op"], r["pass"]): r for r in rows}
    if (STEP, "fwd") in by and (STEP, "fwd+bwd") in by:
        i = rows.index(by[(STEP, "fwd+bwd")]) + 1
        rows.insert(i, _backward_row(by[(STEP, "fwd")], by[(STEP, "fwd+bwd")]))
    _shares(rows)
    for r in rows:
        r["notes"] = r.get("notes") or NOTES.get(r["op"], "")
    return rows


NOTES = {"optimizer": "optax chain of the trainer (mask, clip, AdamW; no decay on norm/bias/"
                      "embed) vs clip_grad_norm_ + torch AdamW (decay on all)",
         STEP: "trunk + chunked loss / HF model(labels=); whole = suite train's steps",
         "lm head + CE": "lm_loss (chunked, + accuracy) vs lm_head + F.cross_entropy"}


# ----------------------------------------------------------------------------- the suite


def run(preset_name: str, ctx: dict) -> list[dict]:
    p = common.get_preset(preset_name)
    pairs = build(preset_name)
    rows = time_pairs(pairs, p.repeats, ctx.get("warmup", 2), ctx.get("pause_s",
                                                                      protocol.PAUSE_S))
    if ctx.get("xla_sweep"):
        sets = ctx["xla_sweep"]
        sets = XLA_CANDIDATES if sets is True else tuple(sets)
        rows += sweep(preset_name, sets, ctx)
    return rows


def child(preset: dict) -> dict:
    """A sweep worker: jaxdyn's whole train step (`SWEEP`) under this process's XLA_FLAGS,
    one untimed warm-up call after the compiling one, with the protocol's load facts."""
    name = "__profile_child__"
    common.LOADED[name] = common.Preset(**preset)
    with protocol.Watch(0.0) as watch:
        pairs = [q for q in build(name, with_torch=False, ops=(SWEEP[0],))
                 if (q.op, q.pass_) == SWEEP]
        rows = time_pairs(pairs, common.LOADED[name].repeats)
    return {"xla_flags": os.environ.get("XLA_FLAGS", ""), "facts": watch.facts(),
            "ops": {f"{r['op']} {r['pass']}": {"ms": r["jaxdyn_ms"], "spread": r["spread"]}
                    for r in rows}}


def worker_command(flags: str, preset_json: str) -> list[str]:
    return [sys.executable, "-m", "jaxdyn.bench", "--worker", "profile", f"--child={flags}",
            "--preset-json", preset_json]


def sweep(preset_name: str, sets: tuple[str, ...], ctx: dict) -> list[dict]:
    """The train step of jaxdyn under each XLA_FLAGS set (own subprocess each), the default
    before and after them; one row per set."""
    preset = json.dumps(dataclasses.asdict(common.get_preset(preset_name)))
    base = os.environ.get("XLA_FLAGS", "")
    order = ["", *sets, ""]
    results = []
    for flags in order:
        env = dict(os.environ, XLA_FLAGS=" ".join(x for x in (base, flags) if x))
        env.setdefault("JAX_PLATFORMS", "cpu")
        try:
            proc = subprocess.run(worker_command(flags or "default", preset), env=env,
                                  capture_output=True, text=True,
                                  timeout=ctx.get("timeout", 1800))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
            ok = proc.returncode == 0 and lines
            res = json.loads(lines[-1][len(MARK):]) if ok else None
            err = "" if ok else " ".join(f"failed (rc {proc.returncode}): "
                                         f"{proc.stderr[-300:]}".split())
            if ok and "no longer supported" in proc.stderr:
                err = "XLA: flag no longer supported (ignored)"
        except subprocess.TimeoutExpired:
            res, err = None, "timed out"
        results.append((flags, res, err))
    key = " ".join(SWEEP)
    defaults = [r["ops"][key]["ms"] for f, r, _ in (results[0], results[-1]) if r and not f]
    ref_ms = sum(defaults) / len(defaults) if defaults else None
    drift = (max(defaults) - min(defaults)) / ref_ms if len(defaults) == 2 else None
    rows = []
    for i, (flags, res, err) in enumerate(results):
        label = flags or ("default" if i == 0 else "default (again)")
        row = {"suite": "profile", "name": f"xla {label}", "impl": "jaxdyn",
               "op": f"{STEP} (XLA_FLAGS)", "pass": "whole", "xla_flags": flags,
               "notes": err}
        if res:
            w = res["ops"][key]
            row.update({"jaxdyn_ms": w["ms"], "spread": w["spread"],
                        "ops_ms": {k: v["ms"] for k, v in res["ops"].items()},
                        "child_facts": res["facts"]})
            if ref_ms:
                row.update({"ratio": ref_ms / w["ms"], "ref": "default flags"})
            if drift is not None and drift > w["spread"]:
                # the reference's own uncertainty: its two runs bracket the sweep
                row["spread"] = drift
                row["notes"] = "; ".join(x for x in (err, f"spread = drift of the two default "
                                                          f"runs {100 * drift:.0f}%") if x)
        rows.append(row)
    return rows

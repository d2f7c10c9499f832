"""Suites `forward` and `decode`: jaxdyn (jitted) vs transformers PyTorch, same config, same
machine, in one run.

forward: a [B, T] batch through the model, logits included (tokens/s over B·T).
decode: batch-1 greedy KV-cached generation of `new_tokens` after a `prompt_len` prompt
(jaxdyn.decode.generate vs `transformers` `generate`; tokens/s over the decoded tokens, prefill
excluded on both sides). Target: jaxdyn decode ≥ 2× transformers on CPU.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from jaxdyn.bench import common
from jaxdyn.decode.generate import generate
from jaxdyn.decode.sampling import SamplingConfig
from jaxdyn.model import build, init_params
from jaxdyn.model.routing.flops import routed_flops_per_token

DECODE_TARGET = 2.0


def _row(**kw) -> dict:
    return {"suite": kw.pop("suite"), **kw}


def run_forward(preset_name: str, ctx: dict) -> list[dict]:
    p = common.get_preset(preset_name)
    cfg = common.model_config(p)
    B, T = p.batch, p.seq_len
    params = init_params(cfg, jax.random.key(0))
    model = build(cfg)
    fwd = jax.jit(lambda prm, tok: model.apply({"params": prm}, tok).logits)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    t = common.time_fn(lambda: fwd(params, tokens), p.repeats)
    f_tok = routed_flops_per_token(cfg, T)["model"]
    peak = ctx["peaks"].get("peak_flops_measured")
    mem, src = common.peak_memory_bytes()
    jx = _row(suite="forward", name=f"forward B{B}xT{T}", impl="jaxdyn",
              tokens_per_s=B * T / t["best_s"], step_ms=1e3 * t["best_s"],
              mfu=common.mfu(f_tok, B * T / t["best_s"], peak),
              mfu_vendor=common.mfu(f_tok, B * T / t["best_s"],
                                    ctx["peaks"].get("peak_flops_vendor")), peak_mem_bytes=mem,
              compile_s=t["warmup_s"], notes=f"mem: {src}")
    rows = [jx]
    if p.torch and common.torch_available():
        import torch

        common.torch_threads()
        hf = common.hf_model(cfg)
        tt = torch.tensor(np.asarray(tokens), dtype=torch.long)
        with torch.inference_mode():
            tr = common.time_fn(lambda: hf(input_ids=tt).logits, p.repeats)
        ref = _row(suite="forward", name=f"forward B{B}xT{T}", impl="torch",
                   tokens_per_s=B * T / tr["best_s"], step_ms=1e3 * tr["best_s"],
                   mfu=common.mfu(f_tok, B * T / tr["best_s"], peak),
                   peak_mem_bytes=common.rss_peak_bytes(), notes="transformers sdpa; mem: rss")
        rows.append(ref)
        common.ratio_row(jx, ref, "torch")
    return rows


def run_decode(preset_name: str, ctx: dict) -> list[dict]:
    p = common.get_preset(preset_name)
    cfg = common.model_config(p)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, size=p.prompt_len).tolist()
    N = p.new_tokens
    greedy = SamplingConfig(temperature=0.0)
    generate(cfg, params, [prompt], N, greedy)  # compile prefill + decode step
    best = None
    for _ in range(p.repeats):
        res = generate(cfg, params, [prompt], N, greedy)
        if best is None or res.tokens_per_sec > best.tokens_per_sec:
            best = res
    jx = _row(suite="decode", name=f"decode B1 P{p.prompt_len}+{N}", impl="jaxdyn",
              tokens_per_s=best.tokens_per_sec,
              step_ms=1e3 * best.decode_seconds / max(best.decode_steps, 1),
              prefill_ms=1e3 * best.prefill_seconds, peak_mem_bytes=common.peak_memory_bytes()[0],
              notes="jaxdyn.decode.generate greedy, jitted step, donated cache")
    rows = [jx]
    if p.torch and common.torch_available():
        import torch

        common.torch_threads()
        hf = common.hf_model(cfg)
        ids = torch.tensor([prompt], dtype=torch.long)
        kw = dict(do_sample=False, max_new_tokens=N, min_new_tokens=N, pad_token_id=0,
                  eos_token_id=None)

        def prefill_s() -> float:
            with torch.inference_mode():
                t0 = time.perf_counter()
                hf.generate(ids, **{**kw, "max_new_tokens": 1, "min_new_tokens": 1})
                return time.perf_counter() - t0

        with torch.inference_mode():
            hf.generate(ids, **kw)  # warm-up
            times = []
            for _ in range(p.repeats):
                t0 = time.perf_counter()
                out = hf.generate(ids, **kw)
                times.append(time.perf_counter() - t0)
        n_new = int(out.shape[1] - ids.shape[1])
        pre = min(prefill_s() for _ in range(2))
        dec = max(min(times) - pre, 1e-9)
        ref = _row(suite="decode", name=f"decode B1 P{p.prompt_len}+{N}", impl="torch",
                   tokens_per_s=(n_new - 1) / dec, step_ms=1e3 * dec / max(n_new - 1, 1),
                   prefill_ms=1e3 * pre, peak_mem_bytes=common.rss_peak_bytes(),
                   notes="transformers generate greedy (prefill time subtracted)")
        rows.append(ref)
        common.torch_ratio_target(jx, ref, DECODE_TARGET)
    return rows

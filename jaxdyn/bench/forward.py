"""Suites `forward` and `decode`: jaxdyn (jitted) vs transformers PyTorch, same config, same
machine, in one run.

forward: a [B, T] batch through the model, logits included (tokens/s over B·T).
decode: batch-1 greedy KV-cached generation of `new_tokens` after a `prompt_len` prompt
(jaxdyn.decode.generate vs `transformers` `generate`; tokens/s over the decoded tokens, prefill
excluded on both sides). Both sides are timed in interleaved rounds (`jaxdyn.bench.protocol`)
and reported at their median round. Targets on CPU: forward ≥ 1.2×, decode ≥ 3× transformers.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from jaxdyn.bench import common, protocol
from jaxdyn.decode.generate import generate
from jaxdyn.decode.sampling import SamplingConfig
from jaxdyn.model import build, init_params
from jaxdyn.model.routing.flops import routed_flops_per_token

FORWARD_TARGET = 1.2
DECODE_TARGET = 3.0


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
    fns = {"jaxdyn": lambda: fwd(params, tokens)}
    if p.torch and common.torch_available():
        import torch

        common.torch_threads()
        hf = common.hf_model(cfg)
        tt = torch.tensor(np.asarray(tokens), dtype=torch.long)

        def torch_forward():
            with torch.inference_mode():
                return hf(input_ids=tt).logits

        fns["torch"] = torch_forward
    times = protocol.interleave(fns, p.repeats)
    f_tok = routed_flops_per_token(cfg, T)["model"]
    mem, src = common.peak_memory_bytes()
    extra = {"jaxdyn": {"peak_mem_bytes": mem, "notes": f"mem: {src}"},
             "torch": {"peak_mem_bytes": common.rss_peak_bytes(),
                       "notes": "transformers sdpa; mem: rss"}}
    rows = [common.timed_row("forward", f"forward B{B}xT{T}", impl, t, B * T, f_tok,
                             ctx["peaks"], **extra[impl]) for impl, t in times.items()]
    if len(rows) == 2:
        common.torch_ratio_target(rows[0], rows[1], FORWARD_TARGET)
    return rows


def run_decode(preset_name: str, ctx: dict) -> list[dict]:
    p = common.get_preset(preset_name)
    cfg = common.model_config(p)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, size=p.prompt_len).tolist()
    N = p.new_tokens
    greedy = SamplingConfig(temperature=0.0)
    last = {}

    def jaxdyn_decode() -> float:
        last["jaxdyn"] = res = generate(cfg, params, [prompt], N, greedy)
        return float(res.decode_seconds)  # prefill excluded

    fns = {"jaxdyn": jaxdyn_decode}
    if p.torch and common.torch_available():
        import torch

        common.torch_threads()
        hf = common.hf_model(cfg)
        ids = torch.tensor([prompt], dtype=torch.long)
        kw = dict(do_sample=False, max_new_tokens=N, min_new_tokens=N, pad_token_id=0,
                  eos_token_id=None)

        def hf_generate(**over) -> tuple[float, int]:
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = hf.generate(ids, **{**kw, **over})
                return time.perf_counter() - t0, int(out.shape[1] - ids.shape[1])

        hf_generate()  # warm-up
        prefill = min(hf_generate(max_new_tokens=1, min_new_tokens=1)[0] for _ in range(2))
        last["prefill"] = prefill

        def torch_decode() -> float:
            total, last["torch_new"] = hf_generate()
            return max(total - prefill, 1e-9)  # the first token comes with the prefill

        fns["torch"] = torch_decode
    times = protocol.interleave(fns, p.repeats)
    name = f"decode B1 P{p.prompt_len}+{N}"
    res = last["jaxdyn"]
    n_new = max(sum(len(t) - 1 for t in res.tokens), 1)  # as GenerationResult.tokens_per_sec
    t = times["jaxdyn"]
    jx = {"suite": "decode", "name": name, "impl": "jaxdyn", "tokens_per_s": n_new / t["median_s"],
          "step_ms": 1e3 * t["median_s"] / n_new, "spread": t["spread"], "rounds": t["rounds"],
          "prefill_ms": 1e3 * res.prefill_seconds,
          "peak_mem_bytes": common.peak_memory_bytes()[0],
          "notes": "jaxdyn.decode.generate greedy, jitted step, donated cache"}
    rows = [jx]
    if "torch" in times:
        t, n = times["torch"], max(last["torch_new"] - 1, 1)
        ref = {"suite": "decode", "name": name, "impl": "torch", "tokens_per_s": n / t["median_s"],
               "step_ms": 1e3 * t["median_s"] / n, "spread": t["spread"], "rounds": t["rounds"],
               "prefill_ms": 1e3 * last["prefill"], "peak_mem_bytes": common.rss_peak_bytes(),
               "notes": "transformers generate greedy (prefill time subtracted)"}
        rows.append(ref)
        common.torch_ratio_target(jx, ref, DECODE_TARGET)
    return rows

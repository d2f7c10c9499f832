"""KV-cached, jitted autoregressive generation for every architecture.

Prompts are left-padded to a bucketed length so the prefill compiles once per bucket; the decode
step has fully static shapes ([B, 1] tokens, [B, S] cache) and compiles once per
(config, sampling, batch, cache size). Routed models decode with their causal routers
(`routing_mode="causal"`), so a routed layer's cache holds keys only for tokens it processed.

Dimension legend: B batch, P padded prompt length, S cache slots, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdyn.decode.sampling import SamplingConfig, sample
from jaxdyn.model import ModelConfig, build, init_cache


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt (EOS included when emitted)
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

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
def compiled_steps(cfg: ModelConfig, sampling: SamplingConfig) -> tuple[Callable, Callable]:
    """(prefill, decode_step), jitted; cached so repeated calls never recompile."""
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

    return jax.jit(prefill, donate_argnums=(4,)), jax.jit(decode_step, donate_argnums=(3,))


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
             on_tokens: Callable[[int, np.ndarray], None] | None = None) -> GenerationResult:
    """Generate up to `max_new_tokens` per prompt; rows stop after emitting `eos_id`.

    `on_tokens(step, tokens_B)` is called after each step (for streaming).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    tokens, positions, valid = left_pad(prompts, bucket)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's context of {cfg.max_position_embeddings}; shorten the "
                         "prompt or ask for fewer tokens")
    B, P = tokens.shape
    S = P + -(-max_new_tokens // bucket) * bucket
    prefill, decode_step = compiled_steps(cfg, sampling)
    rng = jax.random.key(seed)

    t0 = time.perf_counter()
    tok_B, cache, seen = prefill(params, tokens, positions, valid, init_cache(cfg, B, S), rng)
    host_tok = np.asarray(tok_B)
    t1 = time.perf_counter()
    out = [[int(t)] for t in host_tok]
    done = np.zeros(B, bool) if eos_id is None else host_tok == eos_id
    if on_tokens:
        on_tokens(0, host_tok)
    pos_B = jnp.asarray(positions[:, -1] + 1)
    steps = 0
    for step in range(1, max_new_tokens):
        if done.all():
            break
        tok_B, cache, seen = decode_step(params, tok_B, pos_B, cache, seen, rng,
                                         jnp.int32(step))
        pos_B = pos_B + 1
        host_tok = np.asarray(tok_B)
        steps += 1
        for i, t in enumerate(host_tok):
            if not done[i]:
                out[i].append(int(t))
        if eos_id is not None:
            done |= host_tok == eos_id
        if on_tokens:
            on_tokens(step, host_tok)
    t2 = time.perf_counter()
    return GenerationResult(out, t1 - t0, t2 - t1, steps)


# ----------------------------------------------------------------------------- CLI


def load_for_inference(path: str):
    """(cfg, params, tokenizer) from a Hugging Face folder (converted on the fly), a
    `python -m conversion import` output, or a training workdir."""
    import os

    from jaxdyn.data.tokenizer import load_tokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
    if os.path.exists(os.path.join(path, "config.json")) and not os.path.exists(
            os.path.join(path, "model_config.json")):
        import conversion

        cfg, params = conversion.from_hf(path)
        return cfg, params, load_tokenizer(path)
    from jaxdyn.checkpoint import load_model

    cfg, params, tok_dir = load_model(path)
    return cfg, params, load_tokenizer(tok_dir)


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    import json

    if (prompt is None) == (prompts_file is None):
        raise SystemExit("give exactly one of --prompt TEXT or --prompts FILE.jsonl")
    if prompt is not None:
        return [prompt]
    texts = []
    with open(prompts_file) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                rec = json.loads(line)
                if "prompt" not in rec:
                    raise SystemExit(f"{prompts_file}:{n}: each line needs a \"prompt\" field")
                texts.append(rec["prompt"])
    return texts


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


MODES = ("plain", "multitoken", "verify")
_PLAIN_DEFAULTS = {"temperature": 0.0, "top_k": 0, "repetition_penalty": 1.0}


def _run_dynamo_block(checkpoint: str) -> dict:
    """The `dynamo` block of a training run's config.json (configs/mtp.py), else {}."""
    import json
    import os

    path = os.path.join(checkpoint, "config.json")
    if not os.path.exists(os.path.join(checkpoint, "model_config.json")) or \
            not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return dict(json.load(f).get("dynamo") or {})
    except (OSError, ValueError):
        return {}


def fill_sampling_defaults(args) -> None:
    """Unset sampling flags take the mode's defaults: plain/verify sample like plain decoding
    (greedy), multitoken uses DynaMo's (the run's `dynamo` block, else `DynamoOptions`)."""
    from jaxdyn.multitoken.grid import DynamoOptions

    if args.mode != "multitoken":
        for k, v in _PLAIN_DEFAULTS.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
        return
    base = dataclasses.asdict(DynamoOptions())
    run = _run_dynamo_block(args.checkpoint)
    for k in ("temperature", "top_k", "repetition_penalty", "threshold", "alpha_c",
              "penalty_window"):
        if getattr(args, k) is None:
            setattr(args, k, run.get(k, base[k]))
    args.adaptive = run.get("adaptive", True) and not args.no_adaptive
    args.blur = run.get("blur", True) and not args.no_blur
    args.cooccur_mode = args.cooccur_mode or run.get("mode", "ours")
    args.cooccur = args.cooccur or run.get("cooccur_dir") or None


def load_tables(args, cfg: ModelConfig, tok):
    """Co-occurrence tables for --mode multitoken, checked against the model's vocabulary."""
    import os

    from jaxdyn.multitoken.cooccur import CooccurTables

    path = args.cooccur or os.path.join(args.checkpoint, "cooccur")
    build = (f"build them with `python -m jaxdyn.multitoken.cooccur --data builtin --tokenizer "
             f"{args.checkpoint} --vocab_size {cfg.vocab_size} --out DIR` and pass --cooccur DIR")
    if not os.path.exists(os.path.join(path, "meta.json")):
        raise SystemExit(f"error: --mode multitoken needs co-occurrence tables; {path!r} has "
                         f"none: {build}")
    tables = CooccurTables(path)
    if tables.vocab_size != cfg.vocab_size:
        raise SystemExit(f"error: tables in {path!r} have V={tables.vocab_size}, the model "
                         f"V={cfg.vocab_size}: {build}")
    fp = tables.meta.get("fingerprint") or ""
    if fp and fp != tok.fingerprint():
        raise SystemExit(f"error: tables in {path!r} were counted with another tokenizer "
                         f"({fp} != {tok.fingerprint()}): {build}")
    return tables


def decode(args, cfg: ModelConfig, params, tok, prompts, on_tokens=None):
    """Run `--mode` on the prompts: (result with `.tokens`, summary for the stats line)."""
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    common = dict(seed=args.seed, eos_id=tok.eos_id, on_tokens=on_tokens)
    if args.mode == "plain":
        return generate(cfg, params, prompts, args.max_new_tokens, sampling, **common), ""
    from jaxdyn.multitoken.decode import generate_multitoken, generate_verify
    from jaxdyn.multitoken.heads import heads_of

    n, depth = heads_of(params)
    if n < 2 or cfg.arch != "dense":
        raise SystemExit(f"error: --mode {args.mode} needs a multi-token checkpoint (params with "
                         f"heads/, arch dense); {args.checkpoint!r} has none: train one with "
                         "configs/mtp.py or use --mode plain")
    if args.mode == "verify":
        res = generate_verify(cfg, params, prompts, args.max_new_tokens, sampling, n_heads=n,
                              head_depth=depth, **common)
        rate = float(res.accepted.sum() / max(res.reached.sum(), 1))
        depths = ", ".join(f"{a:.2f}" for a in res.acceptance)
        return res, (f"; {res.tokens_per_forward:.2f} tokens/forward; acceptance {rate:.3f} "
                     f"(per draft depth: {depths})")
    from jaxdyn.multitoken.grid import DynamoOptions

    opts = DynamoOptions(n_max=args.n_max or n, top_k=args.top_k or 50,
                         temperature=args.temperature,
                         repetition_penalty=args.repetition_penalty, alpha_c=args.alpha_c,
                         threshold=args.threshold, adaptive=args.adaptive, blur=args.blur,
                         penalty_window=args.penalty_window, mode=args.cooccur_mode)
    res = generate_multitoken(cfg, params, load_tables(args, cfg, tok), prompts,
                              args.max_new_tokens, opts, n_heads=n, head_depth=depth, **common)
    share = res.emission_hist[1:] / max(res.emission_hist[1:].sum(), 1)
    return res, (f"; ε_b={opts.threshold}; {res.tokens_per_forward:.2f} tokens/forward; "
                 f"steps emitting 1..{n}: {', '.join(f'{x:.2f}' for x in share)}; "
                 f"back-offs {res.backoffs}")


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m jaxdyn.generate", description=__doc__)
    ap.add_argument("--checkpoint", required=True,
                    help="training workdir, conversion output or Hugging Face folder")
    ap.add_argument("--prompt")
    ap.add_argument("--prompts", help="JSONL file with one {\"prompt\": ...} per line")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--mode", choices=MODES, default="plain",
                    help="plain: single-token decoding; multitoken: DynaMo dynamic multi-token "
                         "sampling; verify: lossless self-speculative decoding (MTP checkpoints)")
    ap.add_argument("--temperature", type=float,
                    help="0 = greedy (default; multitoken: 0.7 or the run's dynamo block)")
    ap.add_argument("--top_k", type=int, help="0 = off (default; multitoken: 50 per head)")
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--repetition_penalty", type=float,
                    help="1 = off (default; multitoken: θ = 1.1)")
    dyn = ap.add_argument_group("--mode multitoken (DynaMo; defaults from the run's "
                                "config.json `dynamo` block when present)")
    dyn.add_argument("--threshold", type=float, help="ε_b in [0, 1]: 1 -> always one token, "
                     "0 -> n tokens whenever the n-gram was seen (default 0.5)")
    dyn.add_argument("--cooccur", help="co-occurrence tables folder (python -m jaxdyn.multitoken.cooccur); "
                     "default <checkpoint>/cooccur")
    dyn.add_argument("--n_max", type=int, help="most tokens per forward (default: all heads)")
    dyn.add_argument("--alpha_c", type=float, help="co-occurrence exponent α_c (default 1)")
    dyn.add_argument("--no_adaptive", action="store_true", help="skip Otsu's adaptive threshold")
    dyn.add_argument("--no_blur", action="store_true", help="no [1,2,1] blur before Otsu")
    dyn.add_argument("--penalty_window", type=int, help="recent tokens the penalty sees (64)")
    dyn.add_argument("--cooccur_mode", choices=("ours", "paper"),
                     help="ours (renormalised grid) or the paper's literal thresholds")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time", help="YYYY-MM-DD date for a temporal-adapter checkpoint")
    ap.add_argument("--graph", help="causal graph JSON (temporal record schema) for it")
    args = ap.parse_args(argv)
    fill_sampling_defaults(args)
    if args.time is not None or args.graph is not None:  # temporal adapters (DYNAMO)
        from jaxdyn.temporal.generate import cli

        return cli(args)

    texts = read_prompts(args.prompt, args.prompts)
    try:
        cfg, params, tok = load_for_inference(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: cannot load --checkpoint {args.checkpoint!r}: {e}") from None
    prompts = [tok.encode(t) for t in texts]
    for t, p in zip(texts, prompts, strict=True):
        if not p:
            raise SystemExit(f"error: prompt {t!r} encodes to no tokens; give a non-empty prompt")
    stream = len(prompts) == 1 and sys.stdout.isatty()
    streamed: list[int] = []
    shown = ""

    def on_tokens(step, toks):  # print the newly decoded suffix of the single prompt
        nonlocal shown
        first = toks[0]
        streamed.extend(first if isinstance(first, list) else [int(first)])
        text = tok.decode(streamed)
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text

    try:
        res, summary = decode(args, cfg, params, tok, prompts, on_tokens if stream else None)
    except ValueError as e:  # e.g. prompt + max_new_tokens beyond the context
        raise SystemExit(f"error: {e}") from None
    if stream:
        sys.stdout.write("\n")
    for text_in, new in zip(texts, res.tokens, strict=True):
        if new and new[-1] == tok.eos_id:
            new = new[:-1]
        out, _ = truncate_at_stop(tok.decode(new), args.stop)
        if not stream:
            print(f"=== {text_in!r}\n{out}")
    n_new = sum(len(t) for t in res.tokens)
    print(f"[{args.mode}: {n_new} tokens; prefill {res.prefill_seconds:.2f}s; decode "
          f"{res.tokens_per_sec:.1f} tokens/s{summary}]", file=sys.stderr)


if __name__ == "__main__":
    main()

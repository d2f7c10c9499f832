"""`python -m jaxdyn.generate`: plain, multi-token (DynaMo) or verify decoding of any
checkpoint, and date/graph-conditioned decoding of temporal-adapter checkpoints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence

from jaxdyn.cli.common import (
    add_mesh_args,
    cli_main,
    load_for_inference,
    mesh_from_args,
    mesh_given,
    read_prompts,
)
from jaxdyn.config import paths
from jaxdyn.decode.generate import generate, truncate_at_stop
from jaxdyn.decode.sampling import LIMITS, SamplingConfig, sampling_errors
from jaxdyn.model import ModelConfig
from jaxdyn.multitoken.cooccur import CooccurTables
from jaxdyn.multitoken.decode import generate_multitoken, generate_verify
from jaxdyn.multitoken.device import generate_multitoken_device
from jaxdyn.multitoken.grid import DynamoOptions
from jaxdyn.multitoken.heads import heads_of
from jaxdyn.temporal.generate import generate_conditioned, load_temporal

MODES = ("plain", "multitoken", "verify")
_PLAIN_DEFAULTS = {"temperature": 0.0, "top_k": 0, "repetition_penalty": 1.0}


def _run_blocks(checkpoint: str) -> tuple[dict, dict]:
    """The `dynamo` and `mtp` blocks of a training run's config.json (configs/mtp.py)."""
    path = paths.join(checkpoint, "config.json")
    if not paths.exists(paths.join(checkpoint, "model_config.json")) or \
            not paths.exists(path):
        return {}, {}
    try:
        run = json.loads(paths.read_bytes(path))
    except (OSError, ValueError):
        return {}, {}
    return dict(run.get("dynamo") or {}), dict(run.get("mtp") or {})


def check_flags(args) -> None:
    """Refuse out-of-range numbers (NaN and inf included) before anything loads, by flag."""
    given = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p",
                                           "repetition_penalty")}
    neutral = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
    bad = sampling_errors(**{k: neutral[k] if v is None else v for k, v in given.items()})
    if bad:
        raise SystemExit(f"--{bad[0]} {given[bad[0]]}: {LIMITS[bad[0]]}")
    finite = lambda v: v is None or math.isfinite(v)
    checks = [
        ("--max_new_tokens", args.max_new_tokens, args.max_new_tokens >= 1, "must be >= 1"),
        ("--threshold", args.threshold, finite(args.threshold) and
         (args.threshold is None or 0.0 <= args.threshold <= 1.0), "must lie in [0, 1]"),
        ("--alpha_c", args.alpha_c, finite(args.alpha_c), "must be a finite number"),
        ("--n_max", args.n_max, args.n_max is None or args.n_max >= 1, "must be >= 1"),
        ("--penalty_window", args.penalty_window,
         args.penalty_window is None or args.penalty_window >= 1, "must be >= 1"),
    ]
    for flag, value, ok, rule in checks:
        if not ok:
            raise SystemExit(f"{flag} {value}: {rule}")


def fill_sampling_defaults(args) -> None:
    """Unset sampling flags take the mode's defaults: plain/verify sample like plain decoding
    (greedy), multitoken uses DynaMo's (the run's `dynamo` block, else `DynamoOptions`)."""
    if args.mode != "multitoken":
        for k, v in _PLAIN_DEFAULTS.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
        return
    base = dataclasses.asdict(DynamoOptions())
    run, mtp = _run_blocks(args.checkpoint)
    for k in ("temperature", "top_k", "repetition_penalty", "threshold", "alpha_c",
              "penalty_window"):
        if getattr(args, k) is None:
            setattr(args, k, run.get(k, base[k]))
    args.adaptive = run.get("adaptive", True) and not args.no_adaptive
    args.blur = run.get("blur", True) and not args.no_blur
    args.cooccur_mode = args.cooccur_mode or run.get("mode", "ours")
    args.cooccur = args.cooccur or mtp.get("cooccur_dir") or None


def load_tables(args, cfg: ModelConfig, tok):
    """Co-occurrence tables for --mode multitoken, checked against the model's vocabulary."""
    path = args.cooccur or paths.join(args.checkpoint, "cooccur")
    build = (f"build them with `python -m jaxdyn.multitoken cooccur --data builtin --tokenizer "
             f"{args.checkpoint} --vocab_size {cfg.vocab_size} --out DIR` and pass --cooccur DIR")
    if not paths.exists(paths.join(path, "meta.json")):
        raise SystemExit(f"error: --mode multitoken needs co-occurrence tables; {path!r} has "
                         f"none: {build}")
    tables = CooccurTables(path)
    if tables.vocab_size != cfg.vocab_size:
        raise SystemExit(f"error: tables in {path!r} have V={tables.vocab_size}, the model "
                         f"V={cfg.vocab_size}: {build}")
    fp = tables.meta.get("tokenizer_fingerprint") or ""
    if fp and fp != tok.fingerprint():
        raise SystemExit(f"error: tables in {path!r} were counted with another tokenizer "
                         f"({fp} != {tok.fingerprint()}): {build}")
    return tables


def lossless_check_wanted(args, cfg: ModelConfig) -> bool:
    """`--check_lossless`: `auto` compares verify output with plain greedy decoding when the
    compute dtype is not float32 and decoding is greedy; `on` always (greedy only)."""
    greedy = args.temperature == 0.0
    if args.check_lossless == "on" and not greedy:
        raise SystemExit("error: --check_lossless on compares with plain greedy decoding; it "
                         "needs --temperature 0 (sampling keeps only the distribution)")
    if args.check_lossless == "auto":
        return greedy and cfg.dtype != "float32"
    return args.check_lossless == "on"


def divergence_summary(div) -> str:
    """The stats-line part of a lossless check (empty when none ran)."""
    if div is None:
        return ""
    if div.lossless:
        return f"; lossless check ({div.dtype}): identical to plain greedy"
    firsts = ", ".join("-" if f is None else str(f) for f in div.first_divergence)
    return (f"; LOSSLESS CHECK ({div.dtype}): {div.diverged_steps} of {div.compared_steps} "
            f"tokens differ from plain greedy in {div.diverged_rows} of "
            f"{len(div.first_divergence)} rows (first differing position per row: {firsts})")


def decode(args, cfg: ModelConfig, params, tok, prompts, on_tokens=None):
    """Run `--mode` on the prompts: (result with `.tokens`, summary for the stats line)."""
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    common = dict(seed=args.seed, eos_id=tok.eos_id, on_tokens=on_tokens)
    if args.mode == "plain":
        return generate(cfg, params, prompts, args.max_new_tokens, sampling, **common), ""

    n, depth = heads_of(params)
    if n < 2 or cfg.arch != "dense":
        raise SystemExit(f"error: --mode {args.mode} needs a multi-token checkpoint (params with "
                         f"heads/, arch dense); {args.checkpoint!r} has none: train one with "
                         "configs/mtp.py or use --mode plain")
    if args.mode == "verify":
        check = lossless_check_wanted(args, cfg)
        res = generate_verify(cfg, params, prompts, args.max_new_tokens, sampling, n_heads=n,
                              head_depth=depth, check_lossless=check, tree=args.tree, **common)
        rate = float(res.accepted.sum() / max(res.reached.sum(), 1))
        depths = ", ".join(f"{a:.2f}" for a in res.acceptance)
        return res, (f"; {res.tokens_per_forward:.2f} tokens/forward; acceptance {rate:.3f} "
                     f"(per draft depth: {depths}){divergence_summary(res.divergence)}")
    opts = DynamoOptions(n_max=args.n_max or n, top_k=args.top_k or 50,
                         temperature=args.temperature,
                         repetition_penalty=args.repetition_penalty, alpha_c=args.alpha_c,
                         threshold=args.threshold, adaptive=args.adaptive, blur=args.blur,
                         penalty_window=args.penalty_window, mode=args.cooccur_mode)
    run = generate_multitoken_device if args.dynamo_on == "device" else generate_multitoken
    res = run(cfg, params, load_tables(args, cfg, tok), prompts, args.max_new_tokens, opts,
              n_heads=n, head_depth=depth, **common)
    share = res.emission_hist[1:] / max(res.emission_hist[1:].sum(), 1)
    return res, (f"; ε_b={opts.threshold}; {res.tokens_per_forward:.2f} tokens/forward; "
                 f"steps emitting 1..{n}: {', '.join(f'{x:.2f}' for x in share)}; "
                 f"back-offs {res.backoffs}")


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
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
    dyn.add_argument("--cooccur", help="co-occurrence tables folder (python -m "
                     "jaxdyn.multitoken cooccur); default <checkpoint>/cooccur")
    dyn.add_argument("--n_max", type=int, help="most tokens per forward (default: all heads)")
    dyn.add_argument("--alpha_c", type=float, help="co-occurrence exponent α_c (default 1)")
    dyn.add_argument("--no_adaptive", action="store_true", help="skip Otsu's adaptive threshold")
    dyn.add_argument("--no_blur", action="store_true", help="no [1,2,1] blur before Otsu")
    dyn.add_argument("--penalty_window", type=int, help="recent tokens the penalty sees (64)")
    dyn.add_argument("--dynamo_on", choices=("device", "host"), default="device",
                     help="where the selection runs: inside the jitted step (default) or the "
                     "host NumPy reference; the same tokens for a fixed seed")
    dyn.add_argument("--cooccur_mode", choices=("ours", "paper"),
                     help="ours (renormalised grid) or the paper's literal thresholds")
    ap.add_argument("--tree", default="chain",
                    help="--mode verify: candidate tree one forward checks: 'chain' (one draft "
                         "per head) or top-k per draft depth, e.g. '4,2' (1+4+8 nodes, tree "
                         "attention; Medusa/EAGLE-style)")
    ap.add_argument("--check_lossless", choices=("auto", "on", "off"), default="auto",
                    help="--mode verify: also decode plain greedy and report tokens that differ "
                         "(auto: when the compute dtype is not float32 and decoding is greedy)")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time", help="YYYY-MM-DD date for a temporal-adapter checkpoint")
    ap.add_argument("--graph", help="causal graph JSON (temporal record schema) for it")
    add_mesh_args(ap)  # --mode plain shards over it; the other modes run on one device
    args = ap.parse_args(argv)
    check_flags(args)
    fill_sampling_defaults(args)
    if args.time is not None or args.graph is not None:  # temporal adapters (DYNAMO)
        return temporal(args)

    texts = read_prompts(args.prompt, args.prompts)
    if args.mode != "plain" and mesh_given(args):
        raise SystemExit(f"--mesh applies to --mode plain; --mode {args.mode} decodes on one "
                         "device (drop --mesh)")
    mesh = mesh_from_args(args) if args.mode == "plain" else None
    try:
        cfg, params, tok = load_for_inference(args.checkpoint, mesh)
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



def temporal(args) -> None:
    """`--time`/`--graph`: greedy decoding conditioned on a date and a causal graph."""
    if (args.temperature or 0.0) != 0.0 or args.top_k or (args.top_p or 1.0) != 1.0 or \
            args.mode != "plain":
        raise SystemExit("temporal generation is greedy, plain mode; drop --temperature/"
                         "--top_k/--top_p/--mode")
    try:
        model = load_temporal(args.checkpoint)
        for text in read_prompts(args.prompt, args.prompts):
            out = generate_conditioned(model, text, args.time, args.graph, args.max_new_tokens)
            print(f"=== {text!r} @ {args.time} graph={args.graph}\n"
                  f"{truncate_at_stop(out, args.stop)[0]}")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None

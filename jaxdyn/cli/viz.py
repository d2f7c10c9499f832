"""`python -m jaxdyn.viz`: the pictures of a run (jaxdyn/viz).

    python -m jaxdyn.viz --workdir runs/dtf        # runs/dtf/dashboard.png; for MoD / DTF runs
                                                   # also runs/dtf/routing.png and the routing
                                                   # picture of --text in the terminal
    python -m jaxdyn.viz --workdir runs/mod --text "import os" --mode causal
    python -m jaxdyn.viz --checkpoint imports/my-dtf --out pics   # any routed model: routing only

The dashboard reads only WORKDIR/metrics.jsonl (it works while training runs); the routing
picture needs a finished checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from jaxdyn.checkpoint import Checkpointer
from jaxdyn.cli.common import load_for_inference
from jaxdyn.config import paths
from jaxdyn.model import ModelConfig
from jaxdyn.viz.dashboard import dashboard, save_figure
from jaxdyn.viz.routing import GATE_NAME, MODES, routing_figure, routing_text

DEFAULT_TEXT = "def add(a, b):\n    return a + b\n"


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Parse `argv`, write the pictures, print the text picture and the paths; the paths."""
    ap = argparse.ArgumentParser(prog="python -m jaxdyn.viz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training run folder: dashboard (+ routing if routed)")
    src.add_argument("--checkpoint",
                     help="any routed model (workdir, conversion output, Hugging Face "
                          "folder): routing picture only")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="text to route (default: %(default)r)")
    ap.add_argument("--mode", choices=MODES, default="topk",
                    help="topk: training-time selection; causal: generation-time decisions")
    ap.add_argument("--out", help="folder for the PNGs (default: the workdir, or the current "
                                  "folder with --checkpoint)")
    ap.add_argument("--width", type=int, default=100, help="columns of the text picture")
    args = ap.parse_args(argv)
    out = args.out or args.workdir or "."
    paths.makedirs(out)
    written = []
    if args.workdir:
        try:
            written.append(dashboard(args.workdir, paths.join(out, "dashboard.png")))
        except FileNotFoundError as e:
            raise SystemExit(f"error: {e}") from None
        skip = routing_skip_reason(args.workdir)
        if skip:
            print(f"(no routing picture: {skip})", file=sys.stderr)
            return report(written)
    model = args.checkpoint or args.workdir
    try:
        cfg, params, tok = load_for_inference(model)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: cannot load {model!r}: {e}") from None
    if cfg.arch not in GATE_NAME:
        raise SystemExit(f"error: {model!r} holds an arch={cfg.arch!r} model; the "
                         "routing picture needs a routed model (arch 'mod' or 'dtf')")
    tokens = tok.encode(args.text)
    try:
        picture = routing_text(cfg, params, tokens, tok, args.mode, args.width)
        fig = routing_figure(cfg, params, tokens, tok, args.mode)
    except ValueError as e:  # empty text, longer than the context
        raise SystemExit(f"error: {e}") from None
    written.append(paths.join(out, "routing.png"))
    save_figure(fig, written[-1], dpi=110)
    print(picture + "\n")
    return report(written)


def routing_skip_reason(workdir: str) -> str | None:
    """Why a workdir gets no routing picture (dense run, no checkpoint yet), or None."""
    cfg_path = paths.join(workdir, "model_config.json")
    if not paths.exists(cfg_path):
        return f"{workdir} has no model_config.json"
    arch = ModelConfig.from_dict(json.loads(paths.read_bytes(cfg_path))).arch
    if arch not in GATE_NAME:
        return f"an arch={arch!r} run has no routed layers"
    ckpt_dir = paths.join(workdir, "checkpoints")
    if not paths.isdir(ckpt_dir):
        return f"{workdir} has no checkpoint yet"
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        return None if ckpt.latest_step() is not None else \
            f"{workdir} has no finished checkpoint yet"
    finally:
        ckpt.close()


def report(written: list[str]) -> list[str]:
    for path in written:
        print(path)
    return written

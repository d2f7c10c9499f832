"""`python -m jaxdyn.temporal synth --out DIR [--seed 0] [--n-train N …] [--overwrite]`: write
TCG-Synth. The splits appear in DIR whole or not at all; a non-empty DIR is replaced only with
--overwrite (and only when it holds nothing but TCG-Synth files)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence

from jaxdyn.cli.common import cli_main
from jaxdyn.temporal.synth import (
    SynthConfig,
    check_config,
    check_output,
    flag,
    generate,
    write,
)


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m jaxdyn.temporal")
    sub = ap.add_subparsers(dest="command", required=True)
    sy = sub.add_parser("synth", help="generate the TCG-Synth benchmark as JSONL splits")
    sy.add_argument("--out", required=True)
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty --out that holds a previous TCG-Synth output")
    for f in dataclasses.fields(SynthConfig):
        if f.type in ("int", int) and f.name != "seed":
            sy.add_argument(flag(f.name), type=int, default=f.default)
    args = ap.parse_args(argv)
    sc = SynthConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)
                        if hasattr(args, f.name)})
    check_config(sc)
    check_output(args.out, args.overwrite)  # before minutes of generating
    splits = generate(sc, sc.seed)
    write(args.out, splits, {"seed": sc.seed, "config": dataclasses.asdict(sc)},
          overwrite=args.overwrite)
    print(json.dumps({k: len(v) for k, v in splits.items()}))

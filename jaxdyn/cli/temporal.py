"""`python -m jaxdyn.temporal synth --out DIR [--seed 0] [--n-train N …]`: write TCG-Synth."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence

from jaxdyn.temporal.synth import SynthConfig, generate, write


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m jaxdyn.temporal")
    sub = ap.add_subparsers(dest="command", required=True)
    sy = sub.add_parser("synth", help="generate the TCG-Synth benchmark as JSONL splits")
    sy.add_argument("--out", required=True)
    sy.add_argument("--seed", type=int, default=0)
    for f in dataclasses.fields(SynthConfig):
        if f.type in ("int", int) and f.name != "seed":
            sy.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default)
    args = ap.parse_args(argv)
    sc = SynthConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)
                        if hasattr(args, f.name)})
    splits = generate(sc, sc.seed)
    write(args.out, splits, {"seed": sc.seed, "config": dataclasses.asdict(sc)})
    print(json.dumps({k: len(v) for k, v in splits.items()}))

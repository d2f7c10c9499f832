"""`python -m jaxdyn.experiments compare|temporal …`: the experiment drivers.

    python -m jaxdyn.experiments compare --preset cpu --out runs/compare
    python -m jaxdyn.experiments temporal --config configs/temporal.py:mini --out runs/tx
    python -m jaxdyn.experiments transfer --config configs/transfer.py:cpu --out runs/transfer
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from jaxdyn.cli.train import split_overrides
from jaxdyn.experiments import compare, temporal, transfer
from jaxdyn.train import schema


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m jaxdyn.experiments",
                                 epilog="overrides: --config.train.steps=100 (any config key)")
    sub = ap.add_subparsers(dest="command", required=True)
    co = sub.add_parser("compare", help="standard vs MoD vs DTF at matched capacity")
    co.add_argument("--preset", default="cpu", choices=sorted(compare.PRESETS))
    co.add_argument("--out", default="runs/compare")
    co.add_argument("--steps", type=int, default=0, help="override train.steps (0 = preset)")
    tx = sub.add_parser("temporal", help="TCG-Synth: temporal adapters vs ablations")
    tx.add_argument("--config", default="configs/temporal.py:mini",
                    help="configs/temporal.py[:preset]")
    tx.add_argument("--out", required=True)
    tr = sub.add_parser("transfer", help="dense -> MoD/DTF transfer vs from scratch, seeds")
    tr.add_argument("--config", default="configs/transfer.py:cpu",
                    help="configs/transfer.py[:preset]")
    tr.add_argument("--out", required=True)
    args, rest = ap.parse_known_args(argv)
    overrides = split_overrides(ap, rest)
    if args.command == "compare":
        overrides += [f"--config.train.steps={args.steps}"] if args.steps else []
        os.makedirs(args.out, exist_ok=True)
        print(compare.write_results(compare.run_all(args.preset, args.out, overrides),
                                    args.out))
    elif args.command == "transfer":
        transfer.run_study(schema.load(args.config, overrides), args.out)
        print(open(os.path.join(args.out, "results.md")).read())
    else:
        temporal.run_experiment(schema.load(args.config, overrides), args.out)

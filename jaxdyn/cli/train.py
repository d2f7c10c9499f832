"""`python -m jaxdyn.train --config configs/<exp>.py[:preset] --workdir DIR [--config.a.b=v]`.

A user error (a bad config value, a workdir holding another model or used by another trainer,
missing data, a damaged checkpoint, ...) is printed as one line `error: <message>` on stderr
and exits with status 2; a bug still shows its traceback. `JAXDYN_TRACEBACK=1` shows the
traceback of user errors too.
"""

from __future__ import annotations

import argparse
import sys

from jaxdyn import distributed
from jaxdyn.cli.common import cli_main
from jaxdyn.train import schema
from jaxdyn.train.loop import train_and_evaluate


def split_overrides(ap: argparse.ArgumentParser, rest: list[str]) -> list[str]:
    """`--config.a.b=v` or `--config.a.b v` items; anything else is an argparse error."""
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            ap.error(f"unrecognised argument {item!r}; overrides look like --config.train.lr=3e-4")
        if "=" not in item and i + 1 < len(rest):
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    return overrides


@cli_main  # user errors (jaxdyn's ValueErrors, WorkdirError, missing files): one line, exit 2
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m jaxdyn.train",
                                 epilog="overrides: --config.train.lr=3e-4 (any config key); "
                                        "JAXDYN_TRACEBACK=1 shows tracebacks of user errors")
    ap.add_argument("--config", required=True, help="configs/<exp>.py[:preset]")
    ap.add_argument("--workdir", required=True, help="run folder (resumed when it has one)")
    args, rest = ap.parse_known_args(argv)
    overrides = split_overrides(ap, rest)
    distributed.init()
    cfg = schema.load(args.config, overrides)
    train_and_evaluate(cfg, args.workdir)

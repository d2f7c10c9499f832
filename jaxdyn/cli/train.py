"""`python -m jaxdyn.train --config configs/<exp>.py[:preset] --workdir DIR [--config.a.b=v]`.

A user error (a bad config value, a workdir holding another model or used by another trainer,
missing data, a damaged checkpoint, ...) is printed as one line `error: <message>` on stderr
and exits with status 2; a bug still shows its traceback. `JAXDYN_TRACEBACK=1` shows the
traceback of user errors too.
"""

from __future__ import annotations

import argparse
import os
import sys

import jaxdyn
from jaxdyn import distributed
from jaxdyn.train import schema
from jaxdyn.train.loop import train_and_evaluate
from jaxdyn.train.workdir import WorkdirError

# Always user errors: the environment or the workdir is not as the run needs it.
USER_ERRORS = (WorkdirError, FileNotFoundError, PermissionError)
_PROJECT = os.path.dirname(os.path.abspath(jaxdyn.__file__)) + os.sep


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


def is_user_error(e: BaseException) -> bool:
    """A ValueError counts when jaxdyn defines its class (ConfigValueError,
    CheckpointMismatchError, EmptyDatasetError, CheckpointDamagedError, ...) or raised it; one
    raised inside a library (numpy, jax, orbax) is treated as a bug."""
    if isinstance(e, USER_ERRORS):
        return True
    if not isinstance(e, ValueError):
        return False
    if type(e).__module__.split(".")[0] in ("jaxdyn", "conversion"):
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PROJECT)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m jaxdyn.train",
                                 epilog="overrides: --config.train.lr=3e-4 (any config key); "
                                        "JAXDYN_TRACEBACK=1 shows tracebacks of user errors")
    ap.add_argument("--config", required=True, help="configs/<exp>.py[:preset]")
    ap.add_argument("--workdir", required=True, help="run folder (resumed when it has one)")
    args, rest = ap.parse_known_args(argv)
    overrides = split_overrides(ap, rest)
    try:
        distributed.init()
        cfg = schema.load(args.config, overrides)
        train_and_evaluate(cfg, args.workdir)
    except Exception as e:
        if os.environ.get("JAXDYN_TRACEBACK", "") not in ("", "0") or not is_user_error(e):
            raise
        print("error: " + (" ".join(str(e).split()) or type(e).__name__), file=sys.stderr)
        sys.exit(2)

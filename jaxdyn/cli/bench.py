"""`python -m jaxdyn.bench --suite {forward,decode,train,routing,multitoken,scaling,conversion,data,
attention,kernels,profile,all}
--out results.json [--preset tiny|small|qwen2.5-0.5b|qwen2.5-1.5b] [--profile DIR] [--xla-sweep]`

`--suite profile` (not part of "all") times one train step op by op beside PyTorch
(jaxdyn/bench/profile.py); `--xla-sweep` adds its train step under candidate XLA_FLAGS sets.

Presets are those of configs/bench.py. The scaling, conversion and profile (`--xla-sweep`) suites
start this command again as subprocess workers (`--worker scaling|conversion|profile --child
...`, hidden from --help):
each measures once and prints one JSON line for the parent.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence

from jaxdyn.bench import (
    DIAGNOSTICS,
    ORDER,
    common,
    conversion,
    profile,
    protocol,
    run_suites,
    scaling,
)

WORKERS = ("scaling", "conversion", "profile")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jaxdyn.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", action="append", choices=[*ORDER, *DIAGNOSTICS, "all"],
                    help="suite to run (repeatable); default all")
    ap.add_argument("--out", default="results.json", help="JSON path; the table goes to .md")
    ap.add_argument("--preset", default="small",
                    help="a configs/bench.py preset: tiny, small, qwen2.5-0.5b, qwen2.5-1.5b "
                         "(default small)")
    ap.add_argument("--profile", default=None, help="write a jax.profiler trace of one train "
                                                    "step into this folder (train suite)")
    ap.add_argument("--xla-sweep", nargs="?", const="candidates", default=None, metavar="SETS",
                    help="profile suite (implied): also time jaxdyn's train step in one "
                         "subprocess per XLA_FLAGS set, against the default flags; SETS is "
                         "';'-separated (each set space-separated flags), default the "
                         "candidates of jaxdyn/bench/profile.py")
    ap.add_argument("--devices", default=None,
                    help="scaling suite: comma-separated device counts (default 1,2,4,8)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed rounds per measurement, interleaved with the reference "
                         "(default: the preset's)")
    ap.add_argument("--settle-s", type=float, default=protocol.SETTLE_S,
                    help="before each suite, wait up to this many seconds for the 1-minute "
                         f"load average to fall under {protocol.MAX_LOAD} (default "
                         f"{protocol.SETTLE_S:g})")
    # Subprocess workers of the scaling and conversion suites (not for people).
    ap.add_argument("--worker", choices=WORKERS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--preset-json", default=None, help=argparse.SUPPRESS)
    return ap


def worker(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """One measurement in this (fresh) process; prints the suite's MARK + JSON line."""
    if args.child is None:
        ap.error(f"--worker {args.worker} needs --child")
    if args.worker == "profile":
        preset = (json.loads(args.preset_json) if args.preset_json
                  else dataclasses.asdict(common.get_preset(args.preset)))
        print(profile.MARK + json.dumps(profile.child(preset)), flush=True)
    elif args.worker == "scaling":
        try:
            n = int(args.child)
        except ValueError:
            ap.error(f"--worker scaling: --child is a device count, not {args.child!r}")
        if args.preset_json:
            preset = json.loads(args.preset_json)
        else:
            preset = dataclasses.asdict(common.get_preset(args.preset))
        print(scaling.MARK + json.dumps(scaling.child(n, preset)), flush=True)
    else:
        print(conversion.MARK + json.dumps(conversion.child(args.child)), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.worker:
        return worker(ap, args)
    try:
        common.get_preset(args.preset)
    except ValueError as e:
        ap.error(str(e))
    if args.repeats:
        common.override(args.preset, repeats=args.repeats)
    counts = tuple(int(x) for x in args.devices.split(",")) if args.devices else None
    suites = args.suite or ["all"]
    if args.profile and "train" not in suites and "all" not in suites:
        suites = [*suites, "train"]
    options = {}
    if args.xla_sweep:
        if "profile" not in suites:
            suites = [*suites, "profile"]
        options["xla_sweep"] = (True if args.xla_sweep == "candidates" else
                                [x.strip() for x in args.xla_sweep.split(";") if x.strip()])
    rows, meta = run_suites(suites, args.preset, profile=args.profile, device_counts=counts,
                            settle_s=args.settle_s, **options)
    md = common.write_results(args.out, rows, meta)
    print(md)
    print(f"\nwrote {args.out} and its .md table; device {meta['peaks']['device']}, measured "
          f"peak {meta['peaks']['peak_flops_measured'] / 1e9:,.1f} GFLOP/s "
          f"({meta['peaks']['dtype']})")
    return 1 if any(r.get("name") == "error" for r in rows) else 0

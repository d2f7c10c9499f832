"""python -m jaxdyn.bench --suite {forward,decode,train,routing,multitoken,scaling,conversion,all}
--out results.json [--preset tiny|small|qwen2.5-0.5b|qwen2.5-1.5b] [--profile DIR]"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def main(argv: list[str] | None = None) -> int:
    from jaxdyn.bench import ORDER, run_suites
    from jaxdyn.bench.common import PRESETS, write_results

    ap = argparse.ArgumentParser(prog="python -m jaxdyn.bench", description=__doc__)
    ap.add_argument("--suite", action="append", choices=[*ORDER, "all"],
                    help="suite to run (repeatable); default all")
    ap.add_argument("--out", default="results.json", help="JSON path; the table goes to .md")
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--profile", default=None, help="write a jax.profiler trace of one train "
                                                    "step into this folder (train suite)")
    ap.add_argument("--devices", default=None,
                    help="scaling suite: comma-separated device counts (default 1,2,4,8)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per measurement (default: the preset's)")
    args = ap.parse_args(argv)
    if args.repeats:
        PRESETS[args.preset] = dataclasses.replace(PRESETS[args.preset], repeats=args.repeats)
    counts = tuple(int(x) for x in args.devices.split(",")) if args.devices else None
    suites = args.suite or ["all"]
    if args.profile and "train" not in suites and "all" not in suites:
        suites = [*suites, "train"]
    rows, meta = run_suites(suites, args.preset, profile=args.profile, device_counts=counts)
    md = write_results(args.out, rows, meta)
    print(md)
    print(f"\nwrote {args.out} and its .md table; device {meta['peaks']['device']}, measured "
          f"peak {meta['peaks']['peak_flops_measured'] / 1e9:,.1f} GFLOP/s "
          f"({meta['peaks']['dtype']})")
    return 1 if any(r.get("name") == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

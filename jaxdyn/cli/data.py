"""`python -m jaxdyn.data.prepare`: tokenise a source once into sharded ArrayRecord files
with a manifest (jaxdyn/data/prepare/, docs/data.md)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from jaxdyn.cli.common import cli_main
from jaxdyn.data.prepare import SourceSpec, prepare, prepare_parallel
from jaxdyn.data.tokenizer import FIXED, load_tokenizer, make_tokenizer


def _tokenizer(value: str):
    """A fixed kind (`byte`, or one a feature registers), `ids:N`, or a tokenizer folder."""
    if value in FIXED:
        return make_tokenizer(value, directory="")
    if value.startswith("ids:"):
        return make_tokenizer("ids", directory="", vocab_size=int(value[4:]))
    return load_tokenizer(value)


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m jaxdyn.data.prepare",
                                 description="tokenise a source into sharded ArrayRecord files")
    ap.add_argument("--source", default="builtin",
                    help="builtin | a .txt/.jsonl/.json/.parquet file, folder or glob | "
                    "hub:NAME[:CONFIG] (streamed)")
    ap.add_argument("--out", required=True, help="output folder (local or mounted path)")
    ap.add_argument("--tokenizer", default="byte",
                    help="byte (or another fixed kind), ids:N, or a tokenizer / workdir folder")
    ap.add_argument("--text_field", default="text", help="text column of JSON/Parquet/hub rows")
    ap.add_argument("--split", default="train", help="hub split to stream")
    ap.add_argument("--max_documents", type=int, default=0, help="0 = all")
    ap.add_argument("--sample", type=float, default=1.0,
                    help="keep this fraction of the documents (hash-chosen subset; 1 = all)")
    ap.add_argument("--val_fraction", type=float, default=0.02)
    ap.add_argument("--shards", type=int, default=8,
                    help="shards per split (at least the number of training processes)")
    ap.add_argument("--process_index", type=int, default=0,
                    help="this writer's index when several machines or jobs share the work")
    ap.add_argument("--process_count", type=int, default=1, help="number of such writers")
    ap.add_argument("--workers", type=int, default=1,
                    help="local writer processes (instead of --process_index/--process_count)")
    ap.add_argument("--cache_dir", default="", help="HF datasets cache for local/hub reads")
    args = ap.parse_args(argv)
    if args.workers > 1 and args.process_count > 1:
        raise SystemExit("--workers and --process_count > 1 exclude each other: use one")
    spec = SourceSpec(source=args.source, text_field=args.text_field, split=args.split,
                      max_documents=args.max_documents, sample=args.sample)
    tok = _tokenizer(args.tokenizer)
    kw = {"val_fraction": args.val_fraction, "shards": args.shards, "cache_dir": args.cache_dir}
    if args.process_count > 1:
        manifest = prepare(spec, tok, args.out, process_index=args.process_index,
                           process_count=args.process_count, **kw)
    else:
        manifest = prepare_parallel(spec, tok, args.out, workers=args.workers, **kw)
    if manifest is None:
        print(json.dumps({"out": args.out, "complete": False,
                          "note": "shards of other writers are missing; the last writer "
                                  "to finish writes manifest.json"}))
        return
    print(json.dumps({"out": args.out, "complete": True, "documents": manifest["documents"],
                      "tokens": manifest["tokens"]}))

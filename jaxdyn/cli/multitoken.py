"""`python -m jaxdyn.multitoken cooccur …`: co-occurrence tables for DynaMo decoding."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from jaxdyn.cli.common import cli_main
from jaxdyn.multitoken.cooccur import build_tables, iter_docs, tokenized_sources


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m jaxdyn.multitoken")
    sub = ap.add_subparsers(dest="command", required=True)
    co = sub.add_parser("cooccur", help="count n-gram tables (jaxdyn/multitoken/cooccur.py)")
    co.add_argument("--data", nargs="+", required=True,
                    help="files/folders (.jsonl, .npy, text) or 'builtin'")
    co.add_argument("--out", required=True, help="output folder")
    co.add_argument("--vocab_size", type=int,
                    help="default: max id + 1 (256 for text, 258 for builtin)")
    co.add_argument("--max_order", type=int, default=3, choices=(2, 3, 4))
    co.add_argument("--doc_sep", type=int, help="separator id splitting a 1-D .npy stream")
    co.add_argument("--pad_id", type=int, help="id dropped from rows of a 2-D .npy")
    co.add_argument("--buffer", type=int, default=1 << 22, help="keys per sorted run")
    co.add_argument("--min_count", type=int, default=1)
    co.add_argument("--fingerprint", default="", help="tokenizer fingerprint stored in meta")
    co.add_argument("--tokenizer", help="tokenizer (or checkpoint) folder: --data entries are "
                    "jaxdyn.data sources (builtin, a text/JSONL/Parquet path, hub:NAME) read as "
                    "text and tokenized like training data (train split only)")
    co.add_argument("--text_field", default="text", help="text column of JSONL/Parquet/hub data")
    co.add_argument("--max_documents", type=int, default=0, help="with --tokenizer; 0 = all")
    args = ap.parse_args(argv)
    for flag, value, low in (("--vocab_size", args.vocab_size, 1), ("--buffer", args.buffer, 1),
                             ("--min_count", args.min_count, 1),
                             ("--max_documents", args.max_documents, 0)):
        if value is not None and value < low:
            raise SystemExit(f"{flag} {value}: must be >= {low}")
    docs = lambda: iter_docs(args.data, args.doc_sep, args.pad_id)
    V = args.vocab_size
    if args.tokenizer:
        tok, token_docs = tokenized_sources(args.data, args.tokenizer, args.text_field,
                                            args.max_documents)
        docs = lambda: iter(token_docs)
        V = V or tok.vocab_size
        args.fingerprint = args.fingerprint or tok.fingerprint()
    elif V is None and all(p == "builtin" for p in args.data):
        V = 258  # the byte tokenizer of jaxdyn.data.tokenizer (bytes, EOS, PAD)
    elif V is None:
        V = max((int(d.max()) + 1 for d in docs() if d.size), default=0)
        if not V:
            raise SystemExit(f"--data {' '.join(args.data)}: no tokens to count; give "
                             "non-empty files or --vocab_size")
        V = max(V, 256) if all(Path(p).suffix not in (".jsonl", ".npy") for p in args.data) else V
    meta = build_tables(docs(), V, args.out, args.max_order, args.buffer, args.min_count,
                        args.fingerprint)
    print(json.dumps(meta, sort_keys=True))

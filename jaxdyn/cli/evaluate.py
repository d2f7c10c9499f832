"""`python -m jaxdyn.evaluate`: perplexity and bits per byte of a checkpoint on a corpus, or
lm-evaluation-harness tasks (`--tasks`).

    python -m jaxdyn.evaluate --checkpoint runs/std                  # built-in validation split
    python -m jaxdyn.evaluate --checkpoint runs/mod --data notes.txt    # every document of a file
    python -m jaxdyn.evaluate --checkpoint imports/qwen2.5-0.5b \
        --data hub:wikitext:wikitext-2-raw-v1 --split validation --max_batches 50
    python -m jaxdyn.evaluate --checkpoint runs/std --tasks arc_easy --limit 20
    python -m jaxdyn.evaluate --checkpoint imports/big --mesh data=2,fsdp=2,tensor=2

The model runs on a device mesh (--mesh, the trainer's `mesh` block; default every device on
the data axis): parameters sharded by the training rules, batches over data x fsdp.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from jaxdyn.cli.common import add_mesh_args, cli_main, load_for_inference, mesh_from_args
from jaxdyn.config import paths
from jaxdyn.data import DataConfigError, DataSourceNotFoundError, EmptyDatasetError
from jaxdyn.evaluate.lm_eval import run_tasks
from jaxdyn.evaluate.perplexity import SPLITS, evaluate, load_corpus


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m jaxdyn.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="training workdir, conversion output or Hugging Face folder")
    ap.add_argument("--data", default="builtin",
                    help="builtin | local .txt/.jsonl/.json/.parquet file, folder or glob | "
                         "hub:NAME[:CONFIG]")
    ap.add_argument("--split", choices=SPLITS,
                    help="default: validation for builtin, all for other sources")
    ap.add_argument("--text_field", default="text")
    ap.add_argument("--max_documents", type=int, default=0, help="0 = all")
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_batches", type=int, default=0, help="0 = one full pass")
    ap.add_argument("--routing_mode", choices=("topk", "causal"), default="topk",
                    help="routed models: top-k over the sequence (as in training) or the "
                         "causal router (as in generation)")
    ap.add_argument("--out", help="also write the results as JSON here")
    add_mesh_args(ap)
    lm = ap.add_argument_group("lm-evaluation-harness tasks instead of perplexity "
                               '(pip install -e ".[eval]")')
    lm.add_argument("--tasks", help="comma-separated lm_eval task names")
    lm.add_argument("--max_length", type=int, help="longest scored window (default: context)")
    lm.add_argument("--num_fewshot", type=int)
    lm.add_argument("--limit", type=float, help="examples per task (or fraction)")
    lm.add_argument("--include_path", help="folder of extra task YAMLs")
    args = ap.parse_args(argv)

    mesh = mesh_from_args(args)
    try:
        cfg, params, tok = load_for_inference(args.checkpoint, mesh)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: cannot load --checkpoint {args.checkpoint!r}: {e}") from None
    if args.tasks:
        res = run_tasks(cfg, params, tok, args.tasks.split(","), batch_size=args.batch_size,
                        max_length=args.max_length, num_fewshot=args.num_fewshot,
                        limit=args.limit, include_path=args.include_path, mesh=mesh)
        return write_json(res, args.out, default=str)
    if args.seq_len > cfg.max_position_embeddings:
        raise SystemExit(f"error: --seq_len {args.seq_len} exceeds the model's context of "
                         f"{cfg.max_position_embeddings}; lower --seq_len")
    try:
        corpus = load_corpus(tok, args.data, args.split, seq_len=args.seq_len,
                             batch_size=args.batch_size, max_batches=args.max_batches,
                             max_documents=args.max_documents, text_field=args.text_field)
    except (DataConfigError, DataSourceNotFoundError, EmptyDatasetError, ValueError) as e:
        raise SystemExit(f"error: --data {args.data!r}: {e}") from None
    res = evaluate(cfg, params, corpus.batches, routing_mode=args.routing_mode,
                   bytes_per_target=corpus.bytes_per_target, mesh=mesh)
    res = {"checkpoint": args.checkpoint, "data": args.data,
           "split": args.split or ("validation" if args.data == "builtin" else "all"),
           "documents": corpus.documents, "family": cfg.family, "arch": cfg.arch,
           "mesh": dict(mesh.shape),
           **({"routing_mode": args.routing_mode} if cfg.arch != "dense" else {}), **res}
    write_json(res, args.out)
    print(f"[ppl {res['ppl']:.3f}, {res.get('bits_per_byte', float('nan')):.4f} bits/byte over "
          f"{res['tokens']} targets]", file=sys.stderr)



def write_json(res: dict, out: str | None, **kw) -> None:
    text = json.dumps(res, indent=1, **kw)
    print(text)
    if out:  # local or on an object store (gs://…), written whole
        paths.write_atomic(out, text + "\n")

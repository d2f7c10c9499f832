"""CLI: `python -m conversion import HF_DIR OUT_DIR` / `python -m conversion export CKPT OUT`.

import: a Hugging Face folder → `OUT_DIR/params` (orbax, `jaxdyn.checkpoint.save_params`),
`OUT_DIR/model_config.json`, the tokenizer files, `generation_config.json` and the original
`config.json` as `hf_config.json` (export reads its dtype and token ids back).
export: an import folder or a training workdir → a Hugging Face folder with a model card.
Both outputs appear atomically (written under a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Sequence

from flax import traverse_util

from conversion import hf_config, model_card
from conversion.errors import ConversionError
from conversion.hf_export import staging, write_hf
from conversion.hf_import import from_hf
from jaxdyn.checkpoint import load_model, save_params
from jaxdyn.model import param_count

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja")
HF_CONFIG = "hf_config.json"  # the imported config.json, kept for export


def copy_side_files(src: str, dst: str, names: Sequence[str]) -> list[str]:
    """Copy the named files that exist in `src`; returns the ones copied."""
    copied = []
    for n in names:
        if os.path.isfile(os.path.join(src, n)):
            shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
            copied.append(n)
    return copied


def import_hf(hf_dir: str, out_dir: str, dtype: str = "float32", scan_layers: bool = True):
    """Convert `hf_dir` into a jaxdyn import folder; returns the ImportReport."""
    cfg, params, report = from_hf(hf_dir, dtype=dtype, scan_layers=scan_layers,
                                  return_report=True)
    with staging(out_dir) as tmp:
        save_params(os.path.join(tmp, "params"), params)
        cfg.save(os.path.join(tmp, "model_config.json"))
        shutil.copy2(os.path.join(hf_dir, "config.json"), os.path.join(tmp, HF_CONFIG))
        report.copied = copy_side_files(hf_dir, tmp, (*TOKENIZER_FILES,
                                                      "generation_config.json"))
    return report


def export_hf(ckpt_dir: str, out_dir: str, dtype: str | None = None,
              max_shard_size: str = "5GB"):
    """Export an import folder or a training workdir to a Hugging Face folder + model card."""
    cfg, params, tok_dir = load_model(ckpt_dir)
    extra = None
    if os.path.exists(os.path.join(ckpt_dir, HF_CONFIG)):
        extra = hf_config.read_config(os.path.join(ckpt_dir, HF_CONFIG))
        dtype = dtype or hf_config.hf_dtype(extra)
    with staging(out_dir) as tmp:
        report = write_hf(cfg, params, tmp, dtype=dtype, max_shard_size=max_shard_size,
                          extra_config=extra)
        copied = copy_side_files(tok_dir, tmp, TOKENIZER_FILES)
        copy_side_files(ckpt_dir, tmp, ("generation_config.json",))
        if not copied:
            report.notes.append(f"no Hugging Face tokenizer files in {tok_dir}; add them "
                                "before uploading")
        card = model_card.render(
            cfg, name=os.path.basename(os.path.abspath(out_dir)),
            n_params=param_count(params) - _dropped_count(params, report.dropped),
            notes=report.notes, train_config=model_card.read_train_config(ckpt_dir),
            eval_results=model_card.find_eval_results(ckpt_dir), source=ckpt_dir)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(card)
    report.out_dir = os.path.abspath(out_dir)
    return report


def _dropped_count(params, dropped: list[str]) -> int:
    """Parameters in the dropped kinds (layer indices folded into `layers/…`)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return sum(int(v.size) for k, v in flat.items()
               if re.sub(r"layers_\d+/", "layers/", k) in dropped)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conversion", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="Hugging Face folder -> jaxdyn checkpoint")
    imp.add_argument("hf_dir")
    imp.add_argument("out_dir")
    imp.add_argument("--dtype", default="float32", help="parameter dtype (default float32)")
    imp.add_argument("--unrolled", action="store_true",
                     help="store layers as layers_{i}/… instead of the scanned layers/… [L, …]")
    exp = sub.add_parser("export", help="jaxdyn checkpoint -> Hugging Face folder")
    exp.add_argument("ckpt_dir", help="a `conversion import` folder or a training workdir")
    exp.add_argument("out_dir")
    exp.add_argument("--dtype", default=None,
                     help="tensor dtype (default: the imported model's, else the params')")
    exp.add_argument("--max_shard_size", default="5GB")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "import":
            rep = import_hf(args.hf_dir, args.out_dir, args.dtype, not args.unrolled)
            print(rep)
            print(f"copied: {', '.join(rep.copied) or 'no tokenizer files'}\n"
                  f"wrote {os.path.abspath(args.out_dir)} (params/, model_config.json)")
        else:
            print(export_hf(args.ckpt_dir, args.out_dir, args.dtype, args.max_shard_size))
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

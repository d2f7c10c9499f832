"""CLI: `python -m conversion import HF_DIR OUT_DIR` / `python -m conversion export CKPT OUT`.

import: a Hugging Face folder → `OUT_DIR/params` (orbax, `jaxdyn.checkpoint.save_params`),
`OUT_DIR/model_config.json`, the tokenizer files, `generation_config.json` and the original
`config.json` as `hf_config.json` (export reads its dtype and token ids back).
export: an import folder or a training workdir → a Hugging Face folder with a model card.

Outputs never destroy what conversion did not create (rules: `conversion.paths`):
- OUT_DIR must not be, contain or be inside the source folder or a training workdir (a folder
  with metrics.jsonl, or with model_config.json and checkpoints/ or without params/); refused
  even with --overwrite.
- An existing non-empty OUT_DIR is refused unless --overwrite, which replaces only a previous
  conversion output (every entry a name import/export writes).
- export reads a CKPT_DIR on an object store (gs://, s3://); other URL inputs and every URL
  OUT_DIR are refused (the output is built locally and renamed into place): convert locally,
  then copy the folder to the store.
The output is written in a fresh sibling `OUT_DIR.tmp-…` and renamed onto OUT_DIR when
complete (with --overwrite, swapped atomically; the old folder is deleted after the swap).
Bad input: one line on stderr naming the path or flag, exit code 2, nothing written.
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
from conversion.errors import ConversionError, UnreadableFileError, UnsupportedPathError
from conversion.hf_export import parse_size, write_hf
from conversion.hf_import import float_dtype, from_hf
from conversion.paths import TOKENIZER_FILES, check_local, check_output, read_roots, staging
from jaxdyn.checkpoint import load_model, save_params
from jaxdyn.config import paths
from jaxdyn.model import param_count

HF_CONFIG = "hf_config.json"  # the imported config.json, kept for export


def copy_side_files(src: str, dst: str, names: Sequence[str]) -> list[str]:
    """Copy the named files that exist in `src`; returns the ones copied."""
    copied = []
    for n in names:
        if os.path.isfile(os.path.join(src, n)):
            shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
            copied.append(n)
    return copied


def _source_dir(path: str, what: str, url_ok: bool = False) -> None:
    """`path` is an existing folder; a URL only when `url_ok` (export's CKPT_DIR) and on an
    object store jaxdyn can read (`gs://`, `s3://`)."""
    if url_ok:
        try:
            paths.check_store(path, what)
        except paths.UnsupportedURLError as e:
            raise UnsupportedPathError(str(e)) from None
    else:
        check_local(path, what)
    if not paths.isdir(path):
        raise FileNotFoundError(f"{what} {path!r} is not a folder; give a local "
                                + ("Hugging Face model folder" if what == "HF_DIR" else
                                   "`conversion import` folder or training workdir"))


def import_hf(hf_dir: str, out_dir: str, dtype: str = "float32", scan_layers: bool = True,
              overwrite: bool = False):
    """Convert `hf_dir` into a jaxdyn import folder; returns the ImportReport.

    Paths and flags are checked before any weight is read (`conversion.paths`)."""
    _source_dir(hf_dir, "HF_DIR")
    float_dtype(dtype)
    sources = {"HF_DIR": hf_dir}
    for blobs in read_roots(hf_dir)[1:]:  # a hub cache snapshot reads its repo's blobs/ too
        sources["hub cache blobs/ of HF_DIR"] = blobs
    out = dict(sources=sources,
               overwrite=overwrite, what="OUT_DIR", overwrite_flag="--overwrite")
    check_output(out_dir, **out)
    cfg, params, report = from_hf(hf_dir, dtype=dtype, scan_layers=scan_layers,
                                  return_report=True)
    with staging(out_dir, **out) as tmp:
        save_params(os.path.join(tmp, "params"), params)
        cfg.save(os.path.join(tmp, "model_config.json"))
        shutil.copy2(os.path.join(hf_dir, "config.json"), os.path.join(tmp, HF_CONFIG))
        report.copied = copy_side_files(hf_dir, tmp, (*TOKENIZER_FILES,
                                                      "generation_config.json"))
    return report


def export_hf(ckpt_dir: str, out_dir: str, dtype: str | None = None,
              max_shard_size: str = "5GB", overwrite: bool = False):
    """Export an import folder or a training workdir to a Hugging Face folder + model card.

    Paths and flags are checked before the checkpoint is read (`conversion.paths`)."""
    _source_dir(ckpt_dir, "CKPT_DIR", url_ok=True)
    if dtype is not None:
        float_dtype(dtype)
    parse_size(max_shard_size)
    out = dict(sources={"CKPT_DIR": ckpt_dir}, overwrite=overwrite, what="OUT_DIR",
               overwrite_flag="--overwrite")
    check_output(out_dir, **out)
    try:
        cfg, params, tok_dir = load_model(ckpt_dir)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UnreadableFileError(f"cannot read the checkpoint in CKPT_DIR {ckpt_dir!r}: {e}; "
                                  "give a complete `conversion import` folder or training "
                                  "workdir") from e
    # The small side files (configs, tokenizer, metrics) of an object-store CKPT_DIR are read
    # from a local copy; the checkpoint itself was read above, straight from the store.
    with paths.local_folder(ckpt_dir, skip=("checkpoints", "params")) as side:
        base = paths.absolute(ckpt_dir)
        if paths.is_url(tok_dir):  # the workdir's tokenizer/ (or the folder itself)
            rel = tok_dir[len(base):].strip("/") if tok_dir.startswith(base) else ""
            tok_dir = os.path.join(side, *rel.split("/")) if rel else side
        return _export(cfg, params, tok_dir, side, ckpt_dir, out_dir, out, dtype,
                       max_shard_size)


def _export(cfg, params, tok_dir: str, side: str, ckpt_dir: str, out_dir: str, out: dict,
            dtype: str | None, max_shard_size: str):
    """`export_hf` once the checkpoint is read; `side`: a local folder with CKPT_DIR's files."""
    extra = None
    if os.path.exists(os.path.join(side, HF_CONFIG)):
        extra = hf_config.read_config(os.path.join(side, HF_CONFIG))
        dtype = dtype or hf_config.hf_dtype(extra)
    hf_config.check_exportable(cfg)
    with staging(out_dir, **out) as tmp:
        report = write_hf(cfg, params, tmp, dtype=dtype, max_shard_size=max_shard_size,
                          extra_config=extra)
        copied = copy_side_files(tok_dir, tmp, TOKENIZER_FILES)
        copy_side_files(side, tmp, ("generation_config.json",))
        if not copied:
            report.notes.append(f"no Hugging Face tokenizer files in {tok_dir}; add them "
                                "before uploading")
        card = model_card.render(
            cfg, name=os.path.basename(os.path.abspath(out_dir)),
            n_params=param_count(params) - _dropped_count(params, report.dropped),
            notes=report.notes, train_config=model_card.read_train_config(side),
            eval_results=model_card.find_eval_results(side), source=ckpt_dir)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(card)
    report.out_dir = os.path.abspath(out_dir)
    return report


def _dropped_count(params, dropped: list[str]) -> int:
    """Parameters in the dropped kinds (layer indices folded into `layers/…`)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return sum(int(v.size) for k, v in flat.items()
               if re.sub(r"layers_\d+/", "layers/", k) in dropped)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Usage errors become one line (and exit code 2) instead of argparse's usage block."""

    def error(self, message):
        raise _UsageError(f"{message}; see `{self.prog} --help`")


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if isinstance(e, OSError) and not isinstance(e, ConversionError) and e.errno is not None:
        msg += "; nothing was written"  # a system error (permissions, disk full, …)
    return msg


def main(argv: Sequence[str] | None = None) -> int:
    ap = _Parser(prog="python -m conversion", description=__doc__,
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
    for p in (imp, exp):
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing OUT_DIR that is a previous conversion output "
                            "(never a source folder or a training workdir)")
    try:
        args = ap.parse_args(argv)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.cmd == "import":
            rep = import_hf(args.hf_dir, args.out_dir, args.dtype, not args.unrolled,
                            overwrite=args.overwrite)
            print(rep)
            print(f"copied: {', '.join(rep.copied) or 'no tokenizer files'}\n"
                  f"wrote {os.path.abspath(args.out_dir)} (params/, model_config.json)")
        else:
            print(export_hf(args.ckpt_dir, args.out_dir, args.dtype, args.max_shard_size,
                            overwrite=args.overwrite))
    except (ConversionError, OSError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pieces shared by the commands: one-line user errors (`cli_main`), loading any checkpoint
(optionally sharded over a device mesh: `add_mesh_args`, `mesh_from_args`), reading prompts.

User errors (a `ValueError` jaxdyn defines or raises, a missing file, a refused permission, a
`SystemExit("message")`) print one line `error: <message>` on stderr and exit with status 2, no
traceback; a bug (any other exception) keeps its traceback. `JAXDYN_TRACEBACK=1` shows the
traceback of user errors too.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

import jax

import conversion
import jaxdyn
from jaxdyn import sharding
from jaxdyn.checkpoint import load_model, stored_shardings
from jaxdyn.config import paths
from jaxdyn.data.tokenizer import load_tokenizer
from jaxdyn.train.schema import MeshConfig

F = TypeVar("F", bound=Callable)
# Always user errors: the environment or the files are not as the command needs them.
USER_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_PROJECT = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                 for m in (jaxdyn, conversion))


class UserExit(SystemExit):
    """Exit status 2 once `error: <message>` is on stderr; `str()` is the message."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def fail(message: object) -> NoReturn:
    """Print `error: <message>` (one line) on stderr and exit with status 2."""
    msg = one_line(message).removeprefix("error: ")
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise UserExit(msg)


def is_user_error(e: BaseException) -> bool:
    """FileNotFoundError and the like; a ValueError whose class jaxdyn/conversion define or
    that their code raised. A ValueError raised inside a library (numpy, jax) is a bug."""
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


def traceback_wanted() -> bool:
    return os.environ.get("JAXDYN_TRACEBACK", "") not in ("", "0")


def cli_main(fn: F) -> F:
    """Decorate a command's `main`: user errors become one `error: ...` line and exit 2."""

    @functools.wraps(fn)
    def main(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserExit:
            raise
        except SystemExit as e:  # SystemExit("message"): a refusal the command worded itself
            if isinstance(e.code, str):
                fail(e.code)
            raise
        except Exception as e:
            if traceback_wanted() or not is_user_error(e):
                raise
            fail(one_line(e) or type(e).__name__)

    return main  # type: ignore[return-value]


MESH_KEYS = tuple(f.name for f in dataclasses.fields(MeshConfig))
MESH_HELP = ("device mesh for inference, the trainer's `mesh` block: KEY=N pairs among "
             f"{', '.join(MESH_KEYS)} (one size may be -1: the remaining devices), e.g. "
             "data=2,fsdp=2,tensor=2; or --mesh.KEY=N. Without -1 the first "
             "data*fsdp*tensor devices are used. Parameters are sharded by the training "
             "rules (fsdp, tensor), batches and KV caches over data x fsdp. Default: the "
             "trainer's, every device on the data axis (parameters replicated)")


def add_mesh_args(ap: argparse.ArgumentParser) -> None:
    """`--mesh data=2,fsdp=2,tensor=2` and `--mesh.KEY=N` (the trainer's `mesh` keys)."""
    ap.add_argument("--mesh", metavar="KEY=N[,KEY=N...]", help=MESH_HELP)
    for k in MESH_KEYS:
        ap.add_argument(f"--mesh.{k}", dest=f"mesh_{k}", type=int, metavar="N",
                        help=argparse.SUPPRESS)


def mesh_given(args: argparse.Namespace) -> bool:
    return args.mesh is not None or any(getattr(args, f"mesh_{k}") is not None
                                        for k in MESH_KEYS)


def mesh_from_args(args: argparse.Namespace) -> jax.sharding.Mesh:
    """The mesh of `--mesh`/`--mesh.KEY` over the trainer's defaults (`MeshConfig`)."""
    sizes = dataclasses.asdict(MeshConfig())
    for item in filter(None, (args.mesh or "").replace(" ", "").split(",")):
        key, eq, value = item.partition("=")
        if key not in sizes or not eq:
            raise SystemExit(f"--mesh {args.mesh!r}: {item!r} is not KEY=N with KEY one of "
                             f"{', '.join(MESH_KEYS)}")
        try:
            sizes[key] = int(value)
        except ValueError:
            raise SystemExit(f"--mesh {args.mesh!r}: {key}={value!r} is not an integer") from None
    for k in MESH_KEYS:
        if getattr(args, f"mesh_{k}") is not None:
            sizes[k] = getattr(args, f"mesh_{k}")
    for k, v in sizes.items():
        if v == 0 or v < -1 or (k.startswith("dcn_") and v < 1):
            raise SystemExit(f"--mesh: {k}={v} must be a positive size"
                             + ("" if k.startswith("dcn_") else " or -1"))
    ici = (sizes["data"], sizes["fsdp"], sizes["tensor"])
    dcn = tuple(sizes[f"dcn_{a}"] for a in sharding.MESH_AXES)
    try:
        return sharding.make_mesh(*ici, devices=sharding.mesh_devices(*ici, dcn), dcn=dcn)
    except ValueError as e:
        raise SystemExit(f"--mesh: {e}") from None


def load_for_inference(path: str, mesh: jax.sharding.Mesh | None = None):
    """(cfg, params, tokenizer) from a Hugging Face folder (converted on the fly), a
    `python -m conversion import` output, or a training workdir; the last two may be on an
    object store (`gs://…`, `s3://…`). With a `mesh` the parameters are placed in their
    rules-table shardings (imports and workdirs are read shard by shard, no full copy on any
    device; a converted folder is placed from host memory)."""
    paths.check_store(path, "checkpoint folder")
    if not paths.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
    if paths.exists(paths.join(path, "config.json")) and not paths.exists(
            paths.join(path, "model_config.json")):
        if paths.is_url(path):
            raise FileNotFoundError(f"{path!r} looks like a Hugging Face folder on an object "
                                    "store; copy it locally (conversion reads local folders)")
        cfg, params = conversion.from_hf(path)
        if mesh is not None:
            params = sharding.shard_params(params, stored_shardings(cfg, params, mesh))
        return cfg, params, load_tokenizer(path)
    cfg, params, tok_dir = load_model(path, mesh=mesh)
    return cfg, params, load_tokenizer(tok_dir)


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    if (prompt is None) == (prompts_file is None):
        raise SystemExit("give exactly one of --prompt TEXT or --prompts FILE.jsonl")
    if prompt is not None:
        return [prompt]
    if not os.path.isfile(prompts_file):
        raise FileNotFoundError(f"--prompts {prompts_file!r} is not a file")
    texts = []
    fix = 'each line must be a JSON object like {"prompt": "..."}'
    with open(prompts_file, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SystemExit(f"--prompts {prompts_file}:{n}: not UTF-8 text; convert the "
                                 "file to UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise SystemExit(f"--prompts {prompts_file}:{n}: not valid JSON ({e}); "
                                 f"{fix}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise SystemExit(f"--prompts {prompts_file}:{n}: each line needs a \"prompt\" "
                                 f"text field; {fix}")
            texts.append(rec["prompt"])
    if not texts:
        raise SystemExit(f"--prompts {prompts_file}: no prompts in the file; {fix}")
    return texts

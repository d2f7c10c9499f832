"""Pieces shared by the commands: one-line user errors (`cli_main`), loading any checkpoint,
reading prompts.

User errors (a `ValueError` jaxdyn defines or raises, a missing file, a refused permission, a
`SystemExit("message")`) print one line `error: <message>` on stderr and exit with status 2, no
traceback; a bug (any other exception) keeps its traceback. `JAXDYN_TRACEBACK=1` shows the
traceback of user errors too.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

import conversion
import jaxdyn
from jaxdyn.checkpoint import load_model
from jaxdyn.config import paths
from jaxdyn.data.tokenizer import load_tokenizer

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


def load_for_inference(path: str):
    """(cfg, params, tokenizer) from a Hugging Face folder (converted on the fly), a
    `python -m conversion import` output, or a training workdir; the last two may be on an
    object store (`gs://…`, `s3://…`)."""
    paths.check_store(path, "checkpoint folder")
    if not paths.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
    if paths.exists(paths.join(path, "config.json")) and not paths.exists(
            paths.join(path, "model_config.json")):
        if paths.is_url(path):
            raise FileNotFoundError(f"{path!r} looks like a Hugging Face folder on an object "
                                    "store; copy it locally (conversion reads local folders)")
        cfg, params = conversion.from_hf(path)
        return cfg, params, load_tokenizer(path)
    cfg, params, tok_dir = load_model(path)
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

"""Which tokenizer temporal text (prompts, answers, node names) goes through, and the checks
that refuse one the backbone cannot read.

From scratch (presets `tiny`, `mini`): the syllable tokenizer (`tcg_syllable`,
`jaxdyn.temporal.tokenizer`). On an imported backbone (`init.checkpoint`): the tokenizer
stored with it (`tokenizer.kind="checkpoint"`). A mismatch raises `TokenizerMismatchError`
(a `ConfigError`) when the objective is built, before anything is trained.
"""

from __future__ import annotations

import json
import os

from jaxdyn.config.errors import ConfigError
from jaxdyn.data.tokenizer import (
    FIXED,
    HF_FILE,
    Tokenizer,
    TokenizerNotFoundError,
    load_tokenizer,
)
from jaxdyn.temporal.tokenizer import tokenizer as syllable_tokenizer

CHECKPOINT = "checkpoint"
_FIX = "set --config.tokenizer.kind=checkpoint (the backbone's own tokenizer)"


class TokenizerMismatchError(ConfigError):
    """The configured tokenizer is not one the backbone can read."""


def resolve(tok: Tokenizer | None) -> Tokenizer:
    """`tok`, or the syllable tokenizer when None (the synthetic from-scratch default)."""
    return syllable_tokenizer() if tok is None else tok


def checkpoint_tokenizer(path: str) -> Tokenizer:
    """The tokenizer stored with the model folder or training workdir `path`."""
    try:
        return load_tokenizer(path)
    except TokenizerNotFoundError as e:
        raise TokenizerMismatchError(
            f'tokenizer.kind="checkpoint" but init.checkpoint {path!r} holds no tokenizer '
            f"({HF_FILE} is missing): import the Hugging Face folder together with its "
            f"tokenizer (`python -m conversion import HF_DIR OUT_DIR` copies {HF_FILE}) or "
            f"copy the model's {HF_FILE} into {path!r} ({e})") from e


def configured_tokenizer(kind: str, checkpoint: str = "") -> Tokenizer:
    """The tokenizer `tokenizer.kind` names for temporal text: a fixed one (`tcg_syllable`,
    `byte`, ...) or "checkpoint" (the one stored with `checkpoint`)."""
    if kind == CHECKPOINT:
        if not checkpoint:
            raise TokenizerMismatchError('tokenizer.kind="checkpoint" needs init.checkpoint '
                                         "(an imported model folder holding its tokenizer)")
        return checkpoint_tokenizer(checkpoint)
    if kind in FIXED:
        return FIXED[kind]()
    raise TokenizerMismatchError(
        f"tokenizer.kind={kind!r} cannot encode TCG-Synth text for the temporal objective "
        "('ids' reads numbers, 'bpe' is trained on the data.* documents): use "
        f"{sorted(FIXED)} for a backbone trained from scratch or 'checkpoint' for an imported "
        "one")


def embedding_rows(path: str) -> int | None:
    """The vocabulary (embedding rows) of the model in `path`: `model_config.json` (jaxdyn)
    or `config.json` (Hugging Face); None when neither names one."""
    for name in ("model_config.json", "config.json"):
        try:
            with open(os.path.join(path, name)) as f:
                rows = json.load(f).get("vocab_size")
        except (OSError, ValueError):
            continue
        if isinstance(rows, int):
            return rows
    return None


def check_vocab(tok: Tokenizer, rows: int, where: str) -> None:
    """Every id of `tok` must have an embedding row."""
    if tok.vocab_size > rows:
        raise TokenizerMismatchError(
            f"the {tok.kind} tokenizer has {tok.vocab_size} tokens but {where} has only {rows} "
            f"embedding rows (ids >= {rows} have none): use the tokenizer the backbone was "
            f"trained with; for an imported backbone {_FIX}")


def check_backbone_tokenizer(kind: str, checkpoint: str) -> Tokenizer | None:
    """The tokenizer a run on the backbone in `checkpoint` uses, after refusing a mismatch:
    a tokenizer other than the checkpoint's own (e.g. the syllable one on an imported Qwen), a
    checkpoint without its tokenizer, or more token ids than embedding rows. None when there
    is no such folder to check (the trainer reports a missing init.checkpoint itself)."""
    if not checkpoint or not os.path.isdir(checkpoint):
        if kind != CHECKPOINT:
            configured_tokenizer(kind)  # an unsupported kind fails here
        return None
    tok = configured_tokenizer(kind, checkpoint)
    if kind != CHECKPOINT:
        try:
            own = load_tokenizer(checkpoint)
        except TokenizerNotFoundError:
            own = None
        if own is None or own.fingerprint() != tok.fingerprint():
            what = ("no tokenizer, so nothing says which ids it reads; copy its "
                    f"{HF_FILE} there and" if own is None else
                    f"its own {own.kind} tokenizer (vocab {own.vocab_size}):")
            raise TokenizerMismatchError(
                f"tokenizer.kind={kind!r} does not match the backbone in init.checkpoint "
                f"{checkpoint!r}, which comes with {what} {_FIX}; syllable/byte ids fed to "
                "an imported model train and mean nothing")
    rows = embedding_rows(checkpoint)
    if rows is not None:
        check_vocab(tok, rows, f"the backbone in init.checkpoint {checkpoint!r}")
    return tok

"""Tokenizers with one surface: a fixed byte tokenizer and Hugging Face `tokenizers` models.

`Tokenizer.encode` never adds special tokens; the data pipeline appends `eos_id` to every
document (and prepends `bos_id` when the tokenizer has one).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from jaxdyn.config import paths

META_FILE = "jaxdyn_tokenizer.json"
HF_FILE = "tokenizer.json"
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
# Names tried, in order, when a tokenizer folder does not say which token ends a document.
_EOS_GUESSES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|eot_id|>")


class TokenizerNotFoundError(FileNotFoundError):
    """A folder holds no tokenizer this module can read."""


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` to a temporary file beside `path`, then rename it over `path`: readers
    (and a crash) never see half a file. On an object store (`gs://…`): `write` goes to a
    local temporary file, uploaded as one object (all-or-nothing)."""
    if paths.is_url(path):
        fd, tmp = tempfile.mkstemp(prefix="jaxdyn-tok-")
        os.close(fd)
        try:
            write(tmp)
            with open(tmp, "rb") as f:
                paths.write_atomic(path, f.read())
        finally:
            os.remove(tmp)
        return
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class Tokenizer:
    """Base: `vocab_size`, `bos_id` (None when unused), `eos_id`, `pad_id`."""

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    kind: str

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of many texts (may run in parallel); one array per text."""
        return [np.asarray(self.encode(t), np.int32) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str) -> None:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Stable digest of the vocabulary; keys the token cache."""
        raise NotImplementedError

    def _meta(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id}

    def _write_meta(self, directory: str) -> None:
        paths.makedirs(directory)
        _write_atomic(paths.join(directory, META_FILE),
                      lambda tmp: _write_text(tmp, json.dumps(self._meta(), indent=2)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._meta()})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then eos=256 and pad=257 (vocab 258, no BOS)."""

    kind = "byte"

    def __init__(self) -> None:
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = 258, None, 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        """Writes only `jaxdyn_tokenizer.json` (the byte vocabulary is fixed)."""
        self._write_meta(directory)

    def fingerprint(self) -> str:
        return "byte-v1"


class IdsTokenizer(Tokenizer):
    """Text that already is token ids ("3 17 5 …", ids < `n_ids`), for synthetic corpora (a
    known Markov chain, say); eos = n_ids, pad = n_ids + 1."""

    kind = "ids"

    def __init__(self, n_ids: int) -> None:
        if n_ids < 1:
            raise ValueError(f"an ids tokenizer needs tokenizer.vocab_size >= 1, got {n_ids}")
        self.n_ids = int(n_ids)
        self.vocab_size, self.bos_id = self.n_ids + 2, None
        self.eos_id, self.pad_id = self.n_ids, self.n_ids + 1

    def encode(self, text: str) -> list[int]:
        ids = [int(t) for t in text.split()]
        bad = [i for i in ids if not 0 <= i < self.n_ids]
        if bad:
            raise ValueError(f"ids tokenizer: ids {bad[:3]} outside [0, {self.n_ids})")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids if 0 <= int(i) < self.n_ids)

    def save(self, directory: str) -> None:
        self._write_meta(directory)

    def _meta(self) -> dict:
        return {**super()._meta(), "n_ids": self.n_ids}

    def fingerprint(self) -> str:
        return f"ids-{self.n_ids}"


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (BPE trained here, or any `tokenizer.json`)."""

    kind = "hf"

    def __init__(self, tok, *, eos_id: int, pad_id: int | None = None,
                 bos_id: int | None = None) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_id, self.bos_id = int(eos_id), None if bos_id is None else int(bos_id)
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self.tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str) -> None:
        """`tokenizer.json` plus the special-token ids in `jaxdyn_tokenizer.json`, each written
        whole (temp file + rename), the ids first: a `tokenizer.json` there (what
        `make_tokenizer` looks for) always has its ids beside it."""
        self._write_meta(directory)
        _write_atomic(paths.join(directory, HF_FILE), self.tok.save)

    def fingerprint(self) -> str:
        h = hashlib.sha1(self.tok.to_str().encode())
        h.update(json.dumps(self._meta(), sort_keys=True).encode())
        return h.hexdigest()[:16]


def byte_tokenizer() -> Tokenizer:
    """256 bytes + eos + pad (vocab 258)."""
    return ByteTokenizer()


# Tokenizers with a fixed vocabulary, by `kind`: nothing to train or read but their name.
# Features add theirs with `register_tokenizer` (e.g. `tcg_syllable`, jaxdyn.temporal).
FIXED: dict[str, Callable[[], Tokenizer]] = {"byte": byte_tokenizer}


def register_tokenizer(kind: str, factory: Callable[[], Tokenizer]) -> None:
    FIXED[kind] = factory


def tokenizer_kinds() -> tuple[str, ...]:
    """Every `tokenizer.kind` a config may name."""
    return (*FIXED, "ids", "bpe", "checkpoint")


def train_bpe(texts: Iterable[str], vocab_size: int, directory: str) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) with `<|endoftext|>` (eos) and `<|pad|>`; save it."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + 2:
        raise ValueError(f"BPE vocab_size={vocab_size} is too small: byte-level BPE needs at "
                         "least 258 (256 bytes + eos + pad); raise tokenizer.vocab_size")
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out = HFTokenizer(tok, eos_id=tok.token_to_id(EOS_TOKEN), pad_id=tok.token_to_id(PAD_TOKEN))
    out.save(directory)
    return out


def _token_id(tok, value) -> int | None:
    """An id from a config value: an int, a token string, or {"content": token}."""
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, list):
        return _token_id(tok, value[0]) if value else None
    return tok.token_to_id(str(value))


def _read_json(path: str) -> dict:
    try:
        return json.loads(paths.read_bytes(path))
    except FileNotFoundError:
        return {}


def _special_ids(tok, directory: str) -> dict:
    """bos/eos/pad ids from jaxdyn meta, tokenizer_config.json, generation/model config."""
    meta = _read_json(paths.join(directory, META_FILE))
    if "eos_id" in meta:
        return {k: meta.get(k) for k in ("bos_id", "eos_id", "pad_id")}
    tc = _read_json(paths.join(directory, "tokenizer_config.json"))
    out = {"bos_id": _token_id(tok, tc.get("bos_token")),
           "eos_id": _token_id(tok, tc.get("eos_token")),
           "pad_id": _token_id(tok, tc.get("pad_token"))}
    for name in ("generation_config.json", "config.json"):
        cfg = _read_json(paths.join(directory, name))
        if out["eos_id"] is None:
            out["eos_id"] = _token_id(None, cfg.get("eos_token_id"))
        if out["bos_id"] is None:
            out["bos_id"] = _token_id(None, cfg.get("bos_token_id"))
    if out["eos_id"] is None:
        out["eos_id"] = next((i for i in map(tok.token_to_id, _EOS_GUESSES) if i is not None),
                             None)
    if out["eos_id"] is None:
        raise ValueError(f"tokenizer in {directory!r} names no end-of-text token; add "
                         f"{META_FILE} with an eos_id or an eos_token in tokenizer_config.json")
    adds_bos = tc.get("add_bos_token")
    if adds_bos is None and out["bos_id"] is not None:  # e.g. Llama 3: the post-processor
        adds_bos = tok.encode("a", add_special_tokens=True).ids[:1] == [out["bos_id"]]
    if not adds_bos:
        out["bos_id"] = None  # e.g. Qwen: a bos token may be listed but is never prepended
    return out


def load_tokenizer(directory: str) -> Tokenizer:
    """A saved byte tokenizer, an HF `tokenizer.json` folder, or what `AutoTokenizer` reads
    locally (never remote code); a training workdir's `tokenizer/` subfolder also works.
    `directory` may be on an object store (`gs://…`)."""
    if not paths.isdir(directory):
        raise TokenizerNotFoundError(f"tokenizer folder {directory!r} does not exist")
    if (not paths.exists(paths.join(directory, HF_FILE))
            and not paths.exists(paths.join(directory, META_FILE))
            and paths.isdir(paths.join(directory, "tokenizer"))):
        directory = paths.join(directory, "tokenizer")
    meta = _read_json(paths.join(directory, META_FILE))
    if meta.get("kind") == "ids":
        return IdsTokenizer(meta["n_ids"])
    if meta.get("kind") in FIXED:
        return FIXED[meta["kind"]]()
    if meta.get("kind") not in (None, "hf"):  # e.g. a feature's tokenizer not imported
        raise TokenizerNotFoundError(f"tokenizer in {directory!r} is of kind {meta['kind']!r}, "
                                     f"which no imported package registers (known: "
                                     f"{sorted(FIXED)}); import the feature that defines it")
    from tokenizers import Tokenizer as HFTok

    if paths.exists(paths.join(directory, HF_FILE)):
        tok = HFTok.from_str(paths.read_text(paths.join(directory, HF_FILE)))
    else:
        with paths.local_folder(directory) as local:  # transformers reads local files only
            tok = _auto_tokenizer(local)
    return HFTokenizer(tok, **_special_ids(tok, directory))


def _auto_tokenizer(directory: str):
    """The `tokenizers` backend of `transformers.AutoTokenizer` (local files only)."""
    try:
        from transformers import AutoTokenizer

        auto = AutoTokenizer.from_pretrained(directory, local_files_only=True,
                                             trust_remote_code=False)
        backend = getattr(auto, "backend_tokenizer", None)
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise TokenizerNotFoundError(
            f"no tokenizer in folder {directory!r}: expected {HF_FILE}, {META_FILE}, or files "
            f"transformers.AutoTokenizer reads locally ({type(e).__name__}: {e})") from e
    if backend is None:
        raise TokenizerNotFoundError(f"tokenizer in {directory!r} has no fast (tokenizers) "
                                     f"backend; convert it and save {HF_FILE} there")
    return backend


def make_tokenizer(kind: str, *, directory: str, texts: Iterable[str] | None = None,
                   vocab_size: int | None = None, checkpoint_dir: str | None = None) -> Tokenizer:
    """A fixed tokenizer ("byte", or one a feature registers) | "ids" (texts of `vocab_size`
    token ids) | "bpe" (trained on `texts` once, then reloaded from `directory`) |
    "checkpoint" (the tokenizer stored with `checkpoint_dir`)."""
    if kind in FIXED:
        return FIXED[kind]()
    if kind == "ids":  # vocab_size counts the ids; EOS and pad come after them
        return IdsTokenizer(vocab_size or 0)
    if kind == "bpe":
        if paths.exists(paths.join(directory, HF_FILE)):
            tok = load_tokenizer(directory)
            if vocab_size and tok.vocab_size != vocab_size:
                raise ValueError(f"BPE tokenizer in {directory!r} has vocab {tok.vocab_size}, "
                                 f"not the configured {vocab_size}; delete that folder to "
                                 "retrain or set tokenizer.vocab_size to match")
            return tok
        if texts is None or not vocab_size:
            raise ValueError("training a BPE tokenizer needs texts and vocab_size")
        return train_bpe(texts, vocab_size, directory)
    if kind == "checkpoint":
        if not checkpoint_dir:
            raise ValueError('tokenizer kind "checkpoint" needs checkpoint_dir (init.checkpoint)')
        return load_tokenizer(checkpoint_dir)
    raise ValueError(f"unknown tokenizer kind {kind!r}; use one of {tokenizer_kinds()}")

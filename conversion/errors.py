"""Named conversion errors: each says what is wrong, with names and shapes, and how to fix it."""

from __future__ import annotations


class ConversionError(ValueError):
    """Base class: a Hugging Face folder or a jaxdyn model cannot be converted."""


class WrongFamilyError(ConversionError):
    """`model_type` is not one of the supported families."""


class UnsupportedConfigError(ConversionError):
    """A config value changes the maths in a way jaxdyn does not implement (e.g. sliding window)."""


class ShapeMismatchError(ConversionError):
    """A tensor's shape differs from what the config implies."""


class MissingTensorError(ConversionError):
    """The checkpoint lacks tensors the config needs."""


class UnconsumedTensorError(ConversionError):
    """The checkpoint holds tensors that no parameter consumes."""


class TiedEmbeddingError(ConversionError):
    """`tie_word_embeddings` is set but `lm_head.weight` differs from the embedding."""


class UnreadableFileError(ConversionError, OSError):
    """A weights or config file cannot be opened or parsed; the message names the file."""


class UnsupportedPathError(ConversionError):
    """A path is an object-store URL (`gs://`, `s3://`, `http(s)://`, …); conversion reads and
    writes local folders only."""


class UnsafePathError(ConversionError):
    """A weights index names a file outside its checkpoint folder (`..`, an absolute path, a
    symlink resolving outside); nothing outside the folder is opened."""


class OutputRefusedError(ConversionError):
    """The output folder exists, or would overlap the source or a training workdir; nothing was
    written and nothing was removed."""

"""Named data errors; each message says what is wrong and how to fix it."""


class EmptyDatasetError(ValueError):
    """A source, split or shard holds no usable documents."""


class DataSourceNotFoundError(FileNotFoundError):
    """`data.source` names a path or glob that does not exist."""


class UnknownSourceError(ValueError):
    """`data.source` is not builtin, a supported local file kind, or hub:NAME."""


class DataConfigError(ValueError):
    """Invalid packing arguments (seq_len, batch_size, process index/count)."""


class DataFormatError(ValueError):
    """A local data file is not what its extension says: not UTF-8 text, binary, malformed
    JSON/JSONL or not Parquet. The message names the file (and the line) and the fix."""


class DataFieldError(DataFormatError, KeyError):
    """The data has no column `data.text_field` (also a KeyError, as it was before)."""

    __str__ = BaseException.__str__  # the message, not KeyError's quoted repr

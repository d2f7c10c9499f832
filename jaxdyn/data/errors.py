"""Named data errors; each message says what is wrong and how to fix it."""


class EmptyDatasetError(ValueError):
    """A source, split or shard holds no usable documents."""


class DataSourceNotFoundError(FileNotFoundError):
    """`data.source` names a path or glob that does not exist."""


class UnknownSourceError(ValueError):
    """`data.source` is not builtin, a supported local file kind, or hub:NAME."""


class DataConfigError(ValueError):
    """Invalid packing arguments (seq_len, batch_size, process index/count)."""

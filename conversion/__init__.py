"""Hugging Face ⇄ jaxdyn checkpoint conversion for Qwen2 / Qwen2.5, LLaMA and GPT-NeoX / Pythia.

- `from_hf(path, *, dtype, mesh, scan_layers) -> (ModelConfig, params)`: streaming import.
- `to_hf(cfg, params, out_dir, *, dtype, max_shard_size, overwrite)`: sharded safetensors
  export; refuses to replace what it did not write (`conversion.paths`).
- CLI: `python -m conversion import HF_DIR OUT_DIR` / `python -m conversion export CKPT OUT`.
See docs/conversion.md for the mapping tables and the checks.
"""

from conversion.errors import (
    ConversionError,
    MissingTensorError,
    OutputRefusedError,
    ShapeMismatchError,
    TiedEmbeddingError,
    UnconsumedTensorError,
    UnreadableFileError,
    UnsafePathError,
    UnsupportedConfigError,
    UnsupportedPathError,
    WrongFamilyError,
)
from conversion.hf_export import ExportReport, to_hf
from conversion.hf_import import ImportReport, from_hf

__all__ = [
    "ConversionError", "ExportReport", "ImportReport", "MissingTensorError",
    "OutputRefusedError", "ShapeMismatchError", "TiedEmbeddingError", "UnconsumedTensorError",
    "UnreadableFileError", "UnsafePathError", "UnsupportedConfigError", "UnsupportedPathError",
    "WrongFamilyError", "from_hf", "to_hf",
]

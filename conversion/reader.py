"""Locate and read the weight files of a Hugging Face folder, one tensor at a time.

Sources, first hit wins: `model.safetensors.index.json`, `model.safetensors`,
`pytorch_model.bin.index.json`, `pytorch_model.bin`. Safetensors files are opened with
`safe_open(framework="numpy")` for each tensor read, so no file stays mapped (mapped pages would
count towards the process's resident memory); `.bin` files go through
`torch.load(weights_only=True, mmap=True)` and need the `convert` extra. Nothing is unpickled
beyond what `weights_only` allows. Weight files are read only from inside the folder (an
index entry with `..`, an absolute path or a symlink resolving outside is refused before any
file is opened; hub cache snapshots may point into their own `blobs/`: `conversion.paths`).
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from conversion.errors import UnreadableFileError
from conversion.paths import check_local, check_weight_file

SAFE_INDEX, SAFE_ONE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_ONE = "pytorch_model.bin.index.json", "pytorch_model.bin"
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _weight_files(path: str) -> tuple[str, list[str]]:
    """("safetensors" | "bin", shard files) of a folder; every file must lie inside it
    (`conversion.paths.check_weight_file`), checked before any weight file is opened."""
    check_local(path, "checkpoint folder")
    for index, kind in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        file = os.path.join(path, index)
        if os.path.lexists(file):
            check_weight_file(path, index)
            try:
                with open(file) as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UnreadableFileError(f"cannot read {file}: {e}") from e
            return kind, sorted({check_weight_file(path, v, index=file, entry=k)
                                 for k, v in weight_map.items()})
    for one, kind in ((SAFE_ONE, "safetensors"), (BIN_ONE, "bin")):
        if os.path.lexists(os.path.join(path, one)):
            return kind, [check_weight_file(path, one)]
    raise FileNotFoundError(f"no weights in {path!r}: expected {SAFE_INDEX}, {SAFE_ONE}, "
                            f"{BIN_INDEX} or {BIN_ONE}")


class CheckpointReader:
    """Names, shapes and dtypes of every tensor (headers only), and `read(name)`."""

    def __init__(self, path: str):
        self.kind, self.files = _weight_files(path)
        self.where: dict[str, str] = {}  # tensor name -> file
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self._bin: dict[str, dict] = {}
        for file in self.files:
            if self.kind == "safetensors":
                self._scan_safetensors(file)
            else:
                self._scan_bin(file)

    def _scan_safetensors(self, file: str) -> None:
        from safetensors import safe_open

        if not os.path.exists(file):
            raise UnreadableFileError(f"cannot read {file}: the index names it but it is missing")
        try:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self._add(name, file, tuple(sl.get_shape()), _ST_DTYPES[sl.get_dtype()])
        except Exception as e:  # safetensors raises its own error types
            raise UnreadableFileError(f"cannot read {file}: {e}") from e

    def _scan_bin(self, file: str) -> None:
        try:
            import torch
        except ImportError as e:
            raise UnreadableFileError(f"{file} is a PyTorch .bin checkpoint; reading it needs "
                                      "torch: pip install -e '.[convert]'") from e
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise UnreadableFileError(f"cannot read {file}: {e}") from e
        self._bin[file] = sd
        for name, t in sd.items():
            self._add(name, file, tuple(t.shape), _torch_np_dtype(t))

    def _add(self, name, file, shape, dtype) -> None:
        self.where[name], self.shapes[name], self.dtypes[name] = file, shape, np.dtype(dtype)

    @property
    def names(self) -> set[str]:
        return set(self.where)

    def nbytes(self, names=None) -> int:
        names = self.where if names is None else names
        return sum(int(np.prod(self.shapes[n])) * self.dtypes[n].itemsize for n in names)

    def read(self, name: str) -> np.ndarray:
        file = self.where[name]
        try:
            if self.kind == "safetensors":
                from safetensors import safe_open

                with safe_open(file, framework="numpy") as f:
                    return f.get_tensor(name)
            return _torch_to_numpy(self._bin[file][name])
        except Exception as e:
            raise UnreadableFileError(f"cannot read tensor {name!r} from {file}: {e}") from e

    def close(self) -> None:
        self._bin.clear()


def _torch_np_dtype(t) -> np.dtype:
    import torch

    if t.dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(str(t.dtype).removeprefix("torch."))


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    return t.numpy().copy()

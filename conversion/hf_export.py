"""jaxdyn → Hugging Face export (docs/conversion.md): sharded safetensors, index, config.json.

The tables of `conversion.mapping` are inverted exactly, so an imported model exports to the
same bytes. Tensors are produced one shard at a time (device → host per layer slice), and the
folder is written under a temporary name and renamed when complete.

Routed models (MoD / DTF) export their dense part: unit j's two layers (`dense`/`routed` or
`dec`/`dyn`) become dense layers 2j and 2j+1; routers, predictors and DTF priors are dropped.
Multi-token models drop their extra heads. Everything dropped is listed in the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import numpy as np
from flax import traverse_util

from conversion import hf_config, mapping
from conversion.errors import ConversionError
from conversion.paths import staging
from jaxdyn.model import ModelConfig
from jaxdyn.model.routing.options import unit_slots

_LAYER = re.compile(r"layers_\d+/")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


@dataclasses.dataclass
class ExportReport:
    out_dir: str
    files: list[str]
    tensors: int
    bytes: int
    dtype: str
    dropped: list[str]  # jaxdyn parameter kinds not exported
    notes: list[str]

    def __str__(self) -> str:
        s = (f"exported {self.tensors} tensors, {self.bytes / 2**20:.1f} MiB ({self.dtype}) in "
             f"{len(self.files)} shard(s) to {self.out_dir}")
        if self.dropped:
            s += f"; dropped: {', '.join(self.dropped)}"
        return s + "".join(f"\nnote: {n}" for n in self.notes)


def parse_size(size: int | str) -> int:
    """Bytes of "5GB", "200MB", "10KiB" or an int (HF's convention: GB = 10^9)."""
    if isinstance(size, int) and size > 0:
        return size
    size = str(size)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", size.upper())
    n = int(float(m.group(1)) * _UNITS[m.group(2) or "B"]) if m else 0
    if n <= 0:
        raise ConversionError(f"max_shard_size {size!r}: give a positive size, e.g. '5GB', "
                              "'200MB' or a number of bytes")
    return n


class _Source:
    """Reads dense layer l's parameter `jx` from any layout (scanned/unrolled, dense/routed)."""

    def __init__(self, cfg: ModelConfig, params: dict[str, Any]):
        self.flat = traverse_util.flatten_dict(params, sep="/")
        self.cfg, self.used = cfg, set()
        self.slots = {off: name for name, off in unit_slots(cfg).items()}

    def path(self, jx: str, layer: int | None) -> tuple[str, int | None]:
        """Flat path holding the parameter, and the index on its leading axis (scanned)."""
        if layer is None:
            path, idx = jx, None
        else:
            n = len(self.slots)  # layers per unit; 0: a dense model's unit is the layer
            unit, slot = (layer, "") if not n else (layer // n, self.slots[layer % n] + "/")
            if self.cfg.scan_layers:
                path, idx = f"layers/{slot}{jx}", unit
            else:
                path, idx = f"layers_{unit}/{slot}{jx}", None
        if path not in self.flat:
            raise ConversionError(f"parameter {path!r} is missing from the params tree; was it "
                                  "built for this config?")
        return path, idx

    def get(self, jx: str, layer: int | None) -> np.ndarray:
        path, idx = self.path(jx, layer)
        self.used.add(path)
        a = self.flat[path]
        return np.asarray(a if idx is None else a[idx])

    def dropped(self) -> list[str]:
        left = {_LAYER.sub("layers/", p) for p in self.flat if p not in self.used}
        return sorted(left)


def _plan(cfg: ModelConfig, src: _Source, dtype: str | None) -> list[tuple[str, Any, int]]:
    """(HF name, (rule, layer), bytes) in file order (layer by layer); sizes from shapes only."""
    items = []
    for r in mapping.rules_for(cfg):
        for i in range(cfg.num_layers) if r.layer else [None]:
            dt = np.dtype(dtype or src.flat[src.path(r.jx[0], i)[0]].dtype)
            items.append((r.name(i), (r, i), int(np.prod(r.hf_shape)) * dt.itemsize))
    return sorted(items, key=lambda it: (-1 if it[1][1] is None else it[1][1], it[0]))


def _shards(plan, limit: int) -> list[list]:
    shards, cur, size = [], [], 0
    for it in plan:
        if cur and size + it[2] > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += it[2]
    return shards + [cur] if cur else shards


def write_hf(cfg: ModelConfig, params: dict[str, Any], folder: str, *, dtype: str | None = None,
             max_shard_size: int | str = "5GB", extra_config: dict | None = None
             ) -> ExportReport:
    """Write weights, index and config.json into an existing folder (see `to_hf`)."""
    from safetensors.numpy import save_file

    notes = []
    dense_cfg = cfg
    if cfg.arch != "dense":
        dense_cfg = cfg.replace(arch="dense", routing=())
        notes.append(f"{cfg.arch} model exported as its dense part: each unit's layers are "
                     "dense layers, every token passes every layer (routing is not kept)")
    src = _Source(cfg, params)
    plan = _plan(dense_cfg, src, dtype)
    shards = _shards(plan, parse_size(max_shard_size))
    n = len(shards)
    weight_map, total, out_dtypes = {}, 0, set()
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, (rule, layer), _ in shard:
            arrays = tuple(src.get(jx, layer) for jx in rule.jx)
            w = rule.save(arrays)
            w = np.ascontiguousarray(w.astype(dtype) if dtype else w)
            tensors[name] = w
            out_dtypes.add(str(w.dtype))
            weight_map[name] = fname
            total += w.nbytes
        save_file(tensors, os.path.join(folder, fname), metadata={"format": "pt"})
        del tensors
    dropped = src.dropped()
    if dropped:
        notes.append(f"not exported (no Hugging Face counterpart): {', '.join(dropped)}")
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    out_dtype = "/".join(sorted(out_dtypes))
    hf = hf_config.from_model_config(dense_cfg, out_dtype, extra_config)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    return ExportReport(folder, sorted(set(weight_map.values())), len(weight_map), total,
                        out_dtype, dropped, notes)


def to_hf(cfg: ModelConfig, params: dict[str, Any], out_dir: str, *, dtype: str | None = None,
          max_shard_size: int | str = "5GB", extra_config: dict | None = None,
          overwrite: bool = False) -> ExportReport:
    """Write a Hugging Face folder (`AutoModelForCausalLM.from_pretrained` loads it).

    `dtype=None` keeps each parameter's dtype; `extra_config` carries token ids
    (`bos_token_id`, `eos_token_id`, `pad_token_id`) into config.json. The folder appears
    atomically (written under a temporary name, then renamed). An existing non-empty `out_dir`
    is refused unless `overwrite=True`, and then replaced only if it is a previous conversion
    output outside any training workdir (`conversion.paths`).
    """
    hf_config.check_exportable(cfg)
    parse_size(max_shard_size)
    with staging(out_dir, overwrite=overwrite) as tmp:
        report = write_hf(cfg, params, tmp, dtype=dtype, max_shard_size=max_shard_size,
                          extra_config=extra_config)
    report.out_dir = os.path.abspath(out_dir)
    return report

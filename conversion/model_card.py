"""A generated Hub model card (README.md) for an exported folder.

Sections: architecture (from the ModelConfig), routing settings and what the export dropped,
training config (a training workdir's resolved `config.json`), evaluation results (an
`eval*.json` / `results.json` file, lm-eval style or flat, or the last validation record of
`metrics.jsonl`).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from conversion.hf_config import ARCHITECTURES
from jaxdyn.model import ModelConfig

EVAL_FILES = ("eval.json", "eval_results.json", "results.json", "eval/*.json", "results_*.json")


def _table(rows: list[tuple[str, Any]], head=("setting", "value")) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def architecture_rows(cfg: ModelConfig, n_params: int | None) -> list[tuple[str, Any]]:
    rope = cfg.rope_type
    if cfg.rope_type == "linear":
        rope += f" (factor {cfg.rope_factor})"
    elif cfg.rope_type == "llama3":
        rope += (f" (factor {cfg.rope_factor}, low {cfg.rope_low_freq_factor}, high "
                 f"{cfg.rope_high_freq_factor}, original context {cfg.rope_original_max_position})")
    rows = [("family", f"`{cfg.family}` ({ARCHITECTURES[cfg.family]})"),
            ("layers", cfg.num_layers), ("width D", cfg.hidden_size),
            ("heads / kv heads / head dim", f"{cfg.num_heads} / {cfg.num_kv_heads} / "
                                            f"{cfg.head_dim}"),
            ("MLP width", cfg.intermediate_size), ("vocabulary", cfg.vocab_size),
            ("context", cfg.max_position_embeddings),
            ("RoPE", f"θ {cfg.rope_theta:g}, {rope}, rotary fraction {cfg.rotary_pct}"),
            ("norm", f"{cfg.norm_type} (eps {cfg.norm_eps:g})"), ("activation", cfg.activation),
            ("residual", "parallel" if cfg.parallel_residual else "sequential"),
            ("tied embeddings", cfg.tie_embeddings)]
    if n_params is not None:
        rows.append(("parameters (exported)", f"{n_params:,}"))
    return rows


def find_eval_results(folder: str | None) -> dict[str, dict[str, float]]:
    """{task or "validation": {metric: value}} from the files a workdir may hold."""
    if not folder or not os.path.isdir(folder):
        return {}
    for pattern in EVAL_FILES:
        for file in sorted(glob.glob(os.path.join(folder, pattern))):
            try:
                with open(file) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue
            res = _parse_eval(data, os.path.splitext(os.path.basename(file))[0])
            if res:
                return res
    metrics = os.path.join(folder, "metrics.jsonl")
    if os.path.exists(metrics):
        last = {}
        with open(metrics) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                vals = {k: v for k, v in rec.items() if k.startswith(("val", "eval"))
                        and isinstance(v, (int, float))}
                if vals:
                    last = {**vals, **({"step": rec["step"]} if "step" in rec else {})}
        if last:
            return {"validation (metrics.jsonl)": last}
    return {}


def _parse_eval(data: Any, name: str) -> dict[str, dict[str, float]]:
    if isinstance(data, dict) and isinstance(data.get("results"), dict):  # lm-eval output
        return {task: {k: v for k, v in m.items() if isinstance(v, (int, float))}
                for task, m in data["results"].items() if isinstance(m, dict)}
    if isinstance(data, dict):
        flat = {k: v for k, v in data.items() if isinstance(v, (int, float))}
        return {name: flat} if flat else {}
    return {}


def render(cfg: ModelConfig, *, name: str, n_params: int | None = None,
           notes: list[str] = (), train_config: dict | None = None,
           eval_results: dict[str, dict[str, float]] | None = None,
           source: str | None = None) -> str:
    tags = ["jaxdyn", cfg.family] + ([cfg.arch] if cfg.arch != "dense" else [])
    out = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    out += [f"- {t}" for t in tags]
    out += ["---", "", f"# {name}", "",
            "Exported from a jaxdyn checkpoint"
            + (f" (`{source}`)" if source else "") + " with `python -m conversion export`. "
            "It loads with `transformers.AutoModelForCausalLM.from_pretrained`.", "",
            "## Architecture", "", _table(architecture_rows(cfg, n_params)), "",
            "## Routing", ""]
    if cfg.arch == "dense":
        out.append("Dense model: every token passes every layer.")
    else:
        out.append(f"Trained as `{cfg.arch}` with these routing settings:")
        out += ["", _table(sorted(cfg.routing_options.items()), ("option", "value"))]
    for n in notes:
        out += ["", f"- {n}"]
    out += ["", "## Training", ""]
    if train_config:
        out += ["Resolved training config (`config.json` of the workdir):", "", "```json",
                json.dumps(train_config, indent=2, sort_keys=True, default=str), "```"]
    else:
        out.append("No training config was found with the checkpoint (an import of a "
                   "Hugging Face model, or a workdir without `config.json`).")
    out += ["", "## Evaluation", ""]
    if eval_results:
        rows = [(f"{task} / {metric}", f"{v:.6g}") for task, ms in eval_results.items()
                for metric, v in ms.items()]
        out.append(_table(rows, ("task / metric", "value")))
    else:
        out.append("No evaluation results were found with the checkpoint.")
    return "\n".join(out) + "\n"


def read_train_config(folder: str | None) -> dict | None:
    """A training workdir's resolved config (not an HF config.json)."""
    file = os.path.join(folder or "", "config.json")
    if not folder or not os.path.exists(file):
        return None
    try:
        with open(file) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return None if "model_type" in data else data

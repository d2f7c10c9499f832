"""Pieces shared by the inference commands: loading any checkpoint, reading prompts."""

from __future__ import annotations

import json
import os

import conversion
from jaxdyn.checkpoint import load_model
from jaxdyn.data.tokenizer import load_tokenizer


def load_for_inference(path: str):
    """(cfg, params, tokenizer) from a Hugging Face folder (converted on the fly), a
    `python -m conversion import` output, or a training workdir."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
    if os.path.exists(os.path.join(path, "config.json")) and not os.path.exists(
            os.path.join(path, "model_config.json")):
        cfg, params = conversion.from_hf(path)
        return cfg, params, load_tokenizer(path)
    cfg, params, tok_dir = load_model(path)
    return cfg, params, load_tokenizer(tok_dir)


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    if (prompt is None) == (prompts_file is None):
        raise SystemExit("give exactly one of --prompt TEXT or --prompts FILE.jsonl")
    if prompt is not None:
        return [prompt]
    texts = []
    with open(prompts_file) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                rec = json.loads(line)
                if "prompt" not in rec:
                    raise SystemExit(f"{prompts_file}:{n}: each line needs a \"prompt\" field")
                texts.append(rec["prompt"])
    return texts

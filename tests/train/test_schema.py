"""The typed config schema: every shipped config parses with every preset, a preset name means
one model shape everywhere, defaults are written once, and bad keys or values are refused with
the closest valid key before anything runs."""

import dataclasses
import importlib.util
from pathlib import Path

import ml_collections as mlc
import pytest

from configs.presets import PRESETS
from jaxdyn.config.errors import ConfigError, ConfigKeyError, ConfigValueError
from jaxdyn.config.loader import load_config
from jaxdyn.train import schema

ROOT = Path(__file__).resolve().parents[2]
SHAPE = ("hidden_size", "num_layers", "num_heads", "head_dim", "intermediate_size")


def config_files():
    for path in sorted((ROOT / "configs").glob("*.py")):
        if path.name in ("__init__.py", "presets.py"):
            continue
        spec = importlib.util.spec_from_file_location(f"cfgmod_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield path.name, mod


def presets():
    for name, mod in config_files():
        for preset in getattr(mod, "PRESETS", ()):
            # A run-size variant names the shape preset it uses (e.g. dtf `c0.125` -> small).
            yield f"configs/{name}:{preset}", getattr(mod, "PRESET_SHAPE", {}).get(preset, preset)


@pytest.mark.parametrize(("spec", "shape"), list(presets()))
def test_every_config_and_preset_parses_and_keeps_the_preset_shape(spec, shape):
    cfg = load_config(spec)
    if "train" in cfg:  # a run config: every block checks out as its dataclass
        blocks = schema.check(cfg)
        assert blocks["train"].steps >= 1 and blocks["model"].num_layers >= 1
    table = PRESETS[shape]["model"]
    assert {k: cfg.model[k] for k in SHAPE} == {k: table[k] for k in SHAPE}, spec


def test_defaults_are_the_dataclass_defaults():
    c = schema.defaults("mtp", "temporal")
    for name in (*schema.CORE, "mtp", "temporal"):
        assert c[name].to_dict() == schema.block_dict(schema.BLOCKS[name]()), name
    # configs/standard.py:tiny sets nothing the preset table does not say
    tiny = load_config("configs/standard.py:tiny")
    base = schema.defaults()
    for block, values in PRESETS["tiny"].items():
        if block in base:
            base[block].update(values)
    assert {k: v for k, v in tiny.to_dict().items() if k not in ("preset", "config_file")} == \
        {k: v for k, v in base.to_dict().items() if k != "preset"}


def test_override_types_and_unknown_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # resolution works from any working directory
    cfg = schema.load("configs/standard.py:tiny",
                      ["--config.train.lr=1e-4", "--config.model.scan_layers=false",
                       "--config.train.steps=7"])
    assert cfg.train.lr == 1e-4 and cfg.model.scan_layers is False and cfg.train.steps == 7
    with pytest.raises(KeyError, match="train.lr"):
        schema.load("configs/standard.py:tiny", ["--config.train.lrr=1"])
    with pytest.raises(ValueError, match="train.steps"):
        schema.load("configs/standard.py:tiny", ["--config.train.steps=many"])
    with pytest.raises(FileNotFoundError, match="tried"):
        schema.load("configs/nope.py")


def test_checks_name_the_key_and_the_fix():
    cfg = mlc.ConfigDict(load_config("configs/dtf.py:tiny").to_dict())
    cfg.model.routing.capacty = 0.5
    with pytest.raises(ConfigError, match="capacity"):
        schema.check(cfg)
    cfg = mlc.ConfigDict(load_config("configs/standard.py:tiny").to_dict())
    cfg.chekpoint = mlc.ConfigDict({"every": 1})
    with pytest.raises(ConfigKeyError, match="checkpoint"):
        schema.check(cfg)
    for block, key, value, match in (("train", "steps", 0, "train.steps"),
                                     ("train", "decay", "step", "train.decay"),
                                     ("train", "seq_len", 4096, "max_position_embeddings"),
                                     ("tokenizer", "kind", "sentencepiece", "tokenizer.kind"),
                                     ("eval", "every", 0, "eval.every"),
                                     ("train", "lr_groups", (("(", 2.0),), "bad regex")):
        bad = mlc.ConfigDict(load_config("configs/standard.py:tiny").to_dict())
        bad[block][key] = value
        with pytest.raises(ConfigValueError, match=match.replace("(", r"\(")):
            schema.check(bad)


def test_finalize_derives_vocab_and_keeps_the_cache_inside_the_workdir(tmp_path):
    cfg = schema.load("configs/standard.py:tiny", ["--config.data.cache_dir=../../etc"])
    with pytest.raises(ConfigValueError, match="escapes"):
        schema.finalize(cfg, workdir=str(tmp_path))
    out = schema.finalize(schema.load("configs/standard.py:tiny"), vocab_size=300,
                          workdir=str(tmp_path))
    assert out.model.vocab_size == 300 and out.data.cache_dir == str(tmp_path / "cache")
    assert dataclasses.is_dataclass(schema.check(out)["train"].lora)

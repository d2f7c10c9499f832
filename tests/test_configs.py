"""Every shipped config parses with every preset; overrides are checked before anything runs."""

import importlib.util
from pathlib import Path

import pytest

from jaxdyn.config import loader as configlib

ROOT = Path(__file__).resolve().parents[1]


def presets():
    for path in sorted((ROOT / "configs").glob("*.py")):
        if path.name == "__init__.py":
            continue
        spec = importlib.util.spec_from_file_location(f"cfgmod_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for preset in mod.PRESETS:
            yield f"configs/{path.name}:{preset}"


@pytest.mark.parametrize("spec", list(presets()))
def test_every_config_and_preset_parses(spec):
    cfg = configlib.load_config(spec)
    mcfg = configlib.model_config(cfg)  # ModelConfig validation, routing options included
    assert mcfg.num_layers >= 1 and cfg.train.steps >= 1


def test_override_types_and_unknown_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # resolution works from any working directory
    cfg = configlib.load_config("configs/standard.py:tiny",
                                ["--config.train.lr=1e-4", "--config.model.scan_layers=false",
                                 "--config.train.steps=7"])
    assert cfg.train.lr == 1e-4 and cfg.model.scan_layers is False and cfg.train.steps == 7
    with pytest.raises(KeyError, match="train.lr"):
        configlib.load_config("configs/standard.py:tiny", ["--config.train.lrr=1"])
    with pytest.raises(ValueError, match="train.steps"):
        configlib.load_config("configs/standard.py:tiny", ["--config.train.steps=many"])
    with pytest.raises(FileNotFoundError, match="tried"):
        configlib.load_config("configs/nope.py")


def test_unknown_routing_option_names_closest():
    from jaxdyn.model import ConfigError
    cfg = configlib.load_config("configs/dtf.py:tiny")
    with cfg.unlocked():
        cfg.model.routing.capacty = 0.5
    with pytest.raises(ConfigError, match="capacity"):
        configlib.model_config(cfg)

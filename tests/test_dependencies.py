"""The dependency spec: pyproject.toml keeps ranges (tested version .. next minor), the lock
(launch/constraints.txt) pins the tested combination, and the Python floor is the same
everywhere (the pinned JAX stack's wheels need >= 3.11)."""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Exact on purpose: a range would let pip take a multi-GB CUDA build of torch (see pyproject).
EXACT_OK = {"torch"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "launch" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[_norm(name)] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for extra, items in PYPROJECT["project"]["optional-dependencies"].items():
        if extra in ("test", "convert", "eval"):  # accelerator extras are not installed in CI
            reqs += [Requirement(r) for r in items]
    return reqs


def test_the_lock_satisfies_every_range_and_covers_every_dependency():
    lock = _lock()
    for req in _requirements():
        name = _norm(req.name)
        assert name in lock, f"{req.name} is a dependency but not in launch/constraints.txt " \
                             "(run bash launch/lock.sh)"
        assert req.specifier.contains(lock[name], prereleases=True), \
            f"locked {req.name}=={lock[name]} is outside pyproject's {req.specifier}"


@pytest.mark.parametrize("req", _requirements(), ids=lambda r: r.name)
def test_ranges_start_at_the_tested_version_and_stop_before_the_next_minor(req):
    """Lower bound = the locked (tested) version; an upper bound so a new minor release with
    API changes is not taken untested."""
    name = _norm(req.name)
    specs = {s.operator: Version(s.version) for s in req.specifier}
    if name in EXACT_OK and "==" in specs:
        assert specs["=="] == _lock()[name]
        return
    assert ">=" in specs and specs[">="] == _lock()[name], \
        f"{req.name}: lower bound {specs.get('>=')} is not the tested {_lock()[name]}"
    assert "<" in specs, f"{req.name} has no upper bound"
    lo, hi = specs[">="], specs["<"]
    assert hi.release[:2] == (lo.major, lo.minor + 1), \
        f"{req.name}: upper bound {hi} is not the next minor after {lo}"


def test_accelerator_extras_exist():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for name, jax_extra in (("cuda12", "cuda12"), ("cuda13", "cuda13"), ("tpu", "tpu")):
        assert any(Requirement(r).name == "jax" and jax_extra in Requirement(r).extras
                   for r in extras[name]), name


def test_the_python_floor_is_the_real_one_everywhere():
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    for script in ("quickstart.sh", "test.sh", "lock.sh"):
        text = (ROOT / "launch" / script).read_text()
        assert "3, 11" in text, f"launch/{script} does not check for Python >= 3.11"
        assert "python3.10" not in text and "3, 10" not in text, script
    assert "3.11" in (ROOT / "README.md").read_text()


def test_the_launch_scripts_install_with_the_lock():
    for script in ("quickstart.sh", "test.sh"):
        text = (ROOT / "launch" / script).read_text()
        installs = [ln for ln in text.splitlines() if "pip install" in ln and "-e" in ln
                    and not ln.lstrip().startswith(("#", "echo"))]
        assert installs and all("-c launch/constraints.txt" in ln for ln in installs), script

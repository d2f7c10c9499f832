#!/usr/bin/env bash
# Create .venv (Python >= 3.10), install jaxdyn with its test extras, run the whole suite.
# Extra arguments go to pytest, e.g. `bash launch/test.sh tests/test_parity.py -k llama`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3.10 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import jax, flax, torch, transformers" # fail early if the install did not take
export PYTHONUNBUFFERED=1
# Two workers (pytest-xdist) by default: the suite is compile-bound and compilation is mostly
# single-threaded. JAXDYN_TEST_WORKERS=0 runs in one process.
WORKERS="${JAXDYN_TEST_WORKERS:-2}"
PAR=()
if [ "$WORKERS" != "0" ]; then PAR=(-n "$WORKERS"); fi
exec .venv/bin/python -m pytest -q --durations=25 "${PAR[@]}" "$@"

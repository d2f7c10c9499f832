#!/usr/bin/env bash
# Create .venv (Python >= 3.11: the pinned jax/flax/orbax/transformers wheels need it), install
# jaxdyn with its test extras at the locked versions (launch/constraints.txt), run the whole suite.
# Extra arguments go to pytest, e.g. `bash launch/test.sh tests/model/test_decoder.py -k llama`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "jaxdyn needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c launch/constraints.txt -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import jax, flax, torch, transformers" # fail early if the install did not take
export PYTHONUNBUFFERED=1
# Two workers (pytest-xdist) by default: the suite is compile-bound and compilation is mostly
# single-threaded. JAXDYN_TEST_WORKERS=0 runs in one process.
WORKERS="${JAXDYN_TEST_WORKERS:-2}"
PAR=()
if [ "$WORKERS" != "0" ]; then PAR=(-n "$WORKERS"); fi
exec .venv/bin/python -m pytest -q --durations=25 "${PAR[@]}" "$@"

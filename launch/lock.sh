#!/usr/bin/env bash
# Regenerate launch/constraints.txt, the lock: the exact versions a fresh Python >= 3.11
# virtualenv resolves for jaxdyn with its test extras, which launch/quickstart.sh, launch/test.sh
# and CI then install with (`pip install -c launch/constraints.txt ...`). pyproject.toml keeps
# ranges (tested version .. next minor); this file is the one tested combination.
#
#   bash launch/lock.sh            # PYTHON=python3.12 to lock for another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "lock.sh needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=" >&2; exit 1; }
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m venv "$TMP/venv"
"$TMP/venv/bin/python" -m pip install -q --disable-pip-version-check ".[test]" 2>&1 \
  | grep -v "^WARNING: Location" || true
{
  echo "# The lock: exact versions of a fresh install of jaxdyn[test] on $("$PY" --version 2>&1),"
  echo "# written by launch/lock.sh on $(date -u +%F). Install with"
  echo "#   pip install -c launch/constraints.txt -e \".[test]\""
  # Local version labels (torch 2.13.0+cpu) are dropped: == 2.13.0 matches every build of it.
  "$TMP/venv/bin/python" -m pip freeze --disable-pip-version-check \
    | grep -v -i -E '^(jaxdyn|-e )|^jaxdyn @' | sed -E 's/^([^=]+==[^+]+)\+.*/\1/'
} > launch/constraints.txt
echo "wrote launch/constraints.txt ($(grep -vc '^#' launch/constraints.txt) packages)"

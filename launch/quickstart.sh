#!/usr/bin/env bash
# Fresh machine to a trained Dynamic Transformer in a few minutes on a laptop CPU: create .venv
# (Python >= 3.11), install jaxdyn, train a tiny DTF (D64, L4) on the built-in corpus (this
# Python's standard library), print a sample, show which characters each routed layer processed,
# and write the training dashboard PNG.
#
#   bash launch/quickstart.sh                       # PYTHON=python3.12 to pick the interpreter
#   WORKDIR=runs/qs2 bash launch/quickstart.sh --config.train.seed=1   # extra --config.* overrides
#
# Rerunning resumes the same run (a finished one just prints its sample and pictures again).
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${WORKDIR:-runs/quickstart}"

supported() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

if [ ! -x .venv/bin/python ]; then
  PY=""
  tried="${PYTHON:-python3.11 python3.12 python3.13 python3}"
  for c in $tried; do
    if command -v "$c" >/dev/null && supported "$c"; then PY="$c"; break; fi
  done
  if [ -z "$PY" ]; then
    echo "error: jaxdyn needs Python >= 3.11; none of ($tried) is one. Install Python 3.11 or" \
         "3.12 (e.g. 'apt install python3.11-venv', 'brew install python@3.12'," \
         "'pyenv install 3.12') and rerun, or point PYTHON=/path/to/python3.x at one." >&2
    exit 1
  fi
  echo "== creating .venv with $PY ($("$PY" --version 2>&1))"
  "$PY" -m venv .venv
elif ! supported .venv/bin/python; then
  echo "error: .venv has $(.venv/bin/python --version 2>&1); jaxdyn needs Python >= 3.11." \
       "Remove .venv and rerun." >&2
  exit 1
fi
echo "== installing jaxdyn into .venv (pip install -c launch/constraints.txt -e .)"
.venv/bin/python -m pip install -q --disable-pip-version-check -c launch/constraints.txt -e .

# The tiny preset's model (D64, L4), trained for ~2.5M bytes: batches of 32x64 (less gradient
# noise than the preset's 8x64 at the same tokens/s on a CPU), lr 2e-3 (3e-3 is less stable
# for DTF at this batch), one validation every 400 steps, one checkpoint at the end. The
# closing sample is the greedy continuation of "def ".
echo "== training a tiny Dynamic Transformer (configs/dtf.py:tiny) into $WORKDIR"
start=$(date +%s)
.venv/bin/python -m jaxdyn.train --config configs/dtf.py:tiny --workdir "$WORKDIR" \
  --config.train.steps=1200 --config.train.batch_size=32 --config.train.lr=2e-3 \
  --config.train.warmup_steps=60 --config.eval.every=400 --config.checkpoint.every=1200 \
  --config.log.every=25 --config.sample.prompt="def " --config.sample.max_new_tokens=32 \
  --config.sample.temperature=0 "$@"
echo "== trained in $(($(date +%s) - start)) s"

echo "== which characters each routed layer processed, and the dashboard"
.venv/bin/python -m jaxdyn.viz --workdir "$WORKDIR"

cat <<MSG

Done: $WORKDIR holds the checkpoints, metrics.jsonl, dashboard.png and routing.png.
Next, try:
  .venv/bin/python -m jaxdyn.generate --checkpoint $WORKDIR --prompt "    def get(self, " \\
      --temperature 0.5 --max_new_tokens 32
  .venv/bin/python -m jaxdyn.evaluate --checkpoint $WORKDIR --seq_len 64    # bits per byte
  .venv/bin/python -m jaxdyn.train --config configs/mod.py:tiny --workdir runs/mod  # or mtp.py
MSG

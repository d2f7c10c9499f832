#!/usr/bin/env bash
# Fresh machine to a trained model in a few minutes: create .venv, install jaxdyn, train a tiny
# Dynamic Transformer on the built-in corpus (the Python standard library), plot, generate.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3.10 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e . 2>&1 | grep -v "^WARNING: Location" || true
CONFIG="${CONFIG:-configs/dtf.py:tiny}"
WORKDIR="${WORKDIR:-runs/quickstart}"
echo "== training $CONFIG into $WORKDIR"
.venv/bin/python -m jaxdyn.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
echo "== plots"
.venv/bin/python -m jaxdyn.viz.dashboard --workdir "$WORKDIR"
echo "== generation from the checkpoint"
.venv/bin/python -m jaxdyn.generate --checkpoint "$WORKDIR" --prompt "def " --max_new_tokens 64
cat <<MSG

Done.
  checkpoints: $WORKDIR/checkpoints   (rerun the same command to resume)
  metrics:     $WORKDIR/metrics.jsonl  (+ TensorBoard: $WORKDIR/tensorboard)
  plots:       $WORKDIR/plots/*.png
  generate:    .venv/bin/python -m jaxdyn.generate --checkpoint $WORKDIR --prompt "import "
MSG

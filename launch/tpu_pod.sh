#!/usr/bin/env bash
# Run on every worker of a Cloud TPU VM pod slice; jax.distributed auto-detects TPU pods.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a bash launch/tpu_pod.sh --config configs/dtf.py:qwen2.5-0.5b --workdir gs://bucket/runs/dtf
#
# Variables: TPU_NAME, ZONE (required); PROJECT (optional); REPO_DIR on the workers (default ~/jaxdyn,
# which must hold this repository with `.venv` installed via `pip install -e ".[tpu]"`).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-'~/jaxdyn'}
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
  --command "cd $REPO_DIR && JAXDYN_DISTRIBUTED=auto .venv/bin/python -m ${JAXDYN_MODULE:-jaxdyn.train}$args"

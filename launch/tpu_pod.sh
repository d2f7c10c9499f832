#!/usr/bin/env bash
# Run on every worker of a Cloud TPU VM pod slice; jax.distributed auto-detects TPU pods.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a bash launch/tpu_pod.sh --config configs/dtf.py:qwen2.5-0.5b --workdir gs://bucket/runs/dtf
#
# Variables: TPU_NAME, ZONE (required); PROJECT (optional); REPO_DIR on the workers (default ~/jaxdyn,
# which must hold this repository with `.venv` installed via `pip install -e ".[tpu]"`).
# The workers run in REPO_DIR (this machine's folders do not exist there): relative paths are
# relative to REPO_DIR on each worker; give the workdir as gs://… or an absolute path.
# SIGTERM / SIGINT to this script sends SIGTERM to the process on every worker (trainers save
# and exit 0); the script waits for them and exits with gcloud's status.
set -uo pipefail
if [ -z "${TPU_NAME:-}" ] || [ -z "${ZONE:-}" ]; then
  echo "tpu_pod.sh: set TPU_NAME and ZONE (the TPU VM pod slice and its zone)" >&2
  exit 2
fi
REPO_DIR=${REPO_DIR:-'~/jaxdyn'}
args=""
if [ $# -gt 0 ]; then args=$(printf ' %q' "$@"); fi
pidfile="/tmp/jaxdyn-launch-$(date +%s)-$$-$RANDOM.pid"
gc=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all)

forward() {
  caught=1
  echo "tpu_pod.sh: SIG$1: sending SIGTERM to the process on every worker" >&2
  "${gc[@]}" --command "kill -TERM \$(cat $pidfile 2>/dev/null) 2>/dev/null; true" </dev/null &
  return 0
}
caught=0
trap 'forward TERM' TERM
trap 'forward INT' INT

(trap '' INT TERM; exec "${gc[@]}" --command "cd $REPO_DIR || exit 2
JAXDYN_DISTRIBUTED=auto .venv/bin/python -m ${JAXDYN_MODULE:-jaxdyn.train}$args </dev/null &
pid=\$!
echo \$pid >$pidfile
wait \$pid; s=\$?
rm -f $pidfile
exit \$s") &
main=$!

# shellcheck source=launch/_wait.sh
source "$(dirname "${BASH_SOURCE[0]}")/_wait.sh"  # status_of
status_of "$main"
wait  # the stop requests, if any
exit "$st"

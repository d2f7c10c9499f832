#!/usr/bin/env bash
# Plain SSH launch over GPU nodes without a scheduler: one process per host, host 0 coordinates.
#
#   HOSTS="node1 node2" bash launch/gpu_nodes.sh --config configs/dtf.py:qwen2.5-0.5b --workdir /shared/runs/dtf
#
# Variables: HOSTS (required, space-separated; the first is the coordinator), PORT (default 12355),
# REPO_DIR on every host (default: this directory's path), PYTHON (default .venv/bin/python).
set -euo pipefail
: "${HOSTS:?set HOSTS to the space-separated host names}"
read -r -a hosts <<<"$HOSTS"
PORT=${PORT:-12355}
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
args=$(printf ' %q' "$@")
pids=()
for i in "${!hosts[@]}"; do
  ssh "${hosts[$i]}" "cd $REPO_DIR && source launch/gpu_env.sh && \
    JAXDYN_COORDINATOR=${hosts[0]}:$PORT JAXDYN_NUM_PROCESSES=${#hosts[@]} JAXDYN_PROCESS_ID=$i \
    ${PYTHON:-.venv/bin/python} -m ${JAXDYN_MODULE:-jaxdyn.train}$args" 2>&1 | sed -u "s/^/[${hosts[$i]}] /" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit "$rc"

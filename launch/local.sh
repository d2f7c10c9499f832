#!/usr/bin/env bash
# Run N processes of a jaxdyn entry point on this host, as a multi-host job would
# (CPU collectives via gloo; also the way to drive several GPUs of one node one process each).
#
#   bash launch/local.sh N --config configs/standard.py:tiny --workdir runs/local
#
# Variables: JAXDYN_CPU_DEVICES   fake CPU devices per process (default 2; ignored on GPU)
#            LOCAL_GPUS=1         pin process i to GPU i
#            JAXDYN_MODULE        entry module (default jaxdyn.train)
#            PORT                 coordinator port (default: a free one)   PYTHON (default .venv/bin/python)
set -euo pipefail
N=${1:?usage: bash launch/local.sh N [args for the entry point]}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PORT=${PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < N; i++)); do
  (
    export JAXDYN_COORDINATOR="127.0.0.1:$PORT" JAXDYN_NUM_PROCESSES="$N" JAXDYN_PROCESS_ID="$i"
    export JAXDYN_CPU_DEVICES="${JAXDYN_CPU_DEVICES:-2}"
    if [ "${LOCAL_GPUS:-0}" = 1 ]; then export JAXDYN_LOCAL_DEVICE_IDS="$i"; fi
    exec "$PY" -m "${JAXDYN_MODULE:-jaxdyn.train}" "$@" 2>&1 | sed -u "s/^/[p$i] /"
  ) &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit "$rc"

#!/usr/bin/env bash
# Run N processes of a jaxdyn entry point on this host, as a multi-host job would
# (CPU collectives via gloo; also the way to drive several GPUs of one node one process each).
#
#   bash launch/local.sh N --config configs/standard.py:tiny --workdir runs/local
#
# Runs in the caller's folder: relative paths (--workdir, data files) mean what they mean there;
# `--config configs/x.py` is found in the caller's folder, else in this repository.
# SIGTERM / SIGINT (Ctrl-C) to this script reach every process as SIGTERM: trainers save a
# checkpoint at the end of their step and exit 0; the script waits for all of them and exits
# with the first non-zero status among them (0 when all saved).
#
# Variables: JAXDYN_CPU_DEVICES   fake CPU devices per process (default 2; ignored on GPU)
#            LOCAL_GPUS=1         pin process i to GPU i
#            JAXDYN_MODULE        entry module (default jaxdyn.train)
#            PORT                 coordinator port (default: a free one)
#            PYTHON               interpreter (default: this repository's .venv/bin/python)
set -uo pipefail
usage="usage: bash launch/local.sh N [args for the entry point]   (N: number of processes, 1 to 9999)"
if [ $# -lt 1 ] || ! [[ $1 =~ ^[0-9]{1,4}$ ]] || ((10#$1 == 0)); then
  echo "${usage}; got N=${1-<none>}" >&2
  exit 2
fi
N=$((10#$1))
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "local.sh: no Python interpreter at '$PY'; create $ROOT/.venv or set PYTHON" >&2
  exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # `-m jaxdyn...` from any folder
PORT=${PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
fifos=$(mktemp -d "${TMPDIR:-/tmp}/jaxdyn-local.XXXXXX") || exit 2
pids=()  # the Python processes themselves (signals go to them, not to a pipeline)
seds=()  # their "[pI] " line prefixers, fed through one FIFO each

forward() {  # $1: the signal this script got
  caught=1 stopping=1
  echo "local.sh: SIG$1: sending SIGTERM to ${#pids[@]} process(es); waiting for them to save" >&2
  [ ${#pids[@]} -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null
  return 0
}
caught=0 stopping=0
trap 'forward TERM' TERM
trap 'forward INT' INT  # a terminal's Ctrl-C also reaches the processes as SIGINT directly
trap 'rm -rf "$fifos"' EXIT

for ((i = 0; i < N && !stopping; i++)); do
  mkfifo "$fifos/p$i"
  # The prefixer ignores INT/TERM: it ends at EOF, after its process wrote everything.
  (trap '' INT TERM; exec sed -u "s/^/[p$i] /" <"$fifos/p$i") &
  seds+=($!)
  devices=()
  if [ "${LOCAL_GPUS:-0}" = 1 ]; then devices=(JAXDYN_LOCAL_DEVICE_IDS="$i"); fi
  env JAXDYN_COORDINATOR="127.0.0.1:$PORT" JAXDYN_NUM_PROCESSES="$N" JAXDYN_PROCESS_ID="$i" \
    JAXDYN_CPU_DEVICES="${JAXDYN_CPU_DEVICES:-2}" "${devices[@]}" \
    "$PY" -m "${JAXDYN_MODULE:-jaxdyn.train}" "$@" >"$fifos/p$i" 2>&1 &
  pids+=($!)
done
if ((stopping)); then  # a signal came while starting them
  if [ ${#pids[@]} -eq 0 ]; then exit 143; fi
  kill -TERM "${pids[@]}" 2>/dev/null
fi

# shellcheck source=launch/_wait.sh
source "$(dirname "${BASH_SOURCE[0]}")/_wait.sh"  # status_of

rc=0
for p in "${pids[@]}"; do
  status_of "$p"
  if ((rc == 0 && st != 0)); then rc=$st; fi
done
for p in "${seds[@]}"; do status_of "$p"; done
exit "$rc"

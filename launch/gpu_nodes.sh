#!/usr/bin/env bash
# Plain SSH launch over GPU nodes without a scheduler: one process per host, host 0 coordinates.
#
#   HOSTS="node1 node2" bash launch/gpu_nodes.sh --config configs/dtf.py:qwen2.5-0.5b --workdir /shared/runs/dtf
#
# Variables: HOSTS (required, space-separated; the first is the coordinator), PORT (default 12355),
# REPO_DIR on every host (default: this repository's path), PYTHON (default $REPO_DIR/.venv/bin/python).
# Every process starts in the caller's folder (which must exist on every host: a shared
# filesystem), so relative paths mean what they mean here; `--config configs/x.py` is also
# found in REPO_DIR. SIGTERM / SIGINT to this script, or this script dying, makes every remote
# process get SIGTERM (trainers save and exit 0); the script waits for them and exits with the
# first non-zero status.
set -uo pipefail
if [ -z "${HOSTS:-}" ]; then
  echo "gpu_nodes.sh: set HOSTS to the space-separated host names (the first coordinates)" >&2
  exit 2
fi
read -r -a hosts <<<"$HOSTS"
PORT=${PORT:-12355}
if ! [[ $PORT =~ ^[0-9]+$ ]]; then
  echo "gpu_nodes.sh: PORT=$PORT must be a port number" >&2
  exit 2
fi
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PY=${PYTHON:-$REPO_DIR/.venv/bin/python}
args=""
if [ $# -gt 0 ]; then args=$(printf ' %q' "$@"); fi
q() { printf '%q' "$1"; }
trap '' PIPE  # writing a stop request to a session that already ended must not kill us
fifos=$(mktemp -d "${TMPDIR:-/tmp}/jaxdyn-ssh.XXXXXX") || exit 2
pids=() stops=()

forward() {  # a line on each session's stdin makes its remote watcher send SIGTERM
  caught=1
  echo "gpu_nodes.sh: SIG$1: stopping ${#stops[@]} process(es); waiting for them to save" >&2
  for fd in "${stops[@]}"; do echo stop >&"$fd"; done 2>/dev/null
  return 0
}
caught=0
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'rm -rf "$fifos"' EXIT

for i in "${!hosts[@]}"; do
  # Remote: the process in the background, a watcher that sends it SIGTERM when a line (or
  # EOF: this script is gone) arrives on the session's stdin, then the process's status.
  remote="cd $(q "$PWD") || { echo \"gpu_nodes.sh: folder $(q "$PWD") does not exist on \$(hostname); run from a folder every host sees or give absolute paths\" >&2; exit 2; }
. $(q "$REPO_DIR/launch/gpu_env.sh")
PYTHONPATH=$(q "$REPO_DIR")\${PYTHONPATH:+:\$PYTHONPATH} JAXDYN_COORDINATOR=${hosts[0]}:$PORT \
JAXDYN_NUM_PROCESSES=${#hosts[@]} JAXDYN_PROCESS_ID=$i \
$(q "$PY") -m ${JAXDYN_MODULE:-jaxdyn.train}$args </dev/null &
pid=\$!
exec 3<&0
{ read -r _ || :; kill -TERM \$pid; } <&3 >/dev/null 2>&1 &
watcher=\$!
wait \$pid; s=\$?
kill \$watcher 2>/dev/null
exit \$s"
  mkfifo "$fifos/in$i"
  (trap '' INT TERM; exec ssh "${hosts[$i]}" "$remote" <"$fifos/in$i" 2>&1 |
    sed -u "s/^/[${hosts[$i]}] /") &
  pids+=($!)
  exec {fd}>"$fifos/in$i"
  stops+=("$fd")
done

# shellcheck source=launch/_wait.sh
source "$(dirname "${BASH_SOURCE[0]}")/_wait.sh"  # status_of

rc=0
for p in "${pids[@]}"; do
  status_of "$p"
  if ((rc == 0 && st != 0)); then rc=$st; fi
done
exit "$rc"

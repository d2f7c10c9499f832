# Sourced by the launch scripts: wait for children through the signals they trap and forward.
# status_of PID sets st to PID's exit status. A trap handler that runs while `wait` blocks cuts
# the wait short (status > 128) and sets caught=1; then we wait again for the real status.
status_of() {
  local s prev=-1
  while :; do
    caught=0
    wait "$1" 2>/dev/null
    s=$?
    if ((s == 127 && prev >= 0)); then st=$prev; return; fi  # it was already collected
    if ((caught && s > 128)); then prev=$s; continue; fi     # `wait` cut short by a trap
    st=$s
    return
  done
}

#!/usr/bin/env bash
# One accelerator check, for the day a GPU or TPU is at hand (≤ 8 minutes on one GPU):
#   1. device info (jax devices, backend, nvidia-smi / TPU type);
#   2. fused-vs-reference attention parity ON the device: every attention implementation the
#      backend has (cuDNN / Pallas mha on GPU, splash on TPU, blockwise everywhere) against the
#      XLA dense-mask reference, forward and gradients, fp32 and bf16, plus the cross-document
#      leakage check (`bench --suite kernels`);
#   3. `bench --suite train --suite routing --suite attention` at the qwen2.5-0.5b shapes.
# Everything lands in OUT (default runs/accelerator_check/<date>) as JSON + Markdown + a log.
#
#   bash launch/accelerator_check.sh                 # uses .venv, or creates it (needs PyPI)
#   OUT=/tmp/acc PRESET=tiny bash launch/accelerator_check.sh   # a quick CPU dry run
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/accelerator_check/$(date -u +%Y%m%d-%H%M%S)}"
PRESET="${PRESET:-qwen2.5-0.5b}"
BUDGET="${BUDGET_S:-480}"   # the whole check; each bench step gets what is left
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

if [ ! -x .venv/bin/python ]; then
  PY="${PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3)}"
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "jaxdyn needs Python >= 3.11 (found $("$PY" --version 2>&1))" >&2; exit 1; }
  EXTRA=""
  if command -v nvidia-smi >/dev/null 2>&1; then EXTRA="[cuda12]"; fi
  if [ -e /dev/accel0 ] || [ -e /dev/vfio/0 ]; then EXTRA="[tpu]"; fi
  "$PY" -m venv .venv
  # The lock pins jax/jaxlib; the accelerator plugin comes from JAX's own extra.
  .venv/bin/python -m pip install -q -c launch/constraints.txt -e ".${EXTRA}"
fi
PYBIN=.venv/bin/python

echo "== 1. device ($(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
uptime || true
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PYBIN" - <<'PY' | tee "$OUT/device.json"
import json, jax
d = jax.devices()
print(json.dumps({"backend": jax.default_backend(), "count": len(d),
                  "kind": d[0].device_kind, "platform": d[0].platform,
                  "jax": jax.__version__}, indent=1))
PY

echo "== 2. attention parity on the device"
timeout "$(left)" "$PYBIN" -m jaxdyn.bench --suite kernels --preset "$PRESET" \
  --out "$OUT/kernels.json"

echo "== 3. train, routing and attention benches at the $PRESET shapes"
timeout "$(left)" "$PYBIN" -m jaxdyn.bench --suite train --suite routing --suite attention \
  --preset "$PRESET" --repeats 3 --out "$OUT/bench.json" || {
    echo "bench stopped (status $?); whatever finished is in $OUT" >&2; }
uptime || true
echo "== done in $(( $(date +%s) - START )) s: $OUT/{device.json,kernels.json,kernels.md,bench.json,bench.md,log.txt}"

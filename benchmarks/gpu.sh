#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one run, as ratios (under 8 minutes on one GPU):
# backbone eager / bf16 / compiled, analysis latency per view, SAE training tokens/s against the
# same run's bf16 matmul peak, extract images/s.
#
#   benchmarks/gpu.sh                 on a CUDA machine with only this repository
#   benchmarks/gpu.sh --dry-run       on a CPU: every code path at tiny sizes (checks it would work)
#   benchmarks/gpu.sh --out gpu.json  also write the figures as JSON
#
# It installs what it needs: with PYTHON unset it uses .venv/bin/python when that can import the
# package, else makes .venv-gpu (reusing a CUDA torch the system Python already has) and installs
# the package into it with pip. Extra arguments go to benchmarks/gpu_bench.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY=1; done

have_package() { "$1" -c "import napari_mammo_sae.models.runtime, timm, torch, h5py" >/dev/null 2>&1; }

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && have_package .venv/bin/python; then
    PY=.venv/bin/python
  else
    SYS=$(command -v python3 || command -v python || true)
    [ -n "$SYS" ] || { echo "gpu.sh: no python3 on this machine: install Python 3.10+" >&2; exit 2; }
    if [ ! -x .venv-gpu/bin/python ]; then
      echo "gpu.sh: creating .venv-gpu (system site-packages visible: a preinstalled CUDA torch is reused)"
      "$SYS" -m venv --system-site-packages .venv-gpu
    fi
    PY=.venv-gpu/bin/python
  fi
fi

if ! have_package "$PY"; then
  echo "gpu.sh: installing the package into $("$PY" -c 'import sys; print(sys.prefix)')"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -e .
fi

if [ "$DRY" = 0 ]; then
  "$PY" - <<'EOF' || { echo "gpu.sh: no CUDA GPU visible to torch; use --dry-run on a CPU" >&2; exit 2; }
import sys, torch
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc 2>/dev/null || echo 4)}"
exec "$PY" benchmarks/gpu_bench.py "$@"

#!/usr/bin/env bash
# On a machine with a CUDA GPU and this repository installed (`make install`): the fp16 and bf16 paths of
# GAMTrainer and its step cost, in under 5 minutes. Exits non-zero if a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 240 "$PY" benchmarks/gpu_check.py --rounds 3
timeout 120 "$PY" -m pytest -q tests/test_mixed_precision.py

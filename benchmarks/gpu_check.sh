#!/usr/bin/env bash
# On a machine with a CUDA GPU and this repository installed (`make install`): the fp16 and bf16 paths of
# GAMTrainer and its step cost (a ViT-S/16-sized model), in about 6 minutes. Exits non-zero if a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
status=0
timeout 90 "$PY" benchmarks/gpu_check.py || status=1
# Step time (interleaved, ratios to the stock Trainer) and peak memory (max_memory_allocated) on the GPU.
timeout 300 "$PY" benchmarks/step_cost.py --setting gpu --no-collectives || status=1
timeout 60 "$PY" -m pytest -q tests/test_mixed_precision.py || status=1
exit $status

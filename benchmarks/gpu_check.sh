#!/usr/bin/env bash
# GPU check (only where a GPU is lent; nothing in the project depends on it).
# Runs the training-step benchmark -- ours vs PEFT vs ours with gradient checkpointing -- on a
# Llama-3-8B-shaped model with random bf16 weights (no download) and reports tokens/s and peak memory.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]      (PYTHON=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
"$PY" benchmarks/bench_train_step.py --model llama3-8b-random --device cuda --out "$out/gpu_train_step.json"

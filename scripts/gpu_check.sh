#!/usr/bin/env bash
# One-shot GPU check: the 270m-270m and 1b-1b bf16 train step with the
# default (auto) attention backend, which picks cuDNN on a GPU where cuDNN takes the inputs, its MFU
# against the GPU's bf16 peak, greedy generation tokens/s, and the same work in transformers
# (PyTorch, sdpa attention, bf16) on the same GPU. One JSON line per preset goes to the results file.
#
#   bash scripts/gpu_check.sh [RESULTS.jsonl]      # default: gpu_check.jsonl
#
# Needs a Python with jax[cuda] and a CUDA build of torch (PY=..., default .venv/bin/python).
# Exits 2 with one line when no GPU is visible to JAX.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RESULTS=${1:-gpu_check.jsonl}

if ! "$PY" -c 'import jax, sys; sys.exit(0 if jax.devices()[0].platform == "gpu" else 1)' 2>/dev/null; then
    echo "error: gpu_check.sh: JAX sees no GPU (install jax[cuda] and run on a GPU machine)" >&2
    exit 2
fi
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "error: gpu_check.sh: torch has no CUDA device (install a CUDA build of torch)" >&2; exit 2; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for preset in 270m-270m 1b-1b; do
    # 2048 + 512 tokens per row, 8 rows: a fine-tuning shape; 128 new tokens per generation.
    timeout 170 "$PY" scripts/benchmark.py --preset "$preset" --dtype bfloat16 --encoder-length 2048 \
        --decoder-length 512 --batch 8 --steps 5 --new-tokens 128 --vs-hf --hf-device cuda --json "$RESULTS"
done
echo "results: $RESULTS"

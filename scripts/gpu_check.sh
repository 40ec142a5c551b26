#!/usr/bin/env bash
# GPU check: the fine-tune stage under KERAS_BACKEND=jax on a host with no TensorFlow (one NVIDIA
# H200, Python 3.12, JAX and PyTorch with CUDA, no network, 64 MiB carried), and its steady-state
# images/second against a plain model.fit at 224 px (MobileNetV3, ResNet50, bf16). See
# scripts/gpu_check.py for what each step does.
#
#   scripts/gpu_check.sh prepare     here, once: .whl/ (wheels) and .cache/gpu_check/ (data), about 45 MiB
#   scripts/gpu_check.sh             on the GPU host, with .whl and .cache/gpu_check carried
#   scripts/gpu_check.sh run --backbones mobilenet_v3_small --image-size 32 --batch-size 8 --steps 3 \
#       --epochs 2 --default-epochs 2     tiny, on a CPU (PYTHON=... picks the interpreter)
#
# Fails when it runs on an accelerator and nothing computed in bf16/fp16.
set -euo pipefail
cd "$(dirname "$0")/.."
command="${1:-run}"
[[ $# -gt 0 ]] && shift
if [[ "$command" == prepare ]]; then
  exec "${PYTHON:-.venv/bin/python}" scripts/gpu_check.py prepare "$@"
fi
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=2
exec "${PYTHON:-python3}" scripts/gpu_check.py "$command" "$@"

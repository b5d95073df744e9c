#!/usr/bin/env bash
# GPU check (≤ 9 minutes): the numba_cuda kernels on a real GPU against the JAX outputs, timed against JAX.
# Needs an NVIDIA GPU and driver; JAX runs on the GPU when jax[cuda12] is installed, else on CPU (said in the
# output). Not run in CI (no GPU there); the simulator and compile_ptx checks run in .ci/run instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset NUMBA_ENABLE_CUDASIM
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 540 python3 benchmarks/gpu_check.py

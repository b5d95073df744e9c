#!/usr/bin/env bash
# GPU check (≤ 9 minutes): the numba_cuda kernels on a real GPU against the JAX outputs, timed against JAX.
# Needs an NVIDIA GPU and driver; JAX runs on the GPU when jax[cuda12] is installed, else on CPU (said in the
# output). Not run in CI (no GPU there); the simulator and compile_ptx checks run in .ci/run instead.
# Environment: numba-cuda needs numpy < 2.5 (numpy 2.5 removed np.row_stack, which numba-cuda's array module
# still registers: its import fails with "module 'numpy' has no attribute 'row_stack'"); the project pins
# numpy~=2.4.0. On a machine whose image holds numpy 2.5 (seen on 2026-11-29), install numpy 2.4 first (carry the
# wheel where there is no registry).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset NUMBA_ENABLE_CUDASIM
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 540 python3 benchmarks/gpu_check.py

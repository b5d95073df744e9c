"""Compile every Numba-CUDA kernel to PTX for sm_80 and sm_90 without a GPU (own process, no simulator).

Run by tests/test_numba_cuda.py; every shipped layer, v1 and v2 (LAYERS; the kernel layers: their three
attention kernels, test_kernel_layers_compile), including the frame kernels (feature
map and scale, exp of a log-space gate, and their adjoints). Uses ``cuda.compile_ptx`` from numba-cuda[cu12] (NVVM ships with the wheel).
The benchmark shape K = V = 32 is compiled, each kernel's static shared memory must fit in 48 KiB, and a
float32 build must contain no float64 instruction (the dtype policy: float32 data is computed in float32).
"""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

import pytest
from numba import cuda
from numba.cuda import dispatcher

from numba_cases import KERNEL_LAYERS, LAYERS, module

assert os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "0", "PTX checks must run without the simulator"

#: The oldest supported target in float32 (the dtype policy: no float64 instruction) and the newest in float64.
#: PTX differs between targets only in the ``.target`` line and the instructions the target allows, so the
#: float32 build for sm_90 adds nothing the two cases do not check.
CASES = [((8, 0), "float32"), ((9, 0), "float64")]


def shared_bytes(ptx: str) -> int:
    """Total static ``.shared`` bytes declared in a PTX module."""
    return sum(int(n) for n in re.findall(r"\.shared\s+\.align\s+\d+\s+\.b8\s+\S+\[(\d+)\]", ptx))


@pytest.mark.parametrize("cc,dtype", CASES, ids=[f"sm{a}{b}-{d}" for (a, b), d in CASES])
@pytest.mark.parametrize("name", LAYERS)
def test_every_kernel_compiles(name, cc, dtype, monkeypatch):
    # numba-cuda compiles a kernel's *device* functions for ``get_current_device()``'s compute capability,
    # which needs a driver; without a GPU we name the target capability ourselves.
    monkeypatch.setattr(dispatcher, "get_current_device", lambda: SimpleNamespace(compute_capability=cc))
    targets = module(name, "numba_cuda").ptx_targets(32, 32, dtype)
    assert [t[0] for t in targets] == ["init_kernel", "init_adjoint_kernel", "forward_kernel", "backward_kernel",
                                       "features_kernel", "features_adjoint_kernel", "exp_kernel",
                                       "gate_adjoint_kernel"]
    for kname, fn, sig in targets:
        ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
        assert f".target sm_{cc[0]}{cc[1]}" in ptx, kname
        assert ".entry" in ptx, kname
        assert shared_bytes(ptx) <= 48 * 1024, (kname, shared_bytes(ptx))
        assert "shfl" not in ptx, f"{kname}: warp intrinsics"
        if dtype == "float32":  # the dtype policy: float32 data is computed in float32, no double arithmetic
            f64 = sorted(set(re.findall(r"\b[a-z.]*\.f64\b", ptx)))
            assert not f64, f"{kname}: float64 instructions in the float32 build: {f64[:8]}"


@pytest.mark.parametrize("cc,dtype", CASES, ids=[f"sm{a}{b}-{d}" for (a, b), d in CASES])
@pytest.mark.parametrize("name", KERNEL_LAYERS)
def test_kernel_layers_compile(name, cc, dtype, monkeypatch):
    """softmax / forgetting_attn: the forward and the two backward kernels compile at K = V = 32, no shared memory
    and no warp intrinsic, and no float64 instruction in a float32 build."""
    monkeypatch.setattr(dispatcher, "get_current_device", lambda: SimpleNamespace(compute_capability=cc))
    targets = module(name, "numba_cuda").ptx_targets(32, 32, dtype)
    assert [t[0] for t in targets] == ["forward_kernel", "backward_query_kernel", "backward_key_kernel"]
    for kname, fn, sig in targets:
        ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
        assert f".target sm_{cc[0]}{cc[1]}" in ptx and ".entry" in ptx, kname
        assert shared_bytes(ptx) == 0 and "shfl" not in ptx, kname
        if dtype == "float32":
            f64 = sorted(set(re.findall(r"\b[a-z.]*\.f64\b", ptx)))
            assert not f64, f"{kname}: float64 instructions in the float32 build: {f64[:8]}"

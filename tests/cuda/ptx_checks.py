"""Compile every Numba-CUDA kernel to PTX for sm_80 and sm_90 without a GPU (own process, no simulator).

Run by tests/test_numba_cuda.py; every shipped layer, v1 and v2 (LAYERS; the kernel layers: their three
attention kernels, test_kernel_layers_compile), including the frame kernels (feature
map and scale, exp of a log-space gate, and their adjoints). Uses ``cuda.compile_ptx`` from numba-cuda[cu12] (NVVM ships with the wheel).
The benchmark shape K = V = 32 is compiled, each kernel's static shared memory must fit in 48 KiB, and a
float32 build must contain no float64 instruction (the dtype policy: float32 data is computed in float32).
A kernel whose code is the same as one already compiled in this process (the frame kernels, printed from one
template for every layer with the same feature map) reuses that PTX: see :func:`_key`.
"""

from __future__ import annotations

import os
import re
from types import ModuleType, SimpleNamespace

import numpy as np

import pytest
from numba import cuda
from numba.cuda import dispatcher

from numba_cases import KERNEL_LAYERS, LAYERS, module

assert os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "0", "PTX checks must run without the simulator"

#: The oldest supported target in float32 (the dtype policy: no float64 instruction) and the newest in float64.
#: PTX differs between targets only in the ``.target`` line and the instructions the target allows, so the
#: float32 build for sm_90 adds nothing the two cases do not check.
CASES = [((8, 0), "float32"), ((9, 0), "float64")]


def _simple(x) -> bool:
    return isinstance(x, (int, float, str, bool, type(None))) or (isinstance(x, type) and issubclass(x, np.generic))


def _key(fn, sig, cc):
    """What determines the PTX of kernel ``fn`` for ``sig`` and ``cc`` apart from its (module-mangled) name: its
    bytecode, constants and names, the values of its closure cells and of the module globals it names; None
    (compile it) when one of those is not a plain number, string, numpy scalar type or module, e.g. a device
    function, whose code the key would not see. ``test_reused_ptx_is_the_same_code`` compiles two such kernels
    of different layers and compares their PTX."""
    code = fn.__code__
    cells = tuple(c.cell_contents for c in fn.__closure__ or ())
    names = tuple(fn.__globals__[n] for n in code.co_names if n in fn.__globals__)
    if not all(_simple(x) for x in cells) or not all(_simple(x) or isinstance(x, ModuleType) for x in names):
        return None
    return (code.co_code, code.co_consts, code.co_names, code.co_varnames, cells,
            tuple(x.__name__ if isinstance(x, ModuleType) else x for x in names), tuple(map(str, sig)), cc)


_PTX: dict = {}


def compile_ptx(fn, sig, cc):
    """``cuda.compile_ptx(fn, sig, cc=cc)``'s PTX, reused for a kernel with the same :func:`_key`."""
    key = _key(fn, sig, cc)
    if key is None or key not in _PTX:
        ptx = cuda.compile_ptx(fn, sig, cc=cc)[0]
        if key is None:
            return ptx
        _PTX[key] = ptx
    return _PTX[key]


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
        ptx = compile_ptx(fn, sig, cc)
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
        ptx = compile_ptx(fn, sig, cc)
        assert f".target sm_{cc[0]}{cc[1]}" in ptx and ".entry" in ptx, kname
        assert shared_bytes(ptx) == 0 and "shfl" not in ptx, kname
        if dtype == "float32":
            f64 = sorted(set(re.findall(r"\b[a-z.]*\.f64\b", ptx)))
            assert not f64, f"{kname}: float64 instructions in the float32 build: {f64[:8]}"


def test_reused_ptx_is_the_same_code(monkeypatch):
    """The reuse of :func:`compile_ptx` is sound: the frame kernels of two layers (one with a log-space gate) have
    the same :func:`_key`, and compiled apart their PTX is the same text but for the module-mangled names; a kernel
    that calls device functions has no key (it is always compiled)."""
    cc = (8, 0)
    monkeypatch.setattr(dispatcher, "get_current_device", lambda: SimpleNamespace(compute_capability=cc))
    a, b = (dict((n, (f, s)) for n, f, s in module(x, "numba_cuda").ptx_targets(32, 32, "float32"))
            for x in ("ridge", "gla"))
    for kname in ("features_kernel", "features_adjoint_kernel", "exp_kernel", "gate_adjoint_kernel"):
        assert _key(*a[kname], cc) is not None and _key(*a[kname], cc) == _key(*b[kname], cc), kname
        pa, pb = (re.sub(r"_ZN\S*?(?=[\s(,])", "NAME", cuda.compile_ptx(*x[kname], cc=cc)[0]) for x in (a, b))
        assert pa == pb, kname
    assert _key(*a["forward_kernel"], cc) is None and _key(*a["backward_kernel"], cc) is None

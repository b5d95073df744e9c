"""Shared test fixtures: float64 JAX, generated-module loading, small prime sizes (docs/contract.md §16)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def _compile_for_tests_fast():
    """Turn the compilers' machine-code optimisation off for the test processes (and the child processes they
    start), unless ``MESAGEN_TEST_OPTIMIZED=1``. At the suite's small shapes compiling dominates running: LLVM
    at -O0 cut the wall time of tests/test_layers_jax.py + test_chunked.py (delta) by a third and of
    test_numba_cpu.py (delta) by 30 % (measured side by side, 2026-11-30). Only the backends' LLVM passes
    change (XLA's HLO passes, fusion and the programs' semantics do not); every tolerance stays as it is.
    Must run before JAX's CPU client and Numba start, hence here, before the imports below."""
    if os.environ.get("MESAGEN_TEST_OPTIMIZED") == "1" or "PYTEST_VERSION" not in os.environ:
        return  # opted out, or imported outside a pytest run (benchmarks/ import this file's helpers)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()
    os.environ.setdefault("NUMBA_OPT", "0")


_compile_for_tests_fast()

import mesagen  # noqa: E402,F401,I001 -- first: sets PJRT_NPROC before any JAX backend starts (mesagen._xla_cpu)
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from numba_cases import reference_kernel  # noqa: E402,F401 -- re-exported: the kernel layers' reference


ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("linear", "gd", "delta", "ridge", "simple_gla", "retention", "gla", "gated_delta", "kda", "implicit_delta",
           "rls_forgetting", "mesanet", "softmax", "forgetting_attn")
#: The kernel-regression layers (docs/family.md §9): their state is a KV cache State(k, v, g, length).
KERNEL = ("softmax", "forgetting_attn")
V2 = ("simple_gla", "retention", "gla", "gated_delta", "kda")
B, T, H, K, V = 2, 7, 2, 3, 5  # small distinct primes; odd length


def load_generated(name: str, backend: str = "jax", root: Path = ROOT):
    """Import ``generated/NAME/layer_<backend>.py`` by path under a unique module name."""
    path = root / "generated" / name / f"layer_{backend}.py"
    mod_name = f"_gen_{name}_{backend}_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


def make_inputs(seed: int, name: str, b=B, t=T, h=H, k=K, v=V, dtype=np.float64):
    """Random q, k, v, params (constrained space) and per-token inputs for a shipped spec."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, k)).astype(dtype)
    kk = (rng.standard_normal((b, t, h, k)) / np.sqrt(k)).astype(dtype)
    vv = rng.standard_normal((b, t, h, v)).astype(dtype)
    params = {"linear": {"eta": (0.5 + rng.random(h)).astype(dtype)},
              "gd": {"eta": (0.1 + 0.2 * rng.random(h)).astype(dtype)},
              "ridge": {"lam": (0.3 + rng.random(h)).astype(dtype)},
              "retention": {"gamma": rng.uniform(0.5, 0.99, h).astype(dtype)},
              "rls_forgetting": {"lam": (0.3 + rng.random(h)).astype(dtype)},
              "mesanet": {"lam": (0.3 + rng.random((h, k))).astype(dtype)}}.get(name, {})
    inputs = {}
    if name in ("delta", "gated_delta", "kda"):
        inputs["beta"] = rng.uniform(0.1, 0.9, (b, t, h)).astype(dtype)
    if name == "implicit_delta":                 # any β > 0 (the exact step is a contraction for every β)
        inputs["beta"] = rng.uniform(0.1, 3.0, (b, t, h)).astype(dtype)
    if name == "mesanet":
        inputs["beta"] = rng.uniform(0.1, 0.9, (b, t, h)).astype(dtype)
    if name in ("rls_forgetting", "mesanet"):   # mild forgetting (RLS with a decaying regulariser winds up when
        inputs["g"] = -rng.uniform(0.01, 0.3, (b, t, h)).astype(dtype)   # the gates are strong and keys few)
    if name in ("simple_gla", "gated_delta", "forgetting_attn"):   # log-space gates, time-varying (never α ≡ 1)
        inputs["g"] = -rng.uniform(0.01, 1.5, (b, t, h)).astype(dtype)
    if name in ("gla", "kda"):                  # per key channel
        inputs["g"] = -rng.uniform(0.01, 1.5, (b, t, h, k)).astype(dtype)
    return q, kk, vv, params, inputs


def reference(name, q, k, v, params, inputs, initial_state=None):
    """The float64 reference of a shipped spec (mesagen.reference, written independently)."""
    from mesagen import reference as ref

    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    if name == "linear":
        return ref.linear(q, k, v, np.asarray(params["eta"], np.float64), initial_state=initial_state)
    if name == "gd":
        return ref.gd(q, k, v, np.asarray(params["eta"], np.float64), steps=3, initial_state=initial_state)
    if name == "delta":
        return ref.delta(q, k, v, np.asarray(inputs["beta"], np.float64), initial_state=initial_state)
    if name == "ridge":
        return ref.ridge(q, k, v, np.asarray(params["lam"], np.float64), initial_state=initial_state)
    if name in ("implicit_delta", "rls_forgetting", "mesanet"):
        from mesagen.reference import solvers

        f64 = {n: np.asarray(x, np.float64) for n, x in {**params, **inputs}.items()}
        if name == "implicit_delta":
            return solvers.implicit_delta(q, k, v, f64["beta"], initial_state=initial_state)
        if name == "rls_forgetting":
            return solvers.rls_forgetting(q, k, v, f64["g"], f64["lam"], initial_state=initial_state)
        return solvers.mesanet(q, k, v, f64["g"], f64["beta"], f64["lam"], initial_state=initial_state)[:2]
    if name in KERNEL:
        return reference_kernel(q, k, v, inputs.get("g"), initial_state)
    return reference_v2(name, q, k, v, params, inputs, initial_state)


def init_state_kw(name, capacity):
    """Keyword arguments of ``init_state`` for a state that ``capacity`` step() calls can fill: the kernel layers'
    KV cache needs its capacity reserved ({"capacity": capacity}); a fixed-size state needs nothing ({})."""
    return {"capacity": capacity} if name in KERNEL else {}


def _v2_args(name, params, inputs):
    f64 = {n: np.asarray(x, np.float64) for n, x in {**params, **inputs}.items()}
    return [f64["gamma"]] if name == "retention" else [f64[n] for n in ("g", "beta") if n in f64]


def reference_v2(name, q, k, v, params, inputs, initial_state=None, scale=None):
    """The float64 reference of a v2 spec (mesagen.reference.gated); spec default scale when ``scale`` is None."""
    from mesagen import reference as ref

    return getattr(ref, name)(q, k, v, *_v2_args(name, params, inputs), scale=scale, initial_state=initial_state)


def reference_v2_vjp(name, q, k, v, params, inputs, do, initial_state=None, dfinal_state=None, scale=None):
    """Hand-derived float64 VJP of a v2 spec (mesagen.reference.gated): dict of cotangents."""
    from mesagen import reference as ref

    return getattr(ref, f"{name}_vjp")(q, k, v, *_v2_args(name, params, inputs), np.asarray(do, np.float64),
                                      dfinal_state=dfinal_state, scale=scale, initial_state=initial_state)


@pytest.fixture
def x64():
    """Run one test with JAX's 64-bit mode on (the float64 comparisons); other tests keep float32 defaults."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def gen():
    """name -> generated JAX module, loaded once per session."""
    return {n: load_generated(n) for n in SHIPPED}


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    """Drop JAX's compiled executables after every test module (see :func:`_bound_memory_maps` for why)."""
    yield
    jax.clear_caches()


#: Memory mappings a test process may hold before JAX's compiled executables are dropped mid-module. Linux caps a
#: process at ``vm.max_map_count`` mappings (65530 by default); every XLA:CPU executable holds about 18 (measured:
#: 300 small jitted functions took a process from 423 to 5956 mappings, and jax.clear_caches() brought it back to
#: 520). Past the cap, mmap fails inside XLA's compiler, which then crashes (segmentation fault or abort in
#: backend_compile_and_load): test_transforms.py alone compiles enough to get there in one process, and an xdist
#: worker was seen at 33668 mappings mid-suite.
MAX_MAPS = 20000


def _map_count() -> int | None:
    """Number of memory mappings of this process (lines of /proc/self/maps), None where there is no procfs."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


@pytest.fixture(autouse=True)
def _bound_memory_maps():
    """After a test, drop JAX's compiled executables if the process holds more than :data:`MAX_MAPS` mappings, so
    that no test module can drive it to the kernel's cap (later calls recompile; correctness is unchanged)."""
    yield
    count = _map_count()
    if count is not None and count > MAX_MAPS:
        jax.clear_caches()

"""Numba-CUDA layers under the CUDA simulator (run in its own process by tests/test_numba_cuda.py).

Sets ``NUMBA_ENABLE_CUDASIM=1`` before numba is imported, switches threads as often as the interpreter allows
(``sys.setswitchinterval(1e-6)``: many interleavings, cheap barriers) and installs the race detector of
tests/cuda/racecheck.py, so any access of one element by two threads between the same pair of barriers
(one writing), any cross-block conflict and any divergent barrier fails every run, not once in a while.
Tiny prime shapes; float64 to 1e-10 against the references (forward) and against the CPU module's adjoint
(backward), which tests/test_numba_cpu.py ties to JAX autodiff; launch shapes of every kind on top (grids along
batch and heads, threads per block fewer than, between and more than the rows, one thread; sizes drawn per layer).
tests/test_numba_cuda.py runs this file in groups of layers, one process each (SIM_GROUPS).
"""

from __future__ import annotations

import os
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
sys.setswitchinterval(1e-6)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numba import cuda  # noqa: E402

import racecheck  # noqa: E402  (patches the simulator before any kernel runs)
from numba_cases import (CORE_LAYERS, KERNEL_LAYERS, SOLVER_LAYERS, V2_LAYERS, B, H, K, T, V, close, data,  # noqa: E402
                         module, params_inputs, reference, reference_kernel, reference_vjp)


def test_simulator_is_active():
    assert cuda.simulator_enabled if hasattr(cuda, "simulator_enabled") else os.environ["NUMBA_ENABLE_CUDASIM"]
    assert "simulator" in type(cuda.to_device(np.zeros(1))).__module__


def close_grads(name, g, gc):
    """The CUDA backward's gradients ``g`` equal the CPU backward's ``gc`` (dicts of backward()).

    The CPU ridge backward is implicit (docs/numerics.md): like JAX's, its cotangent of the initial P₀ is
    symmetric; the CUDA adjoint recurrence's is not. P₀ is symmetric by construction (A₀⁻¹), so only the
    symmetric part of that cotangent is a derivative, and it is what is compared there.
    """
    for n in sorted(gc):
        if n != "dinitial_state":
            close(g[n], gc[n])
            continue
        for field, a, b in zip(gc[n]._fields, g[n], gc[n]):
            if name == "ridge" and field == "P":
                a, b = ((x + np.swapaxes(x, -1, -2)) / 2 for x in (a, b))
            close(a, b)


@pytest.mark.parametrize("name", CORE_LAYERS)
def test_forward_and_backward(name):
    q, k, v, do, beta = data(6)
    params, inputs = params_inputs(name, beta)
    m, c = module(name, "numba_cuda"), module(name, "numba_cpu")
    o, st = m.forward(q, k, v, params, output_final_state=True, **inputs)
    ro, rst = reference(name, q, k, v, params, inputs)
    close(o, ro)
    for n in m.State._fields:
        close(getattr(st, n), rst[n])
    g = m.backward(q, k, v, params, do, dfinal_state=st, **inputs)
    gc = c.backward(q, k, v, params, do, dfinal_state=st, **inputs)
    close_grads(name, g, gc)


@pytest.mark.parametrize("name", CORE_LAYERS)
def test_given_state_step_and_device_arrays(name):
    q, k, v, do, beta = data(7)
    params, inputs = params_inputs(name, beta)
    m = module(name, "numba_cuda")
    st0 = m.forward(q[:, :2], k[:, :2], v[:, :2], params, output_final_state=True,
                    **{n: x[:, :2] for n, x in inputs.items()})[1]
    o, st = m.forward(q, k, v, params, initial_state=st0, output_final_state=True, **inputs)
    ro, rst = reference(name, q, k, v, params, inputs, initial_state=st0._asdict())
    close(o, ro)
    o_t, st1 = m.step(st0, q[:, 0], k[:, 0], v[:, 0], params, **{n: x[:, 0] for n, x in inputs.items()})
    close(o_t, o[:, 0])
    dev = [cuda.to_device(x) for x in (q, k, v)]
    od, std = m.forward(*dev, params, initial_state=st0, output_final_state=True,
                        **{n: cuda.to_device(x) for n, x in inputs.items()})
    assert hasattr(od, "copy_to_host")  # device in -> device out
    close(od.copy_to_host(), o)
    gd = m.backward(*dev, params, cuda.to_device(do), initial_state=st0, **inputs)
    gh = m.backward(q, k, v, params, do, initial_state=st0, **inputs)
    close(gd["dq"].copy_to_host(), gh["dq"])


def test_two_widths_in_one_process():
    m = module("ridge", "numba_cuda")
    for seed, (kk, vv) in enumerate([(3, 5), (2, 7), (3, 5)]):
        q, k, v, _, _ = data(20 + seed, b=1, t=5, k=kk, v=vv)
        params = {"lam": np.array([0.7, 1.9])}
        close(m.forward(q, k, v, params)[0], reference("ridge", q, k, v, params, {})[0])
    assert (B, T, H, K, V) == (2, 7, 2, 3, 5)


def launch_shapes(name):
    """(batch, heads, length, threads per block) of :func:`test_random_launch_shapes_are_race_free` for ``name``:
    one shape of each kind, the exact sizes drawn per layer. Several blocks along the batch with fewer threads than
    any rows (2 < K = 3 < V = 5); several blocks along the heads with threads between K and V (more than the K
    rows, at most the V rows); a 2 × 2 grid with more threads than any rows (V + 1 … V + 3); one block of one
    thread at T = 1. Lengths are odd (3 … 9), so never a multiple of the 2-thread block."""
    rng = np.random.default_rng(sum(map(ord, name)))
    odd = lambda: int(rng.choice([3, 5, 7, 9]))  # noqa: E731
    return [(2, 1, odd(), 2), (1, 2, odd(), int(rng.integers(K + 1, V + 1))),
            (2, 2, int(rng.choice([2, 3])), int(rng.integers(V + 1, V + 4))), (1, 1, 1, 1)]


@pytest.mark.parametrize("name", CORE_LAYERS)
def test_random_launch_shapes_are_race_free(name, monkeypatch):
    """Launch shapes of every kind (:func:`launch_shapes`: grids along batch and heads, 1 … V + 3 threads per block,
    fewer or more than the rows) under the race detector, against the reference (forward) and the CPU (backward)."""
    m, c = module(name, "numba_cuda"), module(name, "numba_cpu")
    assert K < V
    for rep, (b, h, t, threads) in enumerate(launch_shapes(name)):
        monkeypatch.setattr(m, "_threads", lambda K_, V_: threads)
        q, k, v, do, beta = data(100 + rep, b=b, t=t, h=h)
        params, inputs = params_inputs(name, beta, h=h)
        before = racecheck.stats["accesses"]
        o, st = m.forward(q, k, v, params, output_final_state=True, **inputs)
        ro, rst = reference(name, q, k, v, params, inputs)
        close(o, ro)
        g = m.backward(q, k, v, params, do, dfinal_state=st, **inputs)
        gc = c.backward(q, k, v, params, do, dfinal_state=st, **inputs)
        close_grads(name, g, gc)
        assert racecheck.stats["accesses"] > before  # the detector saw the kernels' accesses


def _mutant(name, drop):
    """The committed CUDA module of ``name`` with its ``drop``-th ``_sync()`` line removed."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "generated" / name / "layer_numba_cuda.py"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    syncs = [i for i, x in enumerate(lines) if x.strip() == "_sync()"]
    del lines[syncs[drop]]
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"mesagen_mutant_{os.getpid()}_{name}_{drop}.py"
    out.write_text("".join(lines), encoding="utf-8")
    spec = importlib.util.spec_from_file_location(out.stem, out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out.unlink()
    return mod


@pytest.mark.parametrize("name,drop", [("gd", 4), ("ridge", 2), ("ridge", 9)])
def test_a_missing_barrier_fails_deterministically(name, drop):
    """The detector catches a barrier removed from the generator's output on every run, not by luck."""
    q, k, v, do, beta = data(6, t=3)
    params, inputs = params_inputs(name, beta)
    m = _mutant(name, drop)
    # which check fires first (a race, or threads passing different numbers of barriers) depends on thread
    # scheduling; either is the detector catching the missing barrier
    with pytest.raises(racecheck.RaceError, match="race|divergent syncthreads"):
        m.backward(q, k, v, params, do, **inputs)


def test_shared_array_is_one_per_call_site_even_when_allocation_is_slow(monkeypatch):
    """The simulator's check-then-set allocation gave threads private 'shared' arrays (issue 7 item 2)."""
    import time
    import types as pytypes

    slow = pytypes.SimpleNamespace(**{n: getattr(np, n) for n in dir(np) if not n.startswith("__")})
    slow.empty = lambda *a, **kw: (time.sleep(0.002), np.empty(*a, **kw))[1]
    monkeypatch.setattr(racecheck, "np", slow)

    @cuda.jit
    def kernel(out):
        buf = cuda.shared.array(8, np.float64)
        buf[cuda.threadIdx.x] = cuda.threadIdx.x + 1.0
        cuda.syncthreads()
        if cuda.threadIdx.x == 0:
            s = 0.0
            for i in range(8):
                s += buf[i]
            out[0] = s

    out = np.zeros(1)
    kernel[1, 8](out)
    assert out[0] == 36.0


@pytest.mark.parametrize("name", CORE_LAYERS)
def test_dtype_policy(name):
    """q float32 / float64 is the compute dtype (others: ValueError); k, v, params, inputs are cast to it."""
    q, k, v, do, beta = data(8, t=3)
    params, inputs = params_inputs(name, beta)
    m = module(name, "numba_cuda")
    for bad in (np.float16, np.int32, np.bool_, np.complex64):
        with pytest.raises(ValueError, match=rf"^{name}: q has dtype {np.dtype(bad).name}.*float32 or float64"):
            m.forward(q.astype(bad), k, v, params, **inputs)
    with pytest.raises(ValueError, match=rf"^{name}: v has dtype int64; it must be a real floating array"):
        m.backward(q, k, v.astype(np.int64), params, do, **inputs)
    ps = {n: x.astype(np.float16) for n, x in params.items()}
    o, st = m.forward(q.astype(np.float32), k, v.astype(np.float16), ps, output_final_state=True, **inputs)
    g = m.backward(q.astype(np.float32), k, v.astype(np.float16), ps, do, dfinal_state=st, **inputs)
    arrays = [o, *st] + [x for n, d in g.items() for x in (d if n == "dinitial_state" else [d])]
    assert {a.dtype for a in arrays} == {np.dtype(np.float32)}
    c = module(name, "numba_cpu")
    close(o, c.forward(q.astype(np.float32), k, v.astype(np.float16), ps, **inputs)[0], rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*invalid value encountered:RuntimeWarning")  # inf - inf in the simulator
@pytest.mark.filterwarnings("ignore:.*overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("name", CORE_LAYERS)
def test_non_finite_input_does_not_reach_earlier_positions(name):
    """Issue 7 item 4 on the CUDA modules: NaN / inf at t = 3, loss on t < 3 (B = H = 1, T = 6, K = 3, V = 4)."""
    rng = np.random.default_rng(11)
    q, k, v, do = (rng.standard_normal((1, 6, 1, d)) for d in (3, 3, 4, 4))
    params, inputs = params_inputs(name, rng.uniform(0.1, 0.9, (1, 6, 1)), h=1)
    do[:, 3:] = 0.0
    m = module(name, "numba_cuda")
    clean = m.backward(q, k, v, params, do, **inputs)
    clean_o = m.forward(q, k, v, params, **inputs)[0]
    extra = tuple((n, x) for n, x in zip(inputs, (np.nan, np.inf, -np.inf)))  # every per-token input too
    for target, bad in (("k", np.nan), ("v", np.inf), ("q", -np.inf)) + extra:
        arrays = {"q": q.copy(), "k": k.copy(), "v": v.copy(), **{n: x.copy() for n, x in inputs.items()}}
        arrays[target][:, 3] = bad
        ins = {n: arrays[n] for n in inputs}
        o = m.forward(arrays["q"], arrays["k"], arrays["v"], params, **ins)[0]
        np.testing.assert_array_equal(o[:, :3], clean_o[:, :3])
        g = m.backward(arrays["q"], arrays["k"], arrays["v"], params, do, **ins)
        for n, x in g.items():
            if n == "dinitial_state":
                for a, c in zip(x, clean[n]):
                    np.testing.assert_array_equal(a, c)
            elif x.ndim >= 3:
                np.testing.assert_array_equal(x[:, :3], clean[n][:, :3], err_msg=f"{target}: {n}")
                np.testing.assert_array_equal(x[:, 3:], 0.0, err_msg=f"{target}: {n}")
            else:
                np.testing.assert_array_equal(x, clean[n], err_msg=f"{target}: {n}")


@pytest.mark.parametrize("t", [7, 1], ids=["T7", "T1"])
@pytest.mark.parametrize("name", V2_LAYERS)
def test_v2_against_reference_vjp(name, t):
    """Contract v2 layers on the simulated GPU: outputs, final states and every gradient (gates, β, γ, initial
    state included) equal mesagen.reference.gated and its hand-derived VJP to 1e-10 (given initial state,
    random final-state cotangent, scale 0.37 for T = 1); step() equals forward; float32 stays within 2e-6."""
    q, k, v, do, beta = data(50 + t, t=t)
    params, inputs = params_inputs(name, beta)
    m = module(name, "numba_cuda")
    rng = np.random.default_rng(t)
    st0 = m.State(*(rng.standard_normal((B, H, K, V)) for _ in m.State._fields))
    scale = 0.37 if t == 1 else None
    o, st = m.forward(q, k, v, params, initial_state=st0, output_final_state=True, scale=scale, **inputs)
    ro, rst = reference(name, q, k, v, params, inputs, initial_state=st0._asdict(), scale=scale)
    close(o, ro)
    for n in m.State._fields:
        close(getattr(st, n), rst[n])
    dfin = m.State(*(rng.standard_normal(x.shape) for x in st))
    g = m.backward(q, k, v, params, do, initial_state=st0, dfinal_state=dfin, scale=scale, **inputs)
    rg = reference_vjp(name, q, k, v, params, inputs, do, st0._asdict(), dfin._asdict(), scale=scale)
    assert sorted(g) == sorted(rg)
    for n in rg:
        if n == "dinitial_state":
            for f in m.State._fields:
                close(getattr(g[n], f), rg[n][f])
        else:
            close(g[n], rg[n], floor=1e-3)
    state = st0
    for s in range(t):
        o_t, state = m.step(state, q[:, s], k[:, s], v[:, s], params, scale=scale,
                            **{n: x[:, s] for n, x in inputs.items()})
        close(o_t, o[:, s], rtol=1e-13)
    f32 = lambda d: {n: x.astype(np.float32) for n, x in d.items()}  # noqa: E731
    o32 = m.forward(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), f32(params),
                    initial_state=m.State(*(x.astype(np.float32) for x in st0)), scale=scale, **f32(inputs))[0]
    assert o32.dtype == np.float32
    close(o32, ro, rtol=2e-6)
    g32 = m.backward(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), f32(params),
                     do.astype(np.float32), initial_state=m.State(*(x.astype(np.float32) for x in st0)),
                     dfinal_state=m.State(*(x.astype(np.float32) for x in dfin)), scale=scale, **f32(inputs))
    for n in rg:
        if n != "dinitial_state":
            assert g32[n].dtype == np.float32
            close(g32[n], rg[n], rtol=2e-6, floor=1e-3)


@pytest.mark.parametrize("name", SOLVER_LAYERS)
def test_exact_and_implicit_solver_layers(name, monkeypatch):
    """One small case per layer of the exact / implicit solvers (implicit_delta, rls_forgetting, mesanet: its
    conjugate-gradient solve and per-key-channel λ) under the race detector, with 2 threads per block (fewer than
    the rows): forward and final state equal the float64 reference (mesagen.reference.solvers) to 1e-10, every
    gradient (initial state and final-state cotangent given) equals the Numba CPU backward to 1e-10."""
    q, k, v, do, beta = data(60, b=1, t=4)
    params, inputs = params_inputs(name, beta)
    m, c = module(name, "numba_cuda"), module(name, "numba_cpu")
    monkeypatch.setattr(m, "_threads", lambda K_, V_: 2)
    st0 = c.forward(q[:, :2], k[:, :2], v[:, :2], params, output_final_state=True,
                    **{n: x[:, :2] for n, x in inputs.items()})[1]
    before = racecheck.stats["accesses"]
    o, st = m.forward(q, k, v, params, initial_state=st0, output_final_state=True, **inputs)
    ro, rst = reference(name, q, k, v, params, inputs, initial_state=st0._asdict())
    close(o, ro)
    for n in m.State._fields:
        close(getattr(st, n), rst[n])
    rng = np.random.default_rng(61)
    dfin = m.State(*(rng.standard_normal(x.shape) for x in st))
    g = m.backward(q, k, v, params, do, initial_state=st0, dfinal_state=dfin, **inputs)
    gc = c.backward(q, k, v, params, do, initial_state=st0, dfinal_state=dfin, **inputs)
    assert sorted(g) == sorted(gc)
    for n in gc:
        for a, b in (zip(g[n], gc[n]) if n == "dinitial_state" else [(g[n], gc[n])]):
            close(a, b)
    assert racecheck.stats["accesses"] > before



def _kernel_data(name, seed, b=B, t=T, h=H):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, b, t, h, K))
    v, do = rng.standard_normal((2, b, t, h, V))
    ins = {"g": np.log(rng.uniform(0.3, 1.0, (b, t, h)))} if name == "forgetting_attn" else {}
    return q, k, v, do, ins


@pytest.mark.parametrize("name", KERNEL_LAYERS)
def test_kernel_layers_forward_backward_step(name, monkeypatch):
    """softmax / forgetting_attn: forward and the final cache against the float64 reference; backward (every
    gradient, a given cache and a final-cache cotangent) against the CPU module, which tests/test_numba_kernel.py
    ties to JAX autodiff; T = 1; step; device arrays in → device arrays out; random block sizes (1 … 9 threads,
    fewer or more than the rows) under the race detector."""
    m, c = module(name, "numba_cuda"), module(name, "numba_cpu")
    q, k, v, do, ins = _kernel_data(name, 1)
    cache = c.forward(q[:, :3], k[:, :3], v[:, :3], {}, output_final_state=True,
                      initial_state=c.init_state(B, H, K, V, {}, np.float64, capacity=2),
                      **{n: x[:, :3] for n, x in ins.items()})[1]
    rng = np.random.default_rng(sum(map(ord, name)))
    for t in (T, 1):
        threads = int(rng.integers(1, 10))
        monkeypatch.setattr(m, "_threads", lambda n: threads)
        qs, ks, vs, dos = (x[:, :t] for x in (q, k, v, do))
        it = {n: x[:, :t] for n, x in ins.items()}
        before = racecheck.stats["accesses"]
        o, st = m.forward(qs, ks, vs, {}, initial_state=cache, output_final_state=True, **it)
        ro, rst = reference_kernel(qs, ks, vs, it.get("g"), initial_state=cache._asdict())
        close(o, ro)
        for f in st._fields:
            close(getattr(st, f), rst[f])
        g = m.backward(qs, ks, vs, {}, dos, initial_state=cache, dfinal_state=st, **it)
        gc = c.backward(qs, ks, vs, {}, dos, initial_state=cache, dfinal_state=st, **it)
        for n in gc:
            for a, b in (zip(g[n][:3], gc[n][:3]) if n == "dinitial_state" else [(g[n], gc[n])]):
                close(a, b)
        assert racecheck.stats["accesses"] > before
    o_t, st1 = m.step(cache, q[:, 0], k[:, 0], v[:, 0], {}, **{n: x[:, 0] for n, x in ins.items()})
    o_c, st_c = c.step(cache, q[:, 0], k[:, 0], v[:, 0], {}, **{n: x[:, 0] for n, x in ins.items()})
    close(o_t, o_c)
    for a, b in zip(st1, st_c):
        close(a, b)
    od, sd = m.forward(*(cuda.to_device(x) for x in (q, k, v)), {}, output_final_state=True,
                       **{n: cuda.to_device(x) for n, x in ins.items()})
    assert hasattr(od, "copy_to_host") and hasattr(sd.k, "copy_to_host")
    close(od.copy_to_host(), c.forward(q, k, v, {}, **ins)[0])
    o32, _ = m.forward(q.astype(np.float32), k, v, {}, **ins)
    assert o32.dtype == np.float32
    close(o32, c.forward(q, k, v, {}, **ins)[0], rtol=2e-5)

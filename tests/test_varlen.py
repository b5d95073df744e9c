"""Variable-length batches (``cu_seqlens``, fla's convention; docs/contract.md §10, §11).

N sequences packed into one row (B = 1) must give what N separate calls give: outputs, final states and
gradients (the initial state's included), in every form of the JAX module and in the Numba CPU module (CUDA
under the simulator: tests/cuda). Changing one sequence leaves the others' outputs bit-identical. A
representative spec per solver kind and gate type: uniform (linear), ridge, per-key-channel gate (gla),
gated delta rule, MesaNet (conjugate gradient, importance), RLS with forgetting, implicit delta, and retention
(a constant per-head decay γ: the padding must be neutralised inside the impl, not by its inputs).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import KERNEL, H, K, V, load_generated, make_inputs

SPECS = ("linear", "ridge", "gla", "gated_delta", "mesanet", "rls_forgetting", "implicit_delta", "retention")
# The suite runs a fast subset (a per-head decay in every JAX form, the delta-rule chunked form, the implicit
# ridge backward); MESAGEN_VARLEN_ALL=1 runs every spec of SPECS in every form (about 10 minutes on 2 cores).
ALL = os.environ.get("MESAGEN_VARLEN_ALL") == "1"
JAX_SPECS = SPECS if ALL else ("retention", "gated_delta", "ridge")
NUMBA_SPECS = SPECS if ALL else ("gated_delta",)
CU = (0, 2, 7, 8)          # three sequences of lengths 2, 5, 1 (T = 8)
CU_EVEN = (0, 4, 8)        # two of length 4, padded to T = 8 (the gradient test: one compiled length for both)
T = CU[-1]
TOL = 1e-10                # float64: packed and separate differ by round-off only (other chunk / segment splits)


def _packed_case(name, seed=0):
    """q, k, v, params, inputs for one packed row [1, T, ...], and a random initial state [N, H, ...]."""
    q, k, v, params, inputs = make_inputs(seed, name, b=1, t=T)
    return q, k, v, params, inputs


def _random_state(m, n, seed):
    """A valid random initial state of N rows: the final state of a short random prefix (so ridge's P stays SPD)."""
    q, k, v, params, inputs = make_inputs(seed + 100, m.SPEC_NAME, b=n, t=3)
    _, st = m.forward(q, k, v, params, output_final_state=True, **inputs)
    return st


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


# ---------------------------------------------------------------------------------------------------- JAX


@pytest.fixture(scope="module", params=JAX_SPECS)
def jmod(request):
    return load_generated(request.param, "jax")


def _separate_jax(m, form, q, k, v, params, inputs, st, cu=CU):
    os, finals = [], []
    for n, (s, e) in enumerate(zip(cu, cu[1:])):
        st_n = None if st is None else type(st)(*(x[n:n + 1] for x in st))
        o, f = m.forward(q[:, s:e], k[:, s:e], v[:, s:e], params, initial_state=st_n, output_final_state=True,
                         form=form, **{i: x[:, s:e] for i, x in inputs.items()})
        os.append(o)
        finals.append(f)
    return jnp.concatenate(os, axis=1), type(finals[0])(*(jnp.concatenate(f, axis=0) for f in zip(*finals)))


def test_jax_packed_equals_separate_all_forms(jmod, x64):
    m = jmod
    q, k, v, params, inputs = _packed_case(m.SPEC_NAME)
    st = _random_state(m, len(CU_EVEN) - 1, 1)
    cu = jnp.asarray(CU_EVEN, jnp.int32)
    w = np.random.default_rng(3).standard_normal((1, T, H, V))
    ws = [np.random.default_rng(4 + i).standard_normal(x.shape) for i, x in enumerate(st)]

    def loss(packed, form, q, k, v, params, inputs, st):
        if packed:
            o, f = m.forward(q, k, v, params, initial_state=st, output_final_state=True, form=form, cu_seqlens=cu,
                             **inputs)
        else:
            o, f = _separate_jax(m, form, q, k, v, params, inputs, st, CU_EVEN)
        return jnp.sum(o * w) + sum(jnp.sum(a * b) for a, b in zip(f, ws)), (o, f)

    for form in m.FORMS:
        (lp, (op, fp)), gp = jax.value_and_grad(loss, argnums=(2, 3, 4, 5, 6, 7), has_aux=True)(
            True, form, q, k, v, params, inputs, st)
        (ls, (os_, fs)), gs = jax.value_and_grad(loss, argnums=(2, 3, 4, 5, 6, 7), has_aux=True)(
            False, form, q, k, v, params, inputs, st)
        assert op.shape == (1, T, H, V) and fp[0].shape[0] == len(CU_EVEN) - 1
        assert _rel(op, os_) < TOL, (form, _rel(op, os_))
        for a, b in zip(fp, fs):
            assert _rel(a, b) < TOL, form
        for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gs)):
            assert a.shape == b.shape and _rel(a, b) < TOL, (form, _rel(a, b))


def test_jax_sequences_isolated_bitwise(jmod, x64):
    m = jmod
    q, k, v, params, inputs = _packed_case(m.SPEC_NAME, seed=5)
    cu = np.asarray(CU)
    q2, v2 = np.array(q), np.array(v)
    q2[:, 2:7] += 1.0                                                 # change sequence 1 only
    v2[:, 2:7] *= -3.0
    for form in m.FORMS:
        o1, f1 = m.forward(q, k, v, params, form=form, cu_seqlens=cu, output_final_state=True, **inputs)
        o2, f2 = m.forward(q2, k, v2, params, form=form, cu_seqlens=cu, output_final_state=True, **inputs)
        for s, e in ((0, 2), (7, 8)):
            np.testing.assert_array_equal(np.asarray(o1[:, s:e]), np.asarray(o2[:, s:e]))
        assert not np.allclose(np.asarray(o1[:, 2:7]), np.asarray(o2[:, 2:7]))
        for a, b in zip(f1, f2):
            np.testing.assert_array_equal(np.asarray(a)[[0, 2]], np.asarray(b)[[0, 2]])
        q3 = np.array(q)
        q3[:, 4] = np.nan                                              # a NaN inside sequence 1
        o3, _ = m.forward(q3, k, v, params, form=form, cu_seqlens=cu, **inputs)
        for s, e in ((0, 2), (7, 8)):
            np.testing.assert_array_equal(np.asarray(o1[:, s:e]), np.asarray(o3[:, s:e]))
        np.testing.assert_array_equal(np.asarray(o1[:, 2:4]), np.asarray(o3[:, 2:4]))   # causal inside it too


def test_jax_unequal_lengths_traced_offsets_max_seqlen(x64):
    """Unequal lengths (2, 5, 1), the default initial state, offsets traced under jit, and max_seqlen."""
    m = load_generated("retention", "jax")
    q, k, v, params, inputs = _packed_case("retention")
    o_sep, f_sep = _separate_jax(m, "recurrent", q, k, v, params, inputs, None)
    run = jax.jit(lambda c: m.forward(q, k, v, params, output_final_state=True, cu_seqlens=c))
    o_jit, f_jit = run(jnp.asarray(CU))
    o_pad, f_pad = m.forward(q, k, v, params, cu_seqlens=np.asarray(CU), max_seqlen=5, form="chunked", chunk_size=2,
                             output_final_state=True)
    for o, f in ((o_jit, f_jit), (o_pad, f_pad)):
        assert _rel(o, o_sep) < TOL and all(_rel(a, b) < TOL for a, b in zip(f, f_sep))


def test_jax_errors(x64):
    m = load_generated("retention", "jax")
    q, k, v, params, inputs = _packed_case("retention")
    bad = {"not increasing": (0, 5, 5, 8), "wrong end": (0, 2, 7), "wrong start": (1, 2, 8)}
    for what, cu in bad.items():
        with pytest.raises(ValueError, match="cu_seqlens"):
            m.forward(q, k, v, params, cu_seqlens=np.asarray(cu))
    with pytest.raises(ValueError, match="cu_seqlens"):
        m.forward(q, k, v, params, cu_seqlens=np.asarray(CU, np.float32))
    with pytest.raises(ValueError, match="B = 1"):
        m.forward(np.concatenate([q, q]), np.concatenate([k, k]), np.concatenate([v, v]), params,
                  cu_seqlens=np.asarray(CU))
    st = m.init_state(2, H, K, V, params, jnp.float64)                 # B rows, not N = 3
    with pytest.raises(ValueError, match="leading axis is N"):
        m.forward(q, k, v, params, initial_state=st, cu_seqlens=np.asarray(CU))
    with pytest.raises(ValueError, match="max_seqlen"):
        m.forward(q, k, v, params, cu_seqlens=np.asarray(CU), max_seqlen=4)
    with pytest.raises(ValueError, match="max_seqlen"):
        m.forward(q, k, v, params, max_seqlen=4)


# ------------------------------------------------------------------------------- JAX, kernel layers (KV cache)
# The state is a KV cache State(k, v, g, length) of capacity N_cap; with cu_seqlens the final caches have capacity
# N_cap + T (the Numba modules' layout), sequence s's own cache (capacity N_cap + T_s) followed by zero slots.

KV_CAP = 3                 # capacity of the random initial caches; their lengths differ per sequence (3, 1, 0)
KTOL = 1e-12               # float64: the padded batch and the separate calls differ by round-off only


def _kv_case(name, seed=0):
    """A packed row (CU) of a kernel layer, its random initial caches [S = 3, H, KV_CAP, ...] of lengths 3, 1, 0
    (empty slots zero; g ≤ 0 with a forget gate, 0 without), and the gate-free / gated per-token inputs."""
    m = load_generated(name, "jax")
    q, k, v, params, inputs = make_inputs(seed, name, b=1, t=T)
    rng = np.random.default_rng(seed + 50)
    S = len(CU) - 1
    length = np.array([3, 1, 0], np.int32)
    filled = np.arange(KV_CAP)[None, None, :] < length[:, None, None]                      # [S, 1, N_cap]
    ck = np.where(filled[..., None], rng.standard_normal((S, H, KV_CAP, K)) / np.sqrt(K), 0)
    cv = np.where(filled[..., None], rng.standard_normal((S, H, KV_CAP, V)), 0)
    cg = np.where(filled, -rng.uniform(0.0, 2.0, (S, H, KV_CAP)), 0) if inputs else np.zeros((S, H, KV_CAP))
    return m, q, k, v, params, inputs, m.State(ck, cv, cg, length)


def _kv_separate(m, form, q, k, v, inputs, st, **kw):
    """S separate calls (sequence s with cache s); outputs concatenated along T, final caches listed."""
    os, finals = [], []
    for n, (s, e) in enumerate(zip(CU, CU[1:])):
        o, f = m.forward(q[:, s:e], k[:, s:e], v[:, s:e], {}, initial_state=type(st)(*(x[n:n + 1] for x in st)),
                         output_final_state=True, form=form, **kw, **{i: x[:, s:e] for i, x in inputs.items()})
        os.append(o)
        finals.append(f)
    return jnp.concatenate(os, axis=1), finals


def test_kernel_jax_packed_equals_separate(x64):
    """Outputs, final caches and gradients (q, k, v, gate, initial cache k, v, g) of a packed call equal S separate
    calls, in both forms (chunked: key blocks of 2, so blocks straddle the cache and the padding). forgetting_attn
    only: softmax runs the same frame with log gates ≡ 0 (its packed calls are checked against the Numba module's
    separate per-sequence calls below)."""
    m, q, k, v, params, inputs, st = _kv_case("forgetting_attn")
    cu = jnp.asarray(CU, jnp.int32)
    rng = np.random.default_rng(11)
    w = rng.standard_normal((1, T, H, V))
    wf = [rng.standard_normal(x.shape[:2] + (KV_CAP + T,) + x.shape[3:]) for x in st[:3]]   # on the final cache

    def loss(packed, form, q, k, v, inputs, cache):
        st_ = m.State(*cache, st.length)
        kw = {"chunk_size": 2} if form == "chunked" else {}
        if packed:
            o, f = m.forward(q, k, v, params, initial_state=st_, output_final_state=True, form=form, cu_seqlens=cu,
                             **kw, **inputs)
            lf = sum(jnp.sum(a * b) for a, b in zip(f[:3], wf))
        else:
            o, fs = _kv_separate(m, form, q, k, v, inputs, st_, **kw)
            f = fs
            lf = sum(jnp.sum(a * b[n:n + 1, :, :a.shape[2]]) for n, fn in enumerate(fs) for a, b in zip(fn[:3], wf))
        return jnp.sum(o * w) + lf, (o, f)

    args = (q, k, v, inputs, tuple(st[:3]))
    grad = jax.jit(jax.value_and_grad(loss, argnums=(2, 3, 4, 5, 6), has_aux=True), static_argnums=(0, 1))
    for form in m.FORMS:                                              # (one compilation per call: jit)
        (_, (op, fp)), gp = grad(True, form, *args)
        (_, (os_, fs)), gs = grad(False, form, *args)
        assert op.shape == (1, T, H, V) and _rel(op, os_) < KTOL, (form, _rel(op, os_))
        assert fp.k.shape == (len(CU) - 1, H, KV_CAP + T, K) and fp.length.dtype == jnp.int32
        for n, fn in enumerate(fs):                                   # own tokens only, then zero slots
            cap = fn.k.shape[2]
            assert cap == KV_CAP + CU[n + 1] - CU[n]
            assert int(fp.length[n]) == int(fn.length[0]) == int(st.length[n]) + CU[n + 1] - CU[n]
            for a, b in zip(fp[:3], fn[:3]):
                assert _rel(a[n:n + 1, :, :cap], b) < KTOL, form
                assert not np.any(np.asarray(a[n, :, cap:]))
        for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gs)):
            assert a.shape == b.shape and np.all(np.isfinite(np.asarray(a))) and _rel(a, b) < KTOL, (form, _rel(a, b))
        assert float(jnp.max(jnp.abs(gp[4][0]))) > 0                # the caches do receive gradients


def test_kernel_jax_sequences_isolated_bitwise(x64):
    """A NaN (or an inf) in one packed sequence leaves the others' outputs and final caches bit-identical; the
    gate values at padding positions do not matter (the impls see them only through the live mask).
    forgetting_attn (softmax: the same frame without a gate)."""
    m, q, k, v, params, inputs, st = _kv_case("forgetting_attn", seed=3)
    cu = np.asarray(CU)
    q3, v3 = np.array(q), np.array(v)
    q3[:, 4] = np.nan                                                 # inside sequence 1 (tokens 2 … 6)
    v3[:, 6] = np.inf
    for form in m.FORMS:
        o1, f1 = m.forward(q, k, v, params, initial_state=st, form=form, cu_seqlens=cu, output_final_state=True,
                           **inputs)
        o3, f3 = m.forward(q3, k, v3, params, initial_state=st, form=form, cu_seqlens=cu, output_final_state=True,
                           **inputs)
        assert np.all(np.isnan(np.asarray(o3[:, 4])))
        for s, e in ((0, 4), (7, 8)):                                 # sequences 0 and 2, and causal inside 1
            np.testing.assert_array_equal(np.asarray(o1[:, s:e]), np.asarray(o3[:, s:e]))
        for a, b in zip(f1, f3):
            np.testing.assert_array_equal(np.asarray(a)[[0, 2]], np.asarray(b)[[0, 2]])
    # the impls on a padded batch [S, T_pad]: arbitrary gate values at padding change nothing (bit for bit)
    cu_j = jnp.asarray(CU, jnp.int32)
    (qp, kp, vp, gp), live = m._varlen_pack(cu_j, 5, [jnp.asarray(x) for x in (q, k, v, *inputs.values())],
                                            (0.0, 0.0, 0.0) + m._INPUT_NEUTRAL)
    g_bad = jnp.where(live[:, :, None], gp, -7.5)
    state = m.State(*(jnp.asarray(x) for x in st))
    for impl in (jax.jit(m._forward_recurrent), m._chunked_impl(2)):
        oa, fa = impl(qp, kp, vp, state, (gp,), 1.0, live)
        ob, fb = impl(qp, kp, vp, state, (g_bad,), 1.0, live)
        np.testing.assert_array_equal(np.asarray(oa)[np.asarray(live)], np.asarray(ob)[np.asarray(live)])
        for a, b in zip(fa, fb):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", KERNEL)
def test_kernel_jax_equals_numba_cpu_packed(name, x64):
    """The JAX module (both forms; offsets traced under jit; max_seqlen below and above T) == the Numba CPU module
    on a packed call (which runs its kernels once per sequence): outputs and final caches (same layout, capacity
    N_cap + T), float64."""
    m, q, k, v, params, inputs, st = _kv_case(name, seed=7)
    nb = load_generated(name, "numba_cpu")
    cu = np.asarray(CU, np.int64)
    on, fn = nb.forward(q, k, v, params, initial_state=nb.State(*st), output_final_state=True, cu_seqlens=cu,
                        **inputs)
    run = jax.jit(lambda c: m.forward(q, k, v, params, initial_state=st, output_final_state=True, cu_seqlens=c,
                                      **inputs))
    results = [run(jnp.asarray(cu)),
               m.forward(q, k, v, params, initial_state=st, output_final_state=True, cu_seqlens=cu, form="chunked",
                         max_seqlen=6 if inputs else 11, chunk_size=4, **inputs)]
    for oj, fj in results:
        assert _rel(oj, on) < KTOL and fj.k.shape == fn.k.shape
        for a, b in zip(fj, fn):
            assert _rel(a, b) < KTOL
        np.testing.assert_array_equal(np.asarray(fj.length), fn.length)


def test_kernel_jax_errors(x64):
    m, q, k, v, params, inputs, st = _kv_case("forgetting_attn")
    for cu in ((0, 5, 5, 8), (0, 2, 7), (1, 2, 8)):
        with pytest.raises(ValueError, match="cu_seqlens"):
            m.forward(q, k, v, params, cu_seqlens=np.asarray(cu), **inputs)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m.forward(q, k, v, params, cu_seqlens=np.asarray(CU, np.float32), **inputs)
    with pytest.raises(ValueError, match="B = 1"):
        m.forward(*(np.concatenate([x, x]) for x in (q, k, v)), params, cu_seqlens=np.asarray(CU),
                  **{n: np.concatenate([x, x]) for n, x in inputs.items()})
    two = m.State(*(x[:2] for x in st))                               # 2 caches, not S = 3
    with pytest.raises(ValueError, match="leading axis is S"):
        m.forward(q, k, v, params, initial_state=two, cu_seqlens=np.asarray(CU), **inputs)
    with pytest.raises(ValueError, match="max_seqlen"):
        m.forward(q, k, v, params, cu_seqlens=np.asarray(CU), max_seqlen=4, **inputs)
    with pytest.raises(ValueError, match="max_seqlen"):
        m.forward(q, k, v, params, max_seqlen=8, **inputs)


# ---------------------------------------------------------------------------------------------------- Numba CPU


@pytest.mark.parametrize("name", NUMBA_SPECS)
def test_numba_cpu_packed_equals_separate(name, x64):
    m = load_generated(name, "numba_cpu")
    q, k, v, params, inputs = _packed_case(name, seed=7)
    jm = load_generated(name, "jax")
    st = m.State(*(np.asarray(x) for x in _random_state(jm, len(CU) - 1, 2)))
    cu = np.asarray(CU, np.int64)
    o, f = m.forward(q, k, v, params, initial_state=st, output_final_state=True, cu_seqlens=cu, **inputs)
    rng = np.random.default_rng(9)
    do = rng.standard_normal(o.shape)
    dfin = m.State(*(rng.standard_normal(x.shape) for x in f))
    g = m.backward(q, k, v, params, do, initial_state=st, dfinal_state=dfin, cu_seqlens=cu, **inputs)
    dparams = {n: 0.0 for n in params}
    for n, (s, e) in enumerate(zip(CU, CU[1:])):
        st_n = m.State(*(x[n:n + 1] for x in st))
        sl = {i: x[:, s:e] for i, x in inputs.items()}
        o_n, f_n = m.forward(q[:, s:e], k[:, s:e], v[:, s:e], params, initial_state=st_n, output_final_state=True,
                             **sl)
        np.testing.assert_array_equal(o[:, s:e], o_n)               # the same kernel on the same tokens
        for a, b in zip(f, f_n):
            np.testing.assert_array_equal(a[n:n + 1], b)
        g_n = m.backward(q[:, s:e], k[:, s:e], v[:, s:e], params, do[:, s:e], initial_state=st_n,
                         dfinal_state=m.State(*(x[n:n + 1] for x in dfin)), **sl)
        for key in ("dq", "dk", "dv") + tuple("d" + i for i in inputs):
            np.testing.assert_array_equal(g[key][:, s:e], g_n[key])
        for a, b in zip(g["dinitial_state"], g_n["dinitial_state"]):
            np.testing.assert_array_equal(a[n:n + 1], b)
        for p in params:
            dparams[p] = dparams[p] + g_n["d" + p]
    for p in params:
        assert _rel(g["d" + p], dparams[p]) < TOL
    # and the JAX module's recurrent form agrees on the packed call
    oj, fj = jm.forward(q, k, v, params, initial_state=st, output_final_state=True, cu_seqlens=cu, **inputs)
    assert _rel(o, oj) < 1e-9 and all(_rel(a, b) < 1e-9 for a, b in zip(f, fj))


def test_numba_cpu_errors():
    m = load_generated("gated_delta", "numba_cpu")
    q, k, v, params, inputs = _packed_case("gated_delta")
    for cu in ((0, 5, 5, 8), (0, 2, 7), (1, 2, 8)):
        with pytest.raises(ValueError, match="cu_seqlens"):
            m.forward(q, k, v, params, cu_seqlens=np.asarray(cu), **inputs)
        with pytest.raises(ValueError, match="cu_seqlens"):
            m.backward(q, k, v, params, np.zeros((1, T, H, V)), cu_seqlens=np.asarray(cu), **inputs)
    with pytest.raises(ValueError, match="B = 1"):
        m.forward(*(np.concatenate([x, x]) for x in (q, k, v)), params, cu_seqlens=np.asarray(CU),
                  **{n: np.concatenate([x, x]) for n, x in inputs.items()})
    st = m.init_state(2, H, K, V, params, np.float64)
    with pytest.raises(ValueError, match="leading axis"):
        m.forward(q, k, v, params, initial_state=st, cu_seqlens=np.asarray(CU), **inputs)


# ---------------------------------------------------------------------------------------------------- Numba CUDA


def test_numba_cuda_simulator_varlen():
    """tests/cuda/varlen_checks.py in its own process (the simulator must be chosen before numba loads)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests")] + [env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "-p", "no:benchmark", str(root / "tests" / "cuda" / "varlen_checks.py")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]

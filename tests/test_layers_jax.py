"""Generated JAX layers against the independent float64 references (docs/contract.md §16): every spec × form on
outputs, final state and gradients; step == forward; continuation; jit / vmap / grad."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHIPPED, H, K, V, B, init_state_kw, load_generated, make_inputs, reference
from test_ridge_numerics import _direct as _ridge_direct  # the independent float64 explicit-solve ridge

pytestmark = pytest.mark.usefixtures("x64")

CASES = [(n, f) for n in SHIPPED for f in load_generated(n).FORMS]
F64_RTOL = 1e-10
#: float32 bound (documented in README, "Numerics"): relative to the largest output, at T ≤ 63, unit-scale inputs.
F32_RTOL = 2e-5


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("name,form", CASES)
@pytest.mark.parametrize("T", [7, 63])
def test_forward_matches_reference_float64(gen, name, form, T):
    m = gen[name]
    q, k, v, params, inputs = make_inputs(1, name, t=T)
    o, state = m.forward(q, k, v, params, output_final_state=True, form=form, **inputs)
    ro, rs = reference(name, q, k, v, params, inputs)
    assert o.shape == (B, T, H, V) and o.dtype == jnp.float64
    assert rel(o, ro) <= F64_RTOL
    assert set(state._fields) == set(rs)
    for f in state._fields:
        assert rel(getattr(state, f), rs[f]) <= F64_RTOL, f


@pytest.mark.parametrize("name,form", CASES)
def test_forward_float32_within_documented_bound(gen, name, form):
    m = gen[name]
    q, k, v, params, inputs = make_inputs(2, name, t=63, dtype=np.float32)
    o, _ = m.forward(q, k, v, params, form=form, **inputs)
    assert o.dtype == jnp.float32
    ro, _ = reference(name, q, k, v, params, inputs)
    assert rel(o, ro) <= F32_RTOL


@pytest.mark.parametrize("name,form", CASES)
def test_initial_state_and_continuation(gen, name, form):
    """forward on [0, T) == forward on [0, t) then on [t, T) from the returned state (and the reference agrees)."""
    m = gen[name]
    q, k, v, params, inputs = make_inputs(3, name, t=11)
    o_full, s_full = m.forward(q, k, v, params, output_final_state=True, form=form, **inputs)
    for t in (0, 1, 4, 10):
        first = {n: x[:, :t] for n, x in inputs.items()}
        second = {n: x[:, t:] for n, x in inputs.items()}
        o1, s1 = m.forward(q[:, :t], k[:, :t], v[:, :t], params, output_final_state=True, form=form, **first)
        o2, s2 = m.forward(q[:, t:], k[:, t:], v[:, t:], params, initial_state=s1, output_final_state=True,
                           form=form, **second)
        assert rel(jnp.concatenate([o1, o2], axis=1), o_full) <= F64_RTOL
        for f in s_full._fields:
            assert rel(getattr(s2, f), getattr(s_full, f)) <= F64_RTOL
        ro, _ = reference(name, q[:, t:], k[:, t:], v[:, t:], params, second,
                          initial_state={f: np.asarray(getattr(s1, f)) for f in s1._fields})
        assert rel(o2, ro) <= F64_RTOL


@pytest.mark.parametrize("name", SHIPPED)
def test_step_loop_equals_forward(gen, name):
    m = gen[name]
    q, k, v, params, inputs = make_inputs(4, name)
    o, final = m.forward(q, k, v, params, output_final_state=True, **inputs)
    state = m.init_state(B, H, K, V, params, jnp.float64, **init_state_kw(name, q.shape[1]))
    outs = []
    for t in range(q.shape[1]):
        o_t, state = m.step(state, q[:, t], k[:, t], v[:, t], params, **{n: x[:, t] for n, x in inputs.items()})
        outs.append(o_t)
    assert rel(jnp.stack(outs, axis=1), o) <= F64_RTOL
    for f in final._fields:
        assert rel(getattr(state, f), getattr(final, f)) <= F64_RTOL


def _loss(m, form, w, inputs_names):
    def f(q, k, v, params, inputs):
        o, _ = m.forward(q, k, v, params, form=form, **inputs)
        return jnp.sum(w * o)
    return f


@pytest.mark.parametrize("name,form", CASES)
def test_gradients_match_central_differences(gen, name, form):
    """jax.grad of every argument (q, k, v, parameters, inputs) against central finite differences."""
    m = gen[name]
    q, k, v, params, inputs = make_inputs(5, name)
    w = np.random.default_rng(6).standard_normal((B, q.shape[1], H, V))
    f = jax.jit(_loss(m, form, w, list(inputs)))
    grads = jax.grad(f, argnums=(0, 1, 2, 3, 4))(q, k, v, params, inputs)
    args = [q, k, v, params, inputs]
    eps = 1e-6
    rng = np.random.default_rng(7)
    for i, g in enumerate(grads):
        leaves, treedef = jax.tree.flatten(args[i])
        gleaves = jax.tree.leaves(g)
        for li, (x, gx) in enumerate(zip(leaves, gleaves)):
            for _ in range(6):  # random coordinates of each argument
                idx = tuple(rng.integers(0, s) for s in x.shape)
                xp, xm = np.array(x), np.array(x)
                xp[idx] += eps
                xm[idx] -= eps

                def with_leaf(val):
                    new = list(leaves)
                    new[li] = val
                    a = list(args)
                    a[i] = jax.tree.unflatten(treedef, new)
                    return float(f(*a))

                fd = (with_leaf(xp) - with_leaf(xm)) / (2 * eps)
                assert abs(float(gx[idx]) - fd) <= 1e-6 * max(1.0, abs(fd)), (i, li, idx)


@pytest.mark.parametrize("form", ["recurrent", "closed_form"])
def test_ridge_gradients_small_lambda_badly_scaled_keys(gen, form):
    """λ = 1e-3 and keys scaled over 1..1e3: gradients stay within 1e-6 of a float64 explicit-solve reference
    (reverse Sherman–Morrison downdates would lose all accuracy here)."""
    m = gen["ridge"]
    rng = np.random.default_rng(8)
    T = 63
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K)) * np.logspace(0, 3, T)[None, :, None, None]
    v = rng.standard_normal((B, T, H, V))
    lam = jnp.full((H,), 1e-3)
    w = rng.standard_normal((B, T, H, V))
    got = jax.grad(lambda *a: jnp.sum(w * m.forward(*a[:3], {"lam": a[3]}, form=form)[0]), argnums=(0, 1, 2, 3))(
        q, k, v, lam)
    want = jax.grad(lambda *a: jnp.sum(w * _ridge_direct(*a)), argnums=(0, 1, 2, 3))(q, k, v, lam)
    for g, r, n in zip(got, want, "qkvλ"):
        assert rel(g, r) <= 1e-6, n


@pytest.mark.parametrize("name", SHIPPED)
def test_jit_vmap_grad_compose(gen, name):
    m = gen[name]
    q, k, v, params, inputs = make_inputs(9, name)
    f = jax.jit(lambda q, k, v, p, i: m.forward(q, k, v, p, **i)[0])
    o = f(q, k, v, params, inputs)
    assert rel(o, m.forward(q, k, v, params, **inputs)[0]) <= F64_RTOL
    # vmap over an extra leading axis (two independent batches)
    stack = lambda x: jnp.stack([x, 2 * x])  # noqa: E731
    ov = jax.vmap(lambda q, k, v, i: m.forward(q, k, v, params, **i)[0])(
        stack(q), stack(k), stack(v), {n: jnp.stack([x, x]) for n, x in inputs.items()})
    assert rel(ov[0], o) <= F64_RTOL
    g = jax.jit(jax.grad(lambda q: jnp.sum(m.forward(q, k, v, params, **inputs)[0] ** 2)))(q)
    assert g.shape == q.shape and bool(jnp.all(jnp.isfinite(g)))


def test_forms_agree_and_errors_are_clear(gen):
    m = gen["ridge"]
    q, k, v, params, inputs = make_inputs(10, "ridge")
    with pytest.raises(ValueError, match="unknown form"):
        m.forward(q, k, v, params, form="parallel")
    with pytest.raises(ValueError, match="unknown form"):
        m.forward(q, k, v, params, form="chunked ")
    with pytest.raises(ValueError, match="missing parameter 'lam'"):
        m.forward(q, k, v, {})
    with pytest.raises(ValueError, match="expected q, k"):
        m.forward(q, k[..., :2], v, params)
    with pytest.raises(ValueError, match="unknown"):
        m.forward(q, k, v, params, beta=np.ones(q.shape[:-1]))
    with pytest.raises(ValueError, match="inputs must be exactly"):
        gen["delta"].forward(q, k, v, {})
    with pytest.raises(ValueError, match="must be float32 or float64"):
        m.forward(q.astype(np.int32), k, v, params)
    with pytest.raises(ValueError, match="params must be a dict"):
        m.forward(q, k, v, None)
    _, st = m.forward(q, k, v, params, output_final_state=True)
    with pytest.raises(ValueError, match=r"initial_state.P must have shape"):
        m.forward(q, k, v, params, initial_state=(st.S, st.P[..., :2]))
    with pytest.raises(ValueError, match="initial_state must have fields"):
        m.forward(q, k, v, params, initial_state=(st.S,))
    with pytest.raises(ValueError, match="initial_state.S must have shape"):
        m.step(st, q[:1, 0], k[:1, 0], v[:1, 0], params)
    # q sets the dtype: float32 q with float64 k, v and state computes (and returns) float32
    o32, s32 = m.forward(q.astype(np.float32), k, v, params, initial_state=st, output_final_state=True)
    assert o32.dtype == jnp.float32 and s32.P.dtype == jnp.float32
    # lists are accepted like arrays
    assert m.forward(q.tolist(), k.tolist(), v.tolist(), params)[0].shape == q.shape[:-1] + (V,)


def test_ridge_checkpointed_backward_segments(gen):
    """The checkpointed VJP is exact for lengths around segment boundaries (⌈√T⌉ segments + tail)."""
    m = gen["ridge"]
    for T in (1, 5, 10, 17):
        q, k, v, params, _ = make_inputs(11, "ridge", t=T)
        w = np.random.default_rng(T).standard_normal((B, T, H, V))
        g1 = jax.jit(jax.grad(lambda k: jnp.sum(w * m.forward(q, k, v, params)[0])))(k)
        g2 = jax.jit(jax.grad(lambda k: jnp.sum(w * _ridge_direct(q, k, v, jnp.asarray(params["lam"])))))(k)
        assert rel(g1, g2) <= F64_RTOL * 10, T

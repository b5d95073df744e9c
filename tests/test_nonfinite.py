"""Causality for non-finite inputs (issue 7, item 4), every spec × form: a NaN, +inf or -inf in q, k, v or a
per-token input at position s leaves the outputs at t < s equal to those of a clean run and makes exactly the
outputs non-finite that the recurrence makes non-finite; with the loss on t < s only, every gradient is finite
and equals the clean run's.

Before the fix the closed forms of linear, gd and ridge made *every* position non-finite for a NaN in v at
t = 4 (0·NaN in the einsum of masked scores with v), and dk, dv at t < 3 were NaN in every form for a NaN at
t = 3 with the loss on t < 3 (0·NaN in the backward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import KERNEL, SHIPPED, load_generated, make_inputs

pytestmark = pytest.mark.usefixtures("x64")

CASES = [(n, f) for n in SHIPPED for f in load_generated(n).FORMS]
B, T, H, K, V = 1, 6, 1, 3, 4  # the shapes
BAD = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}
FIELDS = ("q", "k", "v", "beta")  # beta: delta's per-token input


def cases_with_fields():
    return [(n, f, fld) for n, f in CASES for fld in FIELDS if fld != "beta" or n == "delta"]


def poisoned(name, field, s, bad, seed=0):
    """(clean args, args with ``bad`` at position s of ``field``, index of the poisoned entry)."""
    q, k, v, params, inputs = make_inputs(seed, name, b=B, t=T, h=H, k=K, v=V)
    clean = {"q": q, "k": k, "v": v, **inputs}
    dirty = {n: np.array(x) for n, x in clean.items()}
    idx = (0, s, 0, 1) if field in ("q", "k", "v") else (0, s, 0)
    dirty[field][idx] = bad
    return clean, dirty, params, idx


def run(m, form, args, params):
    ins = {n: x for n, x in args.items() if n not in ("q", "k", "v")}
    return m.forward(args["q"], args["k"], args["v"], params, form=form, output_final_state=True, **ins)


def expected_nonfinite(field, s, name=None, q=None, bad=None):
    """[T, V] mask of the outputs the recurrence makes non-finite: q at s → row s; k or β at s → rows ≥ s;
    v[s, ·, 1] → column 1 of rows ≥ s (the other columns never meet it). A kernel layer (softmax attention) with
    k[s, ·, 1] = ±inf: the rows t ≥ s whose logit q_t[1] · k[s, 1] is +inf or NaN; a logit of −inf is a key of
    weight exactly 0 (exp(−inf)), so those rows stay finite."""
    mask = np.zeros((T, V), bool)
    if name in KERNEL and field == "k":
        with np.errstate(invalid="ignore"):
            logit = q[0, s:, 0, 1] * bad
        mask[s:] = ~(logit < 0)[:, None]
    elif field == "q":
        mask[s] = True
    elif field == "v":
        mask[s:, 1] = True
    else:
        mask[s:] = True
    return mask


@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("name,form,field", cases_with_fields())
def test_outputs_causal_for_nonfinite_input(gen, name, form, field, bad):
    m = gen[name]
    s = 4
    clean, dirty, params, _ = poisoned(name, field, s, BAD[bad])
    o_clean, _ = run(m, form, clean, params)
    o, final = run(m, form, dirty, params)
    o, o_clean = np.asarray(o), np.asarray(o_clean)
    np.testing.assert_allclose(o[:, :s], o_clean[:, :s], rtol=1e-12, atol=0)
    np.testing.assert_array_equal(~np.isfinite(o[0, :, 0]), expected_nonfinite(field, s, name, clean["q"], BAD[bad]))
    if field != "q":  # the final state has absorbed the non-finite pair
        assert not all(bool(jnp.all(jnp.isfinite(x))) for x in final)


_GRADS: dict = {}


def jitted_grad(m, name, form, s):
    """jit(grad) of the loss Σ_{t<s} w·o with respect to (args, params), built once per (layer, form, s) and shared
    by every field and non-finite value (one compilation instead of one per test; the arrays are arguments)."""
    key = (name, form, s)
    if key not in _GRADS:
        def loss(args, params, w):
            o, _ = run(m, form, args, params)
            return jnp.sum(w[:, :s] * o[:, :s])

        _GRADS[key] = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return _GRADS[key]


@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("name,form,field", cases_with_fields())
def test_gradients_causal_for_nonfinite_input(gen, name, form, field, bad):
    """Loss on t < 3, non-finite entry at t = 3: every gradient is finite and equals the clean run's (in
    which the entry is an ordinary number)."""
    m = gen[name]
    s = 3
    clean, dirty, params, _ = poisoned(name, field, s, BAD[bad], seed=1)
    w = np.random.default_rng(2).standard_normal((B, T, H, V))
    w[:, s:] = 0
    grad = jitted_grad(m, name, form, s)
    g_clean = grad(clean, params, w)
    g = grad(dirty, params, w)
    for path, x in jax.tree_util.tree_leaves_with_path(g):
        assert bool(jnp.all(jnp.isfinite(x))), jax.tree_util.keystr(path)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_clean)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-300)
    # the positions after the loss get exactly zero gradient, as in the clean run
    for n in dirty:
        assert not np.any(np.asarray(g[0][n])[:, s + 1:])


@pytest.mark.parametrize("name,form", CASES)
def test_nonfinite_guard_keeps_finite_inputs_exact(gen, name, form):
    """With finite inputs the guard changes nothing: the values are those of the unguarded form, bit for bit."""
    m = gen[name]
    q, k, v, params, inputs = make_inputs(3, name, b=2, t=T, h=2, k=K, v=V)
    impl = {"recurrent": lambda: m._forward_recurrent, "closed_form": lambda: m._forward_closed_form,
            "chunked": lambda: m._chunked_impl(m._DEFAULT_CHUNK_SIZE)}[form]()
    ps = [] if name in KERNEL else [[jnp.asarray(params[n]) for n in m._PARAM_NAMES]]  # kernel layers: no params
    state = m.init_state(2, 2, K, V, params, jnp.float64)
    want = impl(q, k, v, *ps, state, [jnp.asarray(inputs[n]) for n in m._INPUT_NAMES], m._query_scale(None, K, q.dtype))
    got = m.forward(q, k, v, params, form=form, output_final_state=True, **inputs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)

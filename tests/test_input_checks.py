"""Generated layers refuse concrete parameter / per-token input values outside their declared domain, a q of the
wrong number of axes, and an initial state that is not a State, with a ValueError naming the argument (found by
trying the product as a new user: λ = −1 gave NaNs silently, β = 1.5 diverged silently)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_generated

B, T, H, K = 1, 3, 2, 4


def _q():
    return np.random.default_rng(0).standard_normal((B, T, H, K)).astype(np.float32)


@pytest.mark.parametrize("backend", ["jax", "numba_cpu"])
@pytest.mark.parametrize("name,params,inputs,what", [
    ("ridge", {"lam": [-1.0, 1.0]}, {}, "parameter 'lam'"),
    ("ridge", {"lam": [0.0, 1.0]}, {}, "parameter 'lam'"),
    ("delta", {}, {"beta": 1.5}, "input 'beta'"),
    ("delta", {}, {"beta": -0.1}, "input 'beta'"),
])
def test_out_of_domain_values_are_refused(backend, name, params, inputs, what):
    m = load_generated(name, backend)
    q = _q()
    ps = {n: np.asarray(x, np.float32) for n, x in params.items()}
    ins = {n: np.full((B, T, H), x, np.float32) for n, x in inputs.items()}
    with pytest.raises(ValueError, match=f"{name}: {what} has values outside its domain"):
        m.forward(q, q, q, ps, **ins)


def test_domain_is_not_checked_on_traced_values_and_nonfinite_passes():
    m = load_generated("delta")
    q = _q()
    beta = np.full((B, T, H), 0.5, np.float32)
    o = jax.jit(lambda b: m.forward(q, q, q, {}, beta=b)[0])(beta)
    assert o.shape == (B, T, H, K)
    beta[0, 2, 0] = np.nan  # non-finite values follow the causality rule, not the domain check
    o = m.forward(q, q, q, {}, beta=beta)[0]
    assert bool(jnp.all(jnp.isfinite(o[:, :2])))


def test_wrong_number_of_axes_names_the_expected_layout():
    m = load_generated("ridge")
    q = _q()
    lam = {"lam": np.ones(H, np.float32)}
    with pytest.raises(ValueError, match=r"forward expects q, k \[B, T, H, K\] \(4 axes\); got q with 3 axes"):
        m.forward(q[0], q[0], q[0], lam)
    st = m.init_state(B, H, K, K, lam)
    with pytest.raises(ValueError, match=r"step expects q_t, k_t \[B, H, K\] \(3 axes\); got q with 4 axes"):
        m.step(st, q, q, q, lam)


def test_initial_state_must_be_a_state():
    m = load_generated("ridge")
    q = _q()
    with pytest.raises(ValueError, match=r"initial_state must be a State\('S', 'P'\).*got dict"):
        m.forward(q, q, q, {"lam": np.ones(H, np.float32)}, initial_state={"S": 0, "P": 0})

"""Tests of mesagen.reference against each other and against math identities (docs/contract.md §16).

Sizes are small distinct primes so a transposed axis cannot go unnoticed: B=2, T=7, H=2, K=3, V=5.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mesagen import reference as ref

B, T, H, K, V = 2, 7, 2, 3, 5
LAM = np.array([0.7, 1.9])
ETA = np.array([0.11, 0.23])


def close(a, b, rtol=1e-10):
    """Assert ``a == b`` up to ``rtol`` relative to the largest entry of ``b`` (and shapes equal)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(np.max(np.abs(b)), 1e-300)
    err = np.max(np.abs(a - b)) / scale
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


@pytest.fixture
def data():
    rng = np.random.default_rng(20230911)
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    v = rng.standard_normal((B, T, H, V))
    beta = rng.uniform(0.05, 0.9, (B, T, H))
    return q, k, v, beta


# every layer as f(q, k, v, beta, initial_state) -> (o, state)
LAYERS = {
    "linear": lambda q, k, v, beta, s=None: ref.linear(q, k, v, ETA, initial_state=s),
    "gd3": lambda q, k, v, beta, s=None: ref.gd(q, k, v, ETA, steps=3, initial_state=s),
    "delta": lambda q, k, v, beta, s=None: ref.delta(q, k, v, beta, initial_state=s),
    "ridge": lambda q, k, v, beta, s=None: ref.ridge(q, k, v, LAM, initial_state=s),
}


# ---------------------------------------------------------------------------------------------------- ridge
def test_ridge_matches_lstsq(data):
    q, k, v, _ = data
    o, st = ref.ridge(q, k, v, LAM)
    o2, st2 = ref.ridge_lstsq(q, k, v, LAM)
    close(o, o2)
    close(st["S"], st2["S"])
    assert np.max(np.abs(o)) > 0.1                       # not trivially zero


def test_ridge_stationarity_at_every_t(data):
    q, k, v, _ = data
    for t in range(T):
        _, st = ref.ridge(q[:, : t + 1], k[:, : t + 1], v[:, : t + 1], LAM)
        for b, h in itertools.product(range(B), range(H)):
            W = st["S"][b, h].T                                                   # (V, K)
            Kt, Vt = k[b, : t + 1, h], v[b, : t + 1, h]                           # (t+1, K), (t+1, V)
            resid = (Vt - Kt @ W.T).T @ Kt - LAM[h] * W                           # sum (v - W k) k^T - lam W
            assert np.max(np.abs(resid)) < 1e-12 * max(1.0, np.max(np.abs(Vt.T @ Kt)))
            # P is the inverse of the regularised Gram matrix of tokens 0..t
            close(st["P"][b, h] @ (Kt.T @ Kt + LAM[h] * np.eye(K)), np.eye(K))
        # the readout at position t uses this W_t
        o, _ = ref.ridge(q, k, v, LAM)
        close(o[:, t], np.einsum("bhkv,bhk->bhv", st["S"], q[:, t]))


def test_ridge_grad_of_objective_vanishes_by_finite_differences(data):
    q, k, v, _ = data
    _, st = ref.ridge(q, k, v, LAM)
    b, h = 1, 0
    Kt, Vt = k[b, :, h], v[b, :, h]

    def objective(W):
        return 0.5 * np.sum((Vt - Kt @ W.T) ** 2) + 0.5 * LAM[h] * np.sum(W ** 2)

    W = st["S"][b, h].T
    assert np.max(np.abs(ref.finite_difference_grad(objective, W))) < 1e-7
    # and it is a minimum that a perturbation can see
    assert np.max(np.abs(ref.finite_difference_grad(objective, W + 0.1))) > 1e-2


def test_ridge_invariant_to_permuting_past_pairs(data):
    q, k, v, _ = data
    o, st = ref.ridge(q, k, v, LAM)
    perm = np.array([3, 0, 6, 1, 5, 2, 4])
    o_p, st_p = ref.ridge(q, k[:, perm], v[:, perm], LAM)      # queries stay in place
    close(o_p[:, -1], o[:, -1])                                  # the last readout sees the same set of pairs
    close(st_p["S"], st["S"])
    close(st_p["P"], st["P"])
    assert np.max(np.abs(o_p[:, 0] - o[:, 0])) > 1e-3           # an earlier readout sees a different set


def test_ridge_shrinks_with_lam(data):
    q, k, v, _ = data
    o_small, _ = ref.ridge(q, k, v, 1e-3)
    o_big, _ = ref.ridge(q, k, v, 1e6)
    assert np.max(np.abs(o_big)) < 1e-4 * np.max(np.abs(o_small))


def test_ridge_default_state_is_zero_and_identity_over_lam(data):
    q, k, v, _ = data
    s0 = {"S": np.zeros((B, H, K, V)), "P": np.broadcast_to(np.eye(K) / LAM[:, None, None], (B, H, K, K))}
    o, st = ref.ridge(q, k, v, LAM)
    o2, st2 = ref.ridge(q, k, v, LAM, initial_state=s0)
    close(o2, o)
    close(st2["P"], st["P"])
    _, st_empty = ref.ridge(q[:, :0], k[:, :0], v[:, :0], LAM)
    close(st_empty["P"], s0["P"])


# ---------------------------------------------------------------------------------------------------- linear / gd
def test_linear_equals_one_gd_step(data):
    q, k, v, _ = data
    o, st = ref.linear(q, k, v, ETA)
    o_gd, st_gd = ref.gd(q, k, v, ETA, steps=1)
    close(o, o_gd)
    close(st["kv"], st_gd["kv"])


def test_linear_explicit_sum(data):
    q, k, v, _ = data
    o, _ = ref.linear(q, k, v, ETA)
    b, t, h = 1, 4, 1
    want = ETA[h] * sum(v[b, i, h] * (k[b, i, h] @ q[b, t, h]) for i in range(t + 1))
    close(o[b, t, h], want)


def test_gd_three_steps_equals_explicit_loop(data):
    q, k, v, _ = data
    o, st = ref.gd(q, k, v, ETA, steps=3)
    for b, t, h in itertools.product(range(B), range(T), range(H)):
        W = np.zeros((V, K))
        for _ in range(3):   # W <- W - eta * grad, grad = -sum_i (v_i - W k_i) k_i^T, summed pair by pair
            grad = -sum(np.outer(v[b, i, h] - W @ k[b, i, h], k[b, i, h]) for i in range(t + 1))
            W = W - ETA[h] * grad
        close(o[b, t, h], W @ q[b, t, h])
    close(st["kk"], np.einsum("bthk,bthj->bhkj", k, k))
    close(st["kv"], np.einsum("bthk,bthv->bhkv", k, v))


def test_gd_many_steps_approaches_ridge_limit():
    # well-conditioned keys: GD from 0 converges to the least-squares fit C A^{-1} = ridge as lam -> 0
    rng = np.random.default_rng(5)
    k = np.eye(K)[None, :, None, :] + 0.1 * rng.standard_normal((1, K, 1, K))
    v = rng.standard_normal((1, K, 1, V))
    q = rng.standard_normal((1, K, 1, K))
    o_gd, _ = ref.gd(q, k, v, 0.5, steps=400)
    o_r, _ = ref.ridge(q, k, v, 1e-13)
    close(o_gd[:, -1], o_r[:, -1], rtol=1e-8)


def test_gd_zero_steps_is_zero(data):
    q, k, v, _ = data
    o, _ = ref.gd(q, k, v, ETA, steps=0)
    assert np.all(o == 0)


# ---------------------------------------------------------------------------------------------------- delta
def test_delta_hand_computed_steps():
    # B = H = 1, K = 2, V = 1.
    q = np.array([[1.0, 1.0], [2.0, -1.0]]).reshape(1, 2, 1, 2)
    k = np.array([[1.0, 0.0], [1.0, 1.0]]).reshape(1, 2, 1, 2)
    v = np.array([2.0, 3.0]).reshape(1, 2, 1, 1)
    beta = np.array([0.5, 0.25]).reshape(1, 2, 1)
    o, st = ref.delta(q, k, v, beta)
    # t=0: W = 0 + 0.5 * (2 - 0) * [1, 0] = [1, 0];            o_0 = [1, 0] . [1, 1] = 1
    # t=1: err = 3 - [1, 0] . [1, 1] = 2; W = [1, 0] + 0.25 * 2 * [1, 1] = [1.5, 0.5]; o_1 = 3 - 0.5 = 2.5
    np.testing.assert_allclose(o.ravel(), [1.0, 2.5], rtol=0, atol=1e-15)
    np.testing.assert_allclose(st["S"].reshape(2), [1.5, 0.5], rtol=0, atol=1e-15)


def test_delta_unit_step_on_unit_key_interpolates(data):
    q, k, v, _ = data
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    _, st = ref.delta(q, k, v, np.ones((B, T, H)))
    close(np.einsum("bhkv,bhk->bhv", st["S"], k[:, -1]), v[:, -1])   # W_T k_T = v_T exactly


def test_delta_zero_beta_keeps_state(data):
    q, k, v, _ = data
    s0 = {"S": np.random.default_rng(1).standard_normal((B, H, K, V))}
    o, st = ref.delta(q, k, v, np.zeros((B, T, H)), initial_state=s0)
    close(st["S"], s0["S"])
    close(o, np.einsum("bhkv,bthk->bthv", s0["S"], q))


# ---------------------------------------------------------------------------------------------------- all layers
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_continuation_equals_one_pass(name, data):
    q, k, v, beta = data
    f = LAYERS[name]
    o, st = f(q, k, v, beta)
    for t in range(T + 1):
        o1, st1 = f(q[:, :t], k[:, :t], v[:, :t], beta[:, :t])
        o2, st2 = f(q[:, t:], k[:, t:], v[:, t:], beta[:, t:], st1)
        close(np.concatenate([o1, o2], axis=1), o)
        assert st2.keys() == st.keys()
        for key in st:
            close(st2[key], st[key])


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_batch_and_heads_are_independent(name, data):
    q, k, v, beta = data
    o, _ = LAYERS[name](q, k, v, beta)
    o_b, _ = LAYERS[name](q[1:], k[1:], v[1:], beta[1:])
    close(o_b, o[1:])
    assert o.dtype == np.float64 and o.shape == (B, T, H, V)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_inputs_not_modified(name, data):
    q, k, v, beta = data
    copies = [x.copy() for x in data]
    _, st = LAYERS[name](q, k, v, beta)
    st_copy = {key: val.copy() for key, val in st.items()}
    LAYERS[name](q, k, v, beta, st)
    for x, c in zip(data, copies):
        assert np.array_equal(x, c)
    for key in st:
        assert np.array_equal(st[key], st_copy[key])


# ---------------------------------------------------------------------------------------------------- validation
def test_validation_errors(data):
    q, k, v, beta = data
    with pytest.raises(ValueError, match="lam"):
        ref.ridge(q, k, v, np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="lam"):
        ref.ridge_lstsq(q, k, v, -1.0)
    with pytest.raises(ValueError, match="4 axes"):
        ref.linear(q[0], k[0], v[0], ETA)
    with pytest.raises(ValueError, match="same shape"):
        ref.gd(q[..., :2], k, v, ETA, steps=1)
    with pytest.raises(ValueError, match="leading axes"):
        ref.delta(q, k, v[:, :3], beta)
    with pytest.raises(ValueError, match="beta"):
        ref.delta(q, k, v, beta[:, :, :1])
    with pytest.raises(ValueError, match="eta"):
        ref.linear(q, k, v, np.ones(3))
    with pytest.raises(ValueError, match="steps"):
        ref.gd(q, k, v, ETA, steps=-1)
    with pytest.raises(ValueError, match="keys"):
        ref.ridge(q, k, v, LAM, initial_state={"S": np.zeros((B, H, K, V))})
    with pytest.raises(ValueError, match="P"):
        ref.ridge(q, k, v, LAM, initial_state={"S": np.zeros((B, H, K, V)), "P": np.zeros((B, H, V, V))})
    with pytest.raises(ValueError, match="eps"):
        ref.finite_difference_grad(np.sum, q, eps=0.0)


# ---------------------------------------------------------------------------------------------------- finite differences
def test_finite_difference_grad_on_known_function():
    x = np.random.default_rng(3).standard_normal((2, 3))
    g = ref.finite_difference_grad(lambda y: np.sum(np.sin(y) * y ** 2), x)
    close(g, np.cos(x) * x ** 2 + 2 * x * np.sin(x), rtol=1e-8)
    assert np.array_equal(x, np.random.default_rng(3).standard_normal((2, 3)))   # x untouched

"""Float32 / float64 accuracy of the exact ridge (mesa) layer against an explicit-solve float64 reference.

The documented bound (docs/numerics.md): with κ = max_t cond(Σ_{i≤t} k_i k_iᵀ + λI), the recurrent form's
outputs and every gradient (q, k, v, λ) are within ``BOUND · κ · ε`` of the exact values, relative to the
largest magnitude of each, for T from 1 to 4096 (ε the dtype's machine epsilon). The stress grid spans
λ ∈ {1e2, 1, 1e-2, 1e-4}, key columns scaled geometrically over 1..1e3 or not, and T ∈ {1, 256, 4096};
cases with κ above ``KAPPA_MAX`` are outside the range where float32 (or the float64 reference itself) can
be accurate, and only finiteness is asserted for them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BOUND = 20.0
KAPPA_MAX = 1e6  # the float64 reference's own error stays ≲ κ·ε64 ≈ 2e-10 below this


def _direct(q, k, v, lam):
    """Independent float64 ridge: o_t = C_t (A_t)⁻¹ q_t with an explicit solve per t (plain autodiff)."""
    Kd = q.shape[-1]
    A = jnp.cumsum(jnp.einsum("bthk,bthj->bthkj", k, k), axis=1) + lam[None, None, :, None, None] * jnp.eye(Kd)
    C = jnp.cumsum(jnp.einsum("bthv,bthk->bthvk", v, k), axis=1)
    x = jnp.linalg.solve(A, q[..., None])[..., 0]
    return jnp.einsum("bthvk,bthk->bthv", C, x)


def _dlam_scale(q, k, lam, dq):
    """Σ_{b,t} |y_tᵀ x_t|: the magnitude of the terms whose sum is dλ = −Σ_{b,t} y_tᵀ x_t (x_t = A_t⁻¹ q_t,
    y_t = W_tᵀ ḡ_t = ∂q_t), float64. dλ is a sum over every position and batch element, and its terms cancel
    (e.g. |dλ| = 2.2e-4 from terms of total size 4e-2 at λ = 1e2, T = 256): rounding each term to float32
    alone makes an error of order ε · Σ|terms|, however the sum is taken, so the bound is stated relative to
    this scale (the standard error bound of a sum), not to |dλ|."""
    K = q.shape[-1]
    A = np.cumsum(np.einsum("bthk,bthj->bthkj", k, k), axis=1) + lam * np.eye(K)
    x = np.linalg.solve(A, q[..., None])[..., 0]
    return float(np.sum(np.abs(np.einsum("bthk,bthk->bth", dq, x))))


def _rel(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float64) - b)) / jnp.max(jnp.abs(b)))


def _stress_data(lam, T, spread, seed=0):
    """B=2, H=1, K=V=8; randn keys whose columns are scaled geometrically over 1..spread (as the JAX grid)."""
    rng = np.random.default_rng(seed)
    B, H, K, V = 2, 1, 8, 8
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K)) * np.logspace(0, np.log10(spread), K)
    v = rng.standard_normal((B, T, H, V))
    w = rng.standard_normal((B, T, H, V)) / np.sqrt(T)
    A = np.cumsum(np.einsum("btk,btj->btkj", k[:, :, 0], k[:, :, 0]), axis=1) + lam * np.eye(K)
    return q, k, v, w, np.full((H,), lam), float(np.max(np.linalg.cond(A)))


def _case(m, lam, T, spread, dtype, form="recurrent", seed=0):
    """(κ, errors of o, dq, dk, dv, dλ) for one stress point; B=2, H=1, K=V=8, randn keys. Errors are relative to
    the largest magnitude of each array, and for dλ to the size of the terms it sums (_dlam_scale)."""
    q, k, v, w, lamv, kappa = _stress_data(lam, T, spread, seed)
    want_o = _direct(q, k, v, jnp.asarray(lamv))
    want = jax.grad(lambda *a: jnp.sum(w * _direct(*a)), argnums=(0, 1, 2, 3))(q, k, v, jnp.asarray(lamv))
    c = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    f = lambda *a: m.forward(*a[:3], {"lam": a[3]}, form=form)[0]  # noqa: E731
    o = f(c(q), c(k), c(v), c(lamv))
    got = jax.grad(lambda *a: jnp.sum(c(w) * f(*a)), argnums=(0, 1, 2, 3))(c(q), c(k), c(v), c(lamv))
    errs = [_rel(o, want_o)] + [_rel(g, r) for g, r in zip(got[:3], want[:3])]
    errs.append(float(jnp.max(jnp.abs(jnp.asarray(got[3], jnp.float64) - want[3])))
                / _dlam_scale(q, k, lam, np.asarray(want[0])))
    return kappa, errs, (o,) + tuple(got)


@pytest.mark.parametrize("seed", [0, 4])
@pytest.mark.parametrize("T", [1, 256, 4096])
@pytest.mark.parametrize("spread", [1.0, 1e3])
@pytest.mark.parametrize("lam", [1e2, 1.0, 1e-2, 1e-4])
def test_float32_recurrent_within_documented_bound(gen, x64, lam, spread, T, seed):
    kappa, errs, arrays = _case(gen["ridge"], lam, T, spread, jnp.float32, seed=seed)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in arrays)
    if kappa > KAPPA_MAX:
        return
    eps = float(jnp.finfo(jnp.float32).eps)
    for name, e in zip(("o", "dq", "dk", "dv", "dλ"), errs):
        assert e <= BOUND * kappa * eps, (name, e, kappa)


@pytest.mark.parametrize("lam,T", [(1e-2, 4096), (1e-4, 4096)])
def test_float32_issue_cases(gen, x64, lam, T):
    """The reported kind: dλ off by 0.28 at λ = 1e-2, T = 4096 (0.10 of its terms' scale here; 5e3 at λ = 1e-4):
    autodiff through the Sherman–Morrison steps amplified rounding by up to 1/λ², growing with T. Now within
    the bound. (λ = 1e-4 at T = 1 has κ = 4e4: ~1e-2 errors there are float32's conditioning, before and after;
    see docs/numerics.md.)"""
    kappa, errs, _ = _case(gen["ridge"], lam, T, 1.0, jnp.float32)
    assert errs[-1] <= BOUND * kappa * float(jnp.finfo(jnp.float32).eps), errs


def test_float64_small_lambda_time_scaled_keys(gen, x64):
    """README claim: at λ = 1e-3 with keys scaled over 1..1e3 along time and T = 1024, every gradient is within
    1e-6 of the explicit-solve reference (was 6.9e-5 for dλ)."""
    m = gen["ridge"]
    rng = np.random.default_rng(8)
    B, T, H, K, V = 2, 1024, 2, 3, 5
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K)) * np.logspace(0, 3, T)[None, :, None, None]
    v = rng.standard_normal((B, T, H, V))
    w = rng.standard_normal((B, T, H, V))
    lam = jnp.full((H,), 1e-3)
    got = jax.grad(lambda *a: jnp.sum(w * m.forward(*a[:3], {"lam": a[3]})[0]), argnums=(0, 1, 2, 3))(q, k, v, lam)
    want = jax.grad(lambda *a: jnp.sum(w * _direct(*a)), argnums=(0, 1, 2, 3))(q, k, v, lam)
    for g, r, n in zip(got, want, "qkvλ"):
        assert _rel(g, r) <= 1e-6, n


def test_final_state_is_refactorised_from_exact_statistics(gen, x64):
    """The final state is rebuilt from Σ v kᵀ and Σ k kᵀ + λI (Cholesky), so decoding after a long float32 prefill
    starts from P_T = A_T⁻¹ to within κ·ε, not from T accumulated rank-one updates."""
    m = gen["ridge"]
    rng = np.random.default_rng(3)
    B, T, H, K, V = 1, 2048, 1, 8, 8
    q, k, v = (rng.standard_normal((B, T, H, d)) for d in (K, K, V))
    lam = 1e-2
    _, st = m.forward(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), {"lam": jnp.full((H,), lam, jnp.float32)},
                      output_final_state=True)
    A = np.einsum("btk,btj->kj", k[:, :, 0], k[:, :, 0]) + lam * np.eye(K)
    P = np.linalg.inv(A)
    eps = float(jnp.finfo(jnp.float32).eps)
    assert _rel(st.P[0, 0], P) <= BOUND * np.linalg.cond(A) * eps
    S = P @ np.einsum("btk,btv->kv", k[:, :, 0], v[:, :, 0])
    assert _rel(st.S[0, 0], S) <= BOUND * np.linalg.cond(A) * eps

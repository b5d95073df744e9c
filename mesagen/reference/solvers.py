"""Hand-written numpy float64 ground truth for the layers of the exact and implicit solvers (spec language v2):
``implicit_delta``, ``rls_forgetting`` and ``mesanet`` (docs/family.md).

Written from the layers' *definitions*, importing nothing from the compiler, and computed differently from the
generated recursions:

- ``implicit_delta``: every token solves the proximal problem W_t = argmin ½‖W − W_{t−1}‖²_F + ½ β_t ‖v_t − W k_t‖²
  through its normal equations W_t (I + β_t k_t k_tᵀ) = W_{t−1} + β_t v_t k_tᵀ (``np.linalg.solve``), not
  through the derived step size ε_t.
- ``rls_forgetting``: every position solves the weighted ridge problem from explicit sums,
  W_t = C_t A_t⁻¹ with A_t = ω_{t,0} A_0 + Σ_{i≤t} ω_{t,i} k_i k_iᵀ, C_t = ω_{t,0} C_0 + Σ ω_{t,i} v_i k_iᵀ,
  ω_{t,i} = exp(Σ_{i<j≤t} g_j), A_0 = λI (the regulariser decays with the data), C_0 = 0 by default.
- ``mesanet``: H_t = Σ ω_{t,i} β_i k_i k_iᵀ (+ ω_{t,0} H_0), G_t likewise with v_i k_iᵀ, and
  x_t = (H_t + Diag(λ))⁻¹ q_t by ``np.linalg.solve`` (``solve="exact"``) or by a plain conjugate-gradient loop
  (``solve="cg"``, the iteration counts returned), o_t = G_t x_t; q and k L2-normalised (x/√(Σx² + 1e-6)).

Layouts (fla): q, k [B, T, H, K]; v, o [B, T, H, V]; per-token inputs [B, T, H]; λ [H] or [H, K]; states
[B, H, ...] in the generated modules' field names (S = Wᵀ [K, V], P = A⁻¹ [K, K]; kv = Gᵀ [K, V], kk = H [K, K]).
Gradients of the generated layers are checked against central finite differences of these functions
(:func:`mesagen.reference.finite_difference_grad`).
"""

from __future__ import annotations

import numpy as np

State = dict


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def implicit_delta(q, k, v, beta, *, initial_state: State | None = None) -> tuple[np.ndarray, State]:
    """The exact proximal delta rule (no feature map, scale 1).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] > 0. float64.
        initial_state: {"S": [B, H, K, V]} or None (zeros).

    Returns:
        (o [B, T, H, V], {"S": [B, H, K, V]}).
    """
    q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = np.zeros((B, H, K, V)) if initial_state is None else np.array(initial_state["S"], np.float64)
    o = np.zeros((B, T, H, V))
    for b in range(B):
        for h in range(H):
            W = S[b, h].T.copy()
            for t in range(T):
                kk, bt = k[b, t, h], beta[b, t, h]
                W = np.linalg.solve(np.eye(K) + bt * np.outer(kk, kk), (W + bt * np.outer(v[b, t, h], kk)).T).T
                o[b, t, h] = W @ q[b, t, h]
            S[b, h] = W.T
    return o, {"S": S}


def _decays(g: np.ndarray, t: int) -> np.ndarray:
    """ω_{t,i} for i = −1..t (index 0 of the result is ω_{t,0}, the weight of the initial statistics): segment
    sums of the log gates, exponentiated."""
    return np.exp(np.array([np.sum(g[i + 1: t + 1]) for i in range(-1, t + 1)]))


def rls_forgetting(q, k, v, g, lam, *, initial_state: State | None = None) -> tuple[np.ndarray, State]:
    """Exponentially weighted ridge with a regulariser that decays with the data (RLS with forgetting).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] log gates ≤ 0; lam: [H] > 0. float64.
        initial_state: {"S": [B, H, K, V], "P": [B, H, K, K]} (S = (C₀ A₀⁻¹)ᵀ, P = A₀⁻¹) or None
            (S = 0, P = I/λ).

    Returns:
        (o [B, T, H, V], {"S", "P"}) of the last position.
    """
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    lam = np.asarray(lam, np.float64)
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = np.zeros((B, T, H, V))
    S_out, P_out = np.zeros((B, H, K, V)), np.zeros((B, H, K, K))
    for b in range(B):
        for h in range(H):
            if initial_state is None:
                A0, C0 = lam[h] * np.eye(K), np.zeros((V, K))
            else:
                A0 = np.linalg.inv(initial_state["P"][b, h])
                C0 = initial_state["S"][b, h].T @ A0
            A, C = A0, C0
            for t in range(T):
                w = _decays(g[b, :, h], t)
                A = w[0] * A0 + sum(w[i + 1] * np.outer(k[b, i, h], k[b, i, h]) for i in range(t + 1))
                C = w[0] * C0 + sum(w[i + 1] * np.outer(v[b, i, h], k[b, i, h]) for i in range(t + 1))
                o[b, t, h] = C @ np.linalg.solve(A, q[b, t, h])
            S_out[b, h] = np.linalg.solve(A, C.T)
            P_out[b, h] = np.linalg.inv(A)
    return o, {"S": S_out, "P": P_out}


def conjugate_gradient(A: np.ndarray, b: np.ndarray, max_iterations: int, tolerance: float
                       ) -> tuple[np.ndarray, int]:
    """Textbook conjugate gradient for a symmetric positive-definite A [K, K] and b [K] (Hestenes & Stiefel 1952),
    from the Jacobi guess x⁰ = b / diag(A), stopped once ‖b − A x‖₂ ≤ tolerance · ‖b‖₂ or after max_iterations.

    Returns:
        (x [K], the number of iterations run).
    """
    x = b / np.diag(A)
    r = b - A @ x
    p = r.copy()
    rs = r @ r
    stop = tolerance ** 2 * (b @ b)
    it = 0
    while it < max_iterations and rs > stop:
        Ap = A @ p
        a = rs / (p @ Ap)
        x, r = x + a * p, r - a * Ap
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
        it += 1
    return x, it


def mesanet(q, k, v, g, beta, lam, *, initial_state: State | None = None, solve: str = "exact",
            max_iterations: int = 30, tolerance: float = 1e-6, l2_normalize: bool = True
            ) -> tuple[np.ndarray, State, np.ndarray]:
    """MesaNet: decayed, importance-weighted running sums and a per-key-channel ridge coefficient.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] log gates ≤ 0; beta: [B, T, H] ≥ 0;
            lam: [H, K] (or [H]) > 0. float64.
        initial_state: {"kv": [B, H, K, V] (Gᵀ), "kk": [B, H, K, K] (H)} or None (zeros).
        solve: ``exact`` (np.linalg.solve) or ``cg`` (:func:`conjugate_gradient` with max_iterations, tolerance).
        l2_normalize: apply φ(x) = x/√(Σx² + 1e-6) to q and k (the shipped spec's feature map).

    Returns:
        (o [B, T, H, V], {"kv", "kk"}, iterations [B, T, H] of the CG solves (0 for ``exact``)).
    """
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    if l2_normalize:
        q, k = _l2n(q), _l2n(k)
    B, T, H, K = q.shape
    V = v.shape[-1]
    lam = np.broadcast_to(np.asarray(lam, np.float64).reshape(H, -1), (H, K))
    o = np.zeros((B, T, H, V))
    its = np.zeros((B, T, H), dtype=np.int64)
    kv, kk = np.zeros((B, H, K, V)), np.zeros((B, H, K, K))
    for b in range(B):
        for h in range(H):
            H0 = np.zeros((K, K)) if initial_state is None else np.asarray(initial_state["kk"][b, h], np.float64)
            G0 = np.zeros((V, K)) if initial_state is None else np.asarray(initial_state["kv"][b, h], np.float64).T
            Hs, G = H0, G0
            for t in range(T):
                w = _decays(g[b, :, h], t)
                Hs = w[0] * H0 + sum(w[i + 1] * beta[b, i, h] * np.outer(k[b, i, h], k[b, i, h]) for i in range(t + 1))
                G = w[0] * G0 + sum(w[i + 1] * beta[b, i, h] * np.outer(v[b, i, h], k[b, i, h]) for i in range(t + 1))
                A = Hs + np.diag(lam[h])
                if solve == "exact":
                    x = np.linalg.solve(A, q[b, t, h])
                else:
                    x, its[b, t, h] = conjugate_gradient(A, q[b, t, h], max_iterations, tolerance)
                o[b, t, h] = G @ x
            kv[b, h], kk[b, h] = G.T, Hs
    return o, {"kv": kv, "kk": kk}, its

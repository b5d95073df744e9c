"""Hand-written numpy float64 ground truth for the shipped layers (docs/family.md §4).

Written from the math, not from any derivation in mesagen: explicit loops over batch, head and time, explicit
sums and explicit solves. Layouts are fla-compatible: ``q, k: [B, T, H, K]``, ``v, o: [B, T, H, V]``,
per-token inputs ``[B, T, H]``, per-head parameters ``[H]``. Per head the fast weight ``W`` is ``V x K``;
states store its transpose ``S = W^T`` (``[B, H, K, V]``). Position ``t`` sees tokens ``0..t`` inclusive:
``o_t`` is read after the update with token ``t``. Every layer returns ``(o, final_state)``; feeding
``final_state`` back as ``initial_state`` continues the sequence exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from mesagen.reference import _checks

State = Mapping[str, Any]


def linear(q, k, v, eta, initial_state: State | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Linear self-attention = one GD step from ``W = 0`` (docs/family.md §5.1 ``linear``; paper eq. for LSA).

    ``o_t = eta * sum_{i<=t} v_i (k_i^T q_t)``, computed as causally masked attention
    ``eta * tril(Q K^T) V`` (plus ``eta * q_t^T kv0`` for a given initial state).

    Args:
        q: queries, float, shape ``(batch, time, heads, d_k)``.
        k: keys, float, shape ``(batch, time, heads, d_k)``.
        v: values, float, shape ``(batch, time, heads, d_v)``.
        eta: step size per head, shape ``(heads,)`` (a scalar is broadcast).
        initial_state: ``{"kv": (batch, heads, d_k, d_v)}`` holding ``sum k_i v_i^T`` of earlier tokens;
            ``None`` means zeros.

    Returns:
        ``(o, {"kv": ...})``: float64 output ``(batch, time, heads, d_v)`` and the running sum
        ``kv0 + sum_i k_i v_i^T``, ``(batch, heads, d_k, d_v)``.

    Raises:
        ValueError: wrong number of axes, mismatched shapes, or a malformed state/parameter.
    """
    q, k, v = _checks.qkv(q, k, v)
    B, T, H, K = k.shape
    V = v.shape[3]
    eta = _checks.per_head("eta", eta, H)
    st = _checks.state(initial_state, {"kv": (B, H, K, V)}, {"kv": np.zeros((B, H, K, V))})
    o = np.zeros((B, T, H, V))
    kv = np.zeros((B, H, K, V))
    for b in range(B):
        for h in range(H):
            Q, Km, Vm = q[b, :, h, :], k[b, :, h, :], v[b, :, h, :]      # (T, K), (T, K), (T, V)
            scores = np.tril(Q @ Km.T)                                    # (T, T), entry [t, i] = k_i^T q_t
            o[b, :, h, :] = eta[h] * (scores @ Vm + Q @ st["kv"][b, h])
            kv[b, h] = st["kv"][b, h] + Km.T @ Vm
    return o, {"kv": kv}


def gd(q, k, v, eta, *, steps: int, initial_state: State | None = None
       ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``steps`` steps of full-batch gradient descent from ``W = 0`` (docs/family.md §6.1 ``gd``).

    Loss ``L_t(W) = 1/2 sum_{i<=t} ||v_i - W k_i||^2``; with ``C_t = sum v_i k_i^T`` (V x K) and
    ``A_t = sum k_i k_i^T`` (K x K) each step is ``W <- W + eta (C_t - W A_t)``; ``o_t = W_t^(steps) q_t``.

    Args:
        q: queries, float, shape ``(batch, time, heads, d_k)``.
        k: keys, float, shape ``(batch, time, heads, d_k)``.
        v: values, float, shape ``(batch, time, heads, d_v)``.
        eta: step size per head, shape ``(heads,)`` (a scalar is broadcast).
        steps: number of GD steps, a non-negative int (0 gives ``o = 0``).
        initial_state: ``{"kv": (batch, heads, d_k, d_v) = C^T, "kk": (batch, heads, d_k, d_k) = A}`` of
            earlier tokens; the sums start from it. ``None`` means zeros. GD always restarts from ``W = 0``.

    Returns:
        ``(o, {"kv": C_T^T, "kk": A_T})`` in float64; ``o`` is ``(batch, time, heads, d_v)``.

    Raises:
        ValueError: wrong number of axes, mismatched shapes, bad ``steps``, or a malformed state/parameter.
    """
    q, k, v = _checks.qkv(q, k, v)
    B, T, H, K = k.shape
    V = v.shape[3]
    eta = _checks.per_head("eta", eta, H)
    steps = _checks.steps_count(steps)
    st = _checks.state(initial_state, {"kv": (B, H, K, V), "kk": (B, H, K, K)},
                       {"kv": np.zeros((B, H, K, V)), "kk": np.zeros((B, H, K, K))})
    o = np.zeros((B, T, H, V))
    kv = np.zeros((B, H, K, V))
    kk = np.zeros((B, H, K, K))
    for b in range(B):
        for h in range(H):
            C = st["kv"][b, h].T.copy()                                   # (V, K)
            A = st["kk"][b, h].copy()                                     # (K, K)
            for t in range(T):
                C += np.outer(v[b, t, h], k[b, t, h])
                A += np.outer(k[b, t, h], k[b, t, h])
                W = np.zeros((V, K))
                for _ in range(steps):
                    W = W + eta[h] * (C - W @ A)
                o[b, t, h] = W @ q[b, t, h]
            kv[b, h], kk[b, h] = C.T, A
    return o, {"kv": kv, "kk": kk}


def delta(q, k, v, beta, initial_state: State | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Online GD / DeltaNet / LMS (docs/family.md §7.1 ``delta``).

    ``W_t = W_{t-1} + beta_t (v_t - W_{t-1} k_t) k_t^T``, ``o_t = W_t q_t``, ``W_{-1} = S0^T`` (default 0).

    Args:
        q: queries, float, shape ``(batch, time, heads, d_k)``.
        k: keys, float, shape ``(batch, time, heads, d_k)``.
        v: values, float, shape ``(batch, time, heads, d_v)``.
        beta: per-token step size, shape ``(batch, time, heads)``.
        initial_state: ``{"S": (batch, heads, d_k, d_v) = W^T}``; ``None`` means zeros.

    Returns:
        ``(o, {"S": W_T^T})`` in float64; ``o`` is ``(batch, time, heads, d_v)``.

    Raises:
        ValueError: wrong number of axes, mismatched shapes, or a malformed state/input.
    """
    q, k, v = _checks.qkv(q, k, v)
    B, T, H, K = k.shape
    V = v.shape[3]
    beta = _checks.per_token("beta", beta, (B, T, H))
    st = _checks.state(initial_state, {"S": (B, H, K, V)}, {"S": np.zeros((B, H, K, V))})
    o = np.zeros((B, T, H, V))
    S = np.zeros((B, H, K, V))
    for b in range(B):
        for h in range(H):
            W = st["S"][b, h].T.copy()                                    # (V, K)
            for t in range(T):
                err = v[b, t, h] - W @ k[b, t, h]                         # (V,)
                W = W + beta[b, t, h] * np.outer(err, k[b, t, h])
                o[b, t, h] = W @ q[b, t, h]
            S[b, h] = W.T
    return o, {"S": S}


def ridge(q, k, v, lam, initial_state: State | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The mesa layer: ridge regression solved exactly at every step (docs/family.md §8.1 ``ridge``; paper eq. 4-5).

    ``W_t = argmin_W 1/2 sum_{i<=t} ||v_i - W k_i||^2 + 1/2 lam ||W||_F^2 = C_t A_t^{-1}`` with
    ``C_t = C_0 + sum v_i k_i^T`` and ``A_t = A_0 + sum k_i k_i^T``; ``o_t = W_t q_t``. Each ``W_t`` comes from
    an explicit ``np.linalg.solve`` (no Sherman-Morrison recursion).

    Args:
        q: queries, float, shape ``(batch, time, heads, d_k)``.
        k: keys, float, shape ``(batch, time, heads, d_k)``.
        v: values, float, shape ``(batch, time, heads, d_v)``.
        lam: ridge coefficient per head, shape ``(heads,)`` (a scalar is broadcast), every entry ``> 0``.
        initial_state: ``{"S": (batch, heads, d_k, d_v) = W^T, "P": (batch, heads, d_k, d_k) = A^{-1}}``.
            ``None`` means ``S = 0, P = I / lam`` (i.e. ``A_0 = lam I, C_0 = 0``). Otherwise
            ``A_0 = P^{-1}`` (which already contains the ridge term, so ``lam`` is only validated) and
            ``C_0 = S^T P^{-1}``.

    Returns:
        ``(o, {"S": W_T^T, "P": A_T^{-1}})`` in float64 where ``A_T`` includes every token ``0..T-1``;
        ``o`` is ``(batch, time, heads, d_v)``.

    Raises:
        ValueError: wrong number of axes, mismatched shapes, ``lam <= 0``, or a malformed state.
        numpy.linalg.LinAlgError: a given ``P`` (or a later ``A_t``) is singular.
    """
    q, k, v = _checks.qkv(q, k, v)
    B, T, H, K = k.shape
    V = v.shape[3]
    lam = _checks.per_head("lam", lam, H, positive=True)
    eye = np.eye(K)
    st = _checks.state(initial_state, {"S": (B, H, K, V), "P": (B, H, K, K)},
                       {"S": np.zeros((B, H, K, V)),
                        "P": np.broadcast_to(eye[None, None] / lam[None, :, None, None], (B, H, K, K))})
    o = np.zeros((B, T, H, V))
    S_out = np.zeros((B, H, K, V))
    P_out = np.zeros((B, H, K, K))
    for b in range(B):
        for h in range(H):
            P0, S0 = st["P"][b, h], st["S"][b, h]
            if initial_state is None:
                A, CT = lam[h] * eye, np.zeros((K, V))                    # A_0 = lam I, C_0^T = 0
            else:
                A = np.linalg.solve(P0, eye)                              # A_0 = P0^{-1}
                CT = np.linalg.solve(P0.T, S0)                            # C_0^T = (S0^T P0^{-1})^T
            S, P = S0, P0                                                 # T == 0: state passes through
            for t in range(T):
                A = A + np.outer(k[b, t, h], k[b, t, h])                  # (K, K)
                CT = CT + np.outer(k[b, t, h], v[b, t, h])                # (K, V) = C_t^T
                S = np.linalg.solve(A.T, CT)                              # W_t^T = A_t^{-T} C_t^T
                o[b, t, h] = S.T @ q[b, t, h]
            if T > 0:
                P = np.linalg.solve(A, eye)                               # A_T^{-1}
            S_out[b, h], P_out[b, h] = S, P
    return o, {"S": S_out, "P": P_out}


def ridge_lstsq(q, k, v, lam) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The mesa layer again, as an augmented least-squares problem per step (cross-check of :func:`ridge`).

    For each ``t``, ``W_t^T = argmin_S || [K_{0..t}; sqrt(lam) I] S - [V_{0..t}; 0] ||_F^2`` by
    ``np.linalg.lstsq``, which is the same objective as :func:`ridge` (docs/family.md §8.1) without forming ``A_t``.
    Always starts from the empty context (no initial state).

    Args:
        q: queries, float, shape ``(batch, time, heads, d_k)``.
        k: keys, float, shape ``(batch, time, heads, d_k)``.
        v: values, float, shape ``(batch, time, heads, d_v)``.
        lam: ridge coefficient per head, shape ``(heads,)`` (a scalar is broadcast), every entry ``> 0``.

    Returns:
        ``(o, {"S": W_T^T})`` in float64; ``o`` is ``(batch, time, heads, d_v)``.

    Raises:
        ValueError: wrong number of axes, mismatched shapes, or ``lam <= 0``.
    """
    q, k, v = _checks.qkv(q, k, v)
    B, T, H, K = k.shape
    V = v.shape[3]
    lam = _checks.per_head("lam", lam, H, positive=True)
    o = np.zeros((B, T, H, V))
    S_out = np.zeros((B, H, K, V))
    for b in range(B):
        for h in range(H):
            for t in range(T):
                M = np.vstack([k[b, : t + 1, h], np.sqrt(lam[h]) * np.eye(K)])   # (t+1+K, K)
                R = np.vstack([v[b, : t + 1, h], np.zeros((K, V))])             # (t+1+K, V)
                S = np.linalg.lstsq(M, R, rcond=None)[0]                        # (K, V) = W_t^T
                o[b, t, h] = S.T @ q[b, t, h]
                S_out[b, h] = S
    return o, {"S": S_out}


def finite_difference_grad(f: Callable[[np.ndarray], float], x, eps: float = 1e-6) -> np.ndarray:
    """Central finite-difference gradient ``(f(x + eps e_j) - f(x - eps e_j)) / (2 eps)`` for every entry.

    Args:
        f: scalar function of one float64 array shaped like ``x``.
        x: the point, any shape; copied to float64 (never modified).
        eps: the step, ``> 0``.

    Returns:
        float64 array shaped like ``x``. Error is ``O(eps^2)`` truncation plus ``O(ulp(f) / eps)`` round-off.

    Raises:
        ValueError: ``eps <= 0`` or ``x`` not real numeric.
    """
    if not eps > 0:
        raise ValueError(f"eps: must be > 0, got {eps!r}")
    x = _checks.as_float64("x", x)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        grad[idx] = (float(f(xp)) - float(f(xm))) / (2.0 * eps)
    return grad

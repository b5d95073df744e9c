"""The chunked (WY / UT) form of the delta-rule family: which solvers have one, their per-token effective step,
and the chunk identity written out in numpy for the verification.

A delta-rule recurrence (decay first, as fla; W = Sᵀ ∈ R^{V×K} per head)

    W' = W_{t−1} Diag(α_t)  (or α_t W_{t−1}),   W_t = W' + ε_t (v_t − W' k_t) k_tᵀ,   o_t = W_t q_t

is determined by one scalar per token, the *effective step* ε_t: ε_t = β_t for online GD (the delta rule,
gated delta rule, KDA). :data:`EFFECTIVE_STEPS` maps a solver kind to it, so another solver with the same
recurrence supplies only its own ε (an implicit delta step: ε_t = β_t / (1 + β_t k_tᵀ k_t)).

The chunk identity (Yang et al. 2024, "Parallelizing linear transformers with the delta rule over sequence
length", Sec. 3, the WY / UT representation; gated: Yang et al. 2025, "Gated Delta Networks"; per key channel as
in KDA). For a chunk entering with W₀, with b_t = Σ_{start≤j≤t} log α_j (cumulative *within* the chunk) and
Γ_t = Diag(exp(b_t)), the state after token t is W_t = W₀ Γ_t + Σ_{i≤t} u_i (Γ_t Γ_i⁻¹ k_i)ᵀ, where the
pseudo-values u_t = ε_t (v_t − W' k_t) solve

    u_t + ε_t Σ_{i<t} (k_iᵀ Γ_t Γ_i⁻¹ k_t) u_i = ε_t (v_t − W₀ Γ_t k_t),

a unit lower-triangular system (I + A) U = diag(ε) (V − K̃ W₀ᵀ); then
o_t = W₀ Γ_t q_t + Σ_{i≤t} (k_iᵀ Γ_t Γ_i⁻¹ q_t) u_i and W_end = W₀ Γ_end + Σ_i u_i (Γ_end Γ_i⁻¹ k_i)ᵀ.
Every decay Γ_t Γ_i⁻¹ (i ≤ t) is exp of a number ≤ 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import sympy as sp

from mesagen.ir.records import Assign, DeltaChunkForm

if TYPE_CHECKING:
    from mesagen.symbolic.rules import Pieces

#: solver kind → the effective step ε_t of its delta-rule recurrence, from the rule's pieces (a scalar or 1 × 1
#: expression in the step size's symbol and the key ``pieces.tok.k``). A solver listed here gets the chunked form
#: when :func:`delta_chunk_form`'s other conditions hold; verify checks the chunk identity against its recursion.
EFFECTIVE_STEPS: dict[str, Callable[["Pieces"], sp.Basic]] = {
    "online_gd": lambda pc: pc.step,
}


def delta_chunk_form(pc: "Pieces") -> DeltaChunkForm | None:
    """The chunked form of a delta-rule solver, or None where the layer has none.

    Offered when the solver kind has an entry in :data:`EFFECTIVE_STEPS`, the step size is one scalar per token
    and head (an input [batch, time, heads] or a parameter [heads]; a per-value-channel step size makes each
    value channel its own triangular system: not generated), and there is no regulariser (weight decay
    −β λ W' is not a delta step on W'). Any forget gate: none, per head, per key channel, or a decay parameter.
    """
    kind = pc.spec.solver.kind
    if kind not in EFFECTIVE_STEPS or isinstance(pc.step, sp.MatrixSymbol) or pc.lam != 0:
        return None
    eps = EFFECTIVE_STEPS[kind](pc)
    expr = eps if isinstance(eps, sp.MatrixExpr) else eps * sp.Identity(1)
    return DeltaChunkForm((Assign("eps", expr, (1, 1), "effective step ε of the delta update"),))


def chunked_float(W0: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, eps: np.ndarray,
                  log_alpha: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """The chunk identity of the module docstring in float64 numpy, chunk by chunk (one head).

    Args:
        W0: the initial state W₀ [V, K].
        q, k: [T, K]; v: [T, V]; eps: the effective steps [T].
        log_alpha: log α_t, [T] (one gate per token) or [T, K] (per key channel); zeros without a gate.
        chunk: tokens per chunk (the last chunk may be shorter).

    Returns:
        (o [T, V], W_T [V, K]).
    """
    T, Kd = k.shape
    la = np.broadcast_to(log_alpha.reshape(T, -1), (T, Kd))
    W = np.array(W0, dtype=np.float64)
    out = np.zeros((T, v.shape[1]))
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        n = e - s
        b = np.cumsum(la[s:e], axis=0)                          # [n, K]: b_t
        kq, kk, kv, ke = q[s:e], k[s:e], v[s:e], eps[s:e]
        ratio = lambda t, i: np.exp(b[t] - b[i])                 # noqa: E731  diag of Γ_t Γ_i⁻¹, i ≤ t
        rhs = ke[:, None] * (kv - (W @ (np.exp(b) * kk).T).T)   # ε_t (v_t − W₀ Γ_t k_t)
        U = np.zeros_like(rhs)
        for t in range(n):                                      # forward substitution, unit diagonal
            U[t] = rhs[t] - ke[t] * sum((kk[i] * ratio(t, i)) @ kk[t] * U[i] for i in range(t))
        for t in range(n):
            out[s + t] = W @ (np.exp(b[t]) * kq[t]) + sum((kk[i] * ratio(t, i)) @ kq[t] * U[i] for i in range(t + 1))
        W = W * np.exp(b[-1]) + sum(np.outer(U[i], kk[i] * ratio(n - 1, i)) for i in range(n))
    return out, W

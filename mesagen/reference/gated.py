"""Hand-written numpy float64 ground truth for the five gated layers of spec language v2 (docs/contract.md), with hand-derived VJPs.

Layers: ``simple_gla``, ``retention``, ``gla`` (linear in ``v``) and ``gated_delta``, ``kda`` (delta rule).
Written from the math of docs/family.md, importing nothing from the compiler. Layouts are
fla-compatible: ``q, k: [B, T, H, K]``, ``v, o: [B, T, H, V]``, per-token gates ``[B, T, H]`` or
``[B, T, H, K]``, per-head parameters ``[H]``, states ``[B, H, K, V]`` (``S = W^T``, key axis first). Position
``t`` answers after absorbing token ``t``; the decay is applied first (``S' = Diag(alpha_t) S_{t-1}``), then the
token is written. Every forward returns ``(o, {state_name: [B, H, K, V]})`` and feeding the state back as
``initial_state`` continues the sequence exactly. ``scale`` multiplies ``q`` after the feature map; ``None``
means ``K ** -0.5``.

Gates: ``g = log(alpha) <= 0`` (``gate_space="log"``, the default except for retention's ``gamma``) or
``alpha`` in ``(0, 1]`` (``gate_space="linear"``). The decay from token ``i`` to position ``t`` is
``omega_{t,i} = prod_{j=i+1..t} alpha_j = exp(G_t - G_i)`` with ``G`` the cumulative sum of ``g``.

How each layer is computed (so the reference does not share the generated code's recursion):

- ``simple_gla``, ``retention``, ``gla``: the explicit weighted sum
  ``o_t = sum_{i<=t} v_i (q~_t * exp(G_t - G_i))^T k_i + S0^T (q~_t * exp(G_t))`` (``q~ = scale q``) and the
  final state ``S_T = Diag(exp(G_L)) S0 + sum_i Diag(exp(G_L - G_i)) k_i v_i^T`` (``L = T - 1``); the
  exponent ``G_t - G_i`` is formed as the segment sum ``sum_{j=i+1..t} g_j`` (no cancellation).
- ``gated_delta``, ``kda``: the token loop ``S' = Diag(alpha_t) S_{t-1}``,
  ``S_t = S' + k_t (beta_t * (v_t - S'^T k_t))^T``, ``o_t = S_t^T q~_t`` (``form="recurrent"``), or
  (``form="products"``) per value column ``j`` the unrolled product of explicit ``K x K`` matrices
  ``M_{t,j} = (I - beta_{t,j} k_t k_t^T) Diag(alpha_t)``:
  ``S_t[:, j] = M_{t,j} ... M_{1,j} S0[:, j] + sum_i M_{t,j} ... M_{i+1,j} beta_{i,j} k_i v_{i,j}``.
  ``k`` and ``q`` pass through ``phi = l2_normalize`` (``x / sqrt(sum x^2 + 1e-6)``) unless
  ``l2_normalize=False``.

VJPs (``<layer>_vjp``) are derived by hand from these formulas: for the linear layers the adjoint of the
explicit sum, with the gate cotangent ``dG_t = q~_t * dq~_t - k_t * dk_t (+ rowsum(S_T * dS_T) at t = L)`` and
``dg_j = sum_{t>=j} dG_t``; for the delta layers the reverse recursion through the token loop, then the
adjoint of the l2 normalisation ``dx = r (dy - y <y, dy>)`` (``y = r x``, ``r = (|x|^2 + eps)^(-1/2)``) and of
``scale``. They are checked against central finite differences in ``tests/test_reference_gated.py``.

fla conventions (read from fla's ``fla/ops/*/naive.py`` and the op entry points; facts only, no fla code):

- ``simple_gla`` (``naive_recurrent_simple_gla``, ``naive_chunk_simple_gla``, ``naive_parallel_simple_gla``):
  layout ``[B, T, H, K]``, ``g: [B, T, H]`` in log space, scale default ``K ** -0.5`` applied to ``q``, decay
  first (``S = S * exp(g_t) + k_t v_t^T``), ``o_t = S_t^T q_t``, state ``[B, H, K, V]``; the parallel form also
  uses ``exp(G_t - G_i)`` from a cumulative sum. Differences: fla computes in float32 and casts ``o`` back to
  the input dtype; it never checks ``g <= 0`` and has no linear-space gate; the chunk op additionally takes a
  per-head constant ``g_gamma: [H]``; ``naive_parallel_simple_gla`` takes no initial state. Ours: float64,
  validated, ``gate_space`` selectable.
- ``retention`` (``naive_retention``, ``chunk_retention``): fla FIXES the decay per head,
  ``gamma_h = 1 - 2^(-5-h)`` (``h = 0..H-1``), not an argument and not learnable; ``chunk_retention`` is
  ``chunk_simple_gla`` with ``g_gamma = log(gamma_h)``; ``naive_retention`` (the stored version) takes
  head-first ``[B, H, T, D]`` tensors, has no ``scale`` argument (always ``D ** -0.5``), no initial and no final
  state. Ours: ``gamma: [H]`` is an argument (linear space by default, the contract's learnable parameter,
  init 0.96875 = fla's head-0 value), validated in ``(0, 1]``, with initial/final state in ``[B, H, K, V]``.
- ``gla`` (``naive_recurrent_gla``): ``gk: [B, T, H, K]`` log space, decay first per key channel
  (``S = S * exp(gk_t)[:, None] + k_t v_t^T``), ``o_t = S_t^T (scale q_t)``, state ``[B, H, K, V]``.
  Differences: the naive function has no ``scale`` argument (fixed ``K ** -0.5``; fused/chunk ops accept
  one with that default); fla's ops also accept a per-value-channel gate ``gv`` which ours does not; float32.
- ``gated_delta`` (``naive_recurrent_gated_delta_rule``, ``naive_chunk_gated_delta_rule``,
  ``chunk_/fused_recurrent_gated_delta_rule``): ``g: [B, T, H]`` log space, ``beta: [B, T, H]``; decay first
  (``S = S * exp(g_t)``), then ``u = beta_t (v_t - S^T k_t)``, ``S = S + k_t u^T``, ``o_t = S^T (scale q_t)``;
  scale default ``K ** -0.5``; state ``[B, H, K, V]``. Differences: the argument ORDER differs inside fla
  (``naive_recurrent_gated_delta_rule(q, k, v, beta, g)`` but ``naive_chunk_...``/``chunk_...(q, k, v, g, beta)``);
  the naive functions do NOT normalise q, k - the ops do so only with ``use_qk_l2norm_in_kernel=True``
  (default False), using ``l2norm``: ``x * rsqrt(sum x^2 + eps)``, ``eps = 1e-6``, before ``scale``; ours
  normalises by default (``l2_normalize=True``, same eps, same order). fla's fused recurrent op accepts a
  per-value-channel ("headwise") ``beta: [B, T, HV, V]`` (``beta.ndim == v.ndim``), which our ``[B, T, H, V]``
  beta matches; fla also has grouped value heads (``HV > H``), ``use_beta_sigmoid_in_kernel``,
  ``allow_neg_eigval`` (beta in ``[0, 2]``), in-kernel gates from ``A_log``/``dt_bias``, and an optional
  value-first state layout - none of which ours has (beta is validated in ``[0, 1]``).
- ``kda`` (``naive_recurrent_kda``, ``naive_chunk_kda``): ``g: [B, T, HV, K]`` log space per key channel,
  ``beta: [B, T, HV]``, ``v: [B, T, HV, V]`` with ``q, k`` repeated over ``HV / H`` groups; decay first
  (``S = S * exp(g_t)[:, None]``), then ``S = S + (beta_t k_t)(v_t - S^T k_t)^T``, ``o_t = S^T (scale q_t)``;
  scale default ``K ** -0.5``; state ``[B, HV, K, V]``; no l2norm in the naive functions (``chunk_kda`` has
  ``use_qk_l2norm_in_kernel`` and ``use_gate_in_kernel``, the latter computing ``g`` from ``A_log``,
  ``dt_bias`` and an optional lower bound). Differences: ours has ``HV = H`` only, normalises q, k by default,
  takes ``g`` directly (log or linear space) and also accepts a per-value-channel ``beta: [B, T, H, V]``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mesagen.reference import _checks

State = Mapping[str, Any]

L2_EPS = 1e-6
FORMS = ("recurrent", "products")


# ------------------------------------------------------------------------------------------------ shared pieces
def _scale(scale, K: int) -> float:
    """``None`` -> ``K ** -0.5``; otherwise a finite real number."""
    if scale is None:
        return float(K) ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) \
            or not np.isfinite(scale):
        raise ValueError(f"scale: expected a finite real number or None, got {scale!r}")
    return float(scale)


def _l2n(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``y = x r`` with ``r = (sum_last x^2 + eps)^(-1/2)``; returns ``(y, r[..., None])``."""
    r = 1.0 / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + L2_EPS)
    return x * r, r


def _l2n_vjp(y: np.ndarray, r: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Adjoint of :func:`_l2n`: ``dx = r (dy - y <y, dy>)`` (from ``dr/dx = -r^3 x``)."""
    return r * (dy - y * np.sum(y * dy, axis=-1, keepdims=True))


def _dfinal(dfinal_state, name: str, shape) -> np.ndarray:
    """Check ``dfinal_state = {name: shape}`` (``None`` -> zeros); return a float64 copy."""
    if dfinal_state is None:
        return np.zeros(shape)
    if not isinstance(dfinal_state, Mapping) or set(dfinal_state) != {name}:
        raise ValueError(f"dfinal_state: expected a dict with the single key {name!r}, got {dfinal_state!r:.80}")
    arr = _checks.as_float64(f"dfinal_state[{name!r}]", dfinal_state[name])
    if arr.shape != tuple(shape):
        raise ValueError(f"dfinal_state[{name!r}]: expected shape {tuple(shape)}, got {arr.shape}")
    return arr


def _do(do, shape) -> np.ndarray:
    arr = _checks.as_float64("do", do)
    if arr.shape != tuple(shape):
        raise ValueError(f"do: expected shape (batch, time, heads, d_v) = {tuple(shape)}, got {arr.shape}")
    return arr


def _gate_cotangent(dlog: np.ndarray, log_gate: np.ndarray, gate_space: str) -> np.ndarray:
    """Cotangent of the user's gate argument from the cotangent of its log: ``d alpha = d g / alpha``."""
    return dlog if gate_space == "log" else dlog / np.exp(log_gate)


# ------------------------------------------------------------------------------------ linear-in-v layers
def _linear_prep(q, k, v, initial_state, scale):
    q, k, v = _checks.qkv(q, k, v)
    B, T, H, K = k.shape
    V = v.shape[3]
    st = _checks.state(initial_state, {"kv": (B, H, K, V)}, {"kv": np.zeros((B, H, K, V))})
    return q, k, v, st["kv"], _scale(scale, K)


def _segment(gk: np.ndarray, t: int, i: int) -> np.ndarray:
    """``G_t - G_i = sum_{j=i+1..t} g_j`` for ``gk: [T, K]`` (``i = -1`` means from the start)."""
    return np.sum(gk[i + 1: t + 1], axis=0)


def _linear_explicit(qs, k, v, gk, S0):
    """Explicit weighted sum for ``qs = scale q``, log gates ``gk: [B, T, H, K]``; returns ``(o, S_T)``."""
    B, T, H, K = k.shape
    V = v.shape[3]
    o = np.zeros((B, T, H, V))
    S = S0.copy()
    for b in range(B):
        for h in range(H):
            g = gk[b, :, h]                                                       # (T, K)
            for t in range(T):
                acc = S0[b, h].T @ (qs[b, t, h] * np.exp(_segment(g, t, -1)))     # initial-state term, (V,)
                for i in range(t + 1):
                    w = qs[b, t, h] * np.exp(_segment(g, t, i))                   # (K,) decayed query
                    acc = acc + float(w @ k[b, i, h]) * v[b, i, h]
                o[b, t, h] = acc
            if T > 0:
                L = T - 1
                S[b, h] = np.exp(_segment(g, L, -1))[:, None] * S0[b, h]
                for i in range(T):
                    S[b, h] += np.outer(np.exp(_segment(g, L, i)) * k[b, i, h], v[b, i, h])
    return o, S


def _linear_vjp(qs, k, v, gk, S0, do, dS):
    """Adjoint of :func:`_linear_explicit`; returns ``(dqs, dk, dv, dgk (log, [B,T,H,K]), dS0)``."""
    B, T, H, K = k.shape
    dqs, dk, dv = np.zeros_like(qs), np.zeros_like(k), np.zeros_like(v)
    dgk = np.zeros_like(gk)
    dS0 = dS.copy()                                                               # T == 0: identity map
    _, S_T = _linear_explicit(qs, k, v, gk, S0)
    for b in range(B):
        for h in range(H):
            g = gk[b, :, h]
            Q, Km, Vm, dO = qs[b, :, h], k[b, :, h], v[b, :, h], do[b, :, h]
            if T == 0:
                continue
            L = T - 1
            # D[t, i, c] = exp(G_t,c - G_i,c) for i <= t, else 0;  E[t, c] = exp(G_t,c)
            D = np.zeros((T, T, K))
            for t in range(T):
                for i in range(t + 1):
                    D[t, i] = np.exp(_segment(g, t, i))
            E = np.stack([np.exp(_segment(g, t, -1)) for t in range(T)])          # (T, K)
            A = np.einsum("tc,ic,tic->ti", Q, Km, D)                              # lower triangular
            dA = np.tril(dO @ Vm.T)                                               # (T, T)
            decL = D[L]                                                           # (T, K) = exp(G_L - G_i)
            dv[b, :, h] = A.T @ dO + (Km * decL) @ dS[b, h]
            dqs[b, :, h] = np.einsum("ti,ic,tic->tc", dA, Km, D) + E * (dO @ S0[b, h].T)
            dk[b, :, h] = np.einsum("ti,tc,tic->ic", dA, Q, D) + decL * (Vm @ dS[b, h].T)
            dS0[b, h] = (Q * E).T @ dO + E[L][:, None] * dS[b, h]
            dG = Q * dqs[b, :, h] - Km * dk[b, :, h]                              # (T, K)
            dG[L] += np.sum(S_T[b, h] * dS[b, h], axis=1)
            dgk[b, :, h] = np.cumsum(dG[::-1], axis=0)[::-1]                      # dg_j = sum_{t >= j} dG_t
    return dqs, dk, dv, dgk, dS0


def _simple_gate(g, bth, K, gate_space):
    g_user = _checks.per_token("g", g, bth)
    g_log = _checks.gate_to_log("g", g_user, gate_space)
    return g_log, np.repeat(g_log[..., None], K, axis=3)


def simple_gla(q, k, v, g, *, scale=None, initial_state: State | None = None, gate_space: str = "log"
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Simple gated linear attention (contract v2 ``simple_gla``; fla ``simple_gla``), explicit-sum form.

    ``S_t = alpha_t S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)`` with a scalar gate per token and head,
    computed as ``o_t = scale sum_{i<=t} exp(G_t - G_i) (q_t^T k_i) v_i + exp(G_t) S0^T (scale q_t)``.

    Args:
        q: queries, float, shape ``(batch, time, heads, d_k)``.
        k: keys, float, shape ``(batch, time, heads, d_k)``.
        v: values, float, shape ``(batch, time, heads, d_v)``.
        g: gate, shape ``(batch, time, heads)``: ``log(alpha) <= 0`` (``gate_space="log"``) or ``alpha`` in
            ``(0, 1]`` (``gate_space="linear"``).
        scale: multiplies ``q``; ``None`` means ``d_k ** -0.5``.
        initial_state: ``{"kv": (batch, heads, d_k, d_v)}``; ``None`` means zeros.
        gate_space: ``"log"`` or ``"linear"``.

    Returns:
        ``(o, {"kv": S_T})``: float64 ``o`` of shape ``(batch, time, heads, d_v)`` and the final state
        ``(batch, heads, d_k, d_v)``.

    Raises:
        ValueError: wrong axes or shapes, a gate out of its domain or non-finite, a bad ``scale``,
            ``gate_space`` or state.
    """
    q, k, v, S0, sc = _linear_prep(q, k, v, initial_state, scale)
    _, gk = _simple_gate(g, k.shape[:3], k.shape[3], gate_space)
    o, S = _linear_explicit(sc * q, k, v, gk, S0)
    return o, {"kv": S}


def simple_gla_vjp(q, k, v, g, do, *, dfinal_state: State | None = None, scale=None,
                   initial_state: State | None = None, gate_space: str = "log") -> dict[str, Any]:
    """Hand-derived float64 VJP of :func:`simple_gla` (adjoint of the explicit sum, see the module docstring).

    Args:
        q, k, v, g, scale, initial_state, gate_space: as for :func:`simple_gla`.
        do: cotangent of ``o``, shape ``(batch, time, heads, d_v)``.
        dfinal_state: ``{"kv": (batch, heads, d_k, d_v)}`` cotangent of the final state; ``None`` means zeros.

    Returns:
        ``{"q", "k", "v", "g", "initial_state": {"kv"}}``, each float64 shaped like its input (``g`` in the
        space given by ``gate_space``; the initial-state cotangent is returned also when it was ``None``).

    Raises:
        ValueError: as :func:`simple_gla`, or a malformed ``do`` / ``dfinal_state``.
    """
    q, k, v, S0, sc = _linear_prep(q, k, v, initial_state, scale)
    g_log, gk = _simple_gate(g, k.shape[:3], k.shape[3], gate_space)
    do = _do(do, v.shape)
    dS = _dfinal(dfinal_state, "kv", S0.shape)
    dqs, dk, dv, dgk, dS0 = _linear_vjp(sc * q, k, v, gk, S0, do, dS)
    return {"q": sc * dqs, "k": dk, "v": dv, "g": _gate_cotangent(dgk.sum(axis=3), g_log, gate_space),
            "initial_state": {"kv": dS0}}


def _retention_gate(gamma, bthk, gate_space):
    B, T, H, K = bthk
    gam_user = _checks.per_head("gamma", gamma, H)
    gam_log = _checks.gate_to_log("gamma", gam_user, gate_space)
    return gam_log, np.broadcast_to(gam_log[None, None, :, None], (B, T, H, K)).copy()


def retention(q, k, v, gamma, *, scale=None, initial_state: State | None = None, gate_space: str = "linear"
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Retention with a per-head decay (contract v2 ``retention``; fla ``retention`` fixes gamma, ours takes it).

    ``S_t = gamma S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)``, computed as the explicit sum
    ``o_t = scale sum_{i<=t} gamma^(t-i) (q_t^T k_i) v_i + gamma^(t+1) S0^T (scale q_t)``.

    Args:
        q: queries, float, shape ``(batch, time, heads, d_k)``.
        k: keys, float, shape ``(batch, time, heads, d_k)``.
        v: values, float, shape ``(batch, time, heads, d_v)``.
        gamma: decay per head, shape ``(heads,)`` (a scalar is broadcast); in ``(0, 1]`` with the default
            ``gate_space="linear"``, or ``log(gamma) <= 0`` with ``gate_space="log"``.
        scale: multiplies ``q``; ``None`` means ``d_k ** -0.5``.
        initial_state: ``{"kv": (batch, heads, d_k, d_v)}``; ``None`` means zeros.
        gate_space: ``"linear"`` (default) or ``"log"``.

    Returns:
        ``(o, {"kv": S_T})``, float64, shapes ``(batch, time, heads, d_v)`` and ``(batch, heads, d_k, d_v)``.

    Raises:
        ValueError: wrong axes or shapes, ``gamma`` out of its domain or non-finite, bad ``scale``,
            ``gate_space`` or state.
    """
    q, k, v, S0, sc = _linear_prep(q, k, v, initial_state, scale)
    _, gk = _retention_gate(gamma, k.shape, gate_space)
    o, S = _linear_explicit(sc * q, k, v, gk, S0)
    return o, {"kv": S}


def retention_vjp(q, k, v, gamma, do, *, dfinal_state: State | None = None, scale=None,
                  initial_state: State | None = None, gate_space: str = "linear") -> dict[str, Any]:
    """Hand-derived float64 VJP of :func:`retention`.

    The cotangent of ``log gamma_h`` is the sum over batch, time and key channel of the per-token, per-channel
    log-gate cotangent of the explicit sum; ``d gamma = d log(gamma) / gamma`` in linear space.

    Args:
        q, k, v, gamma, scale, initial_state, gate_space: as for :func:`retention`.
        do: cotangent of ``o``, shape ``(batch, time, heads, d_v)``.
        dfinal_state: ``{"kv": (batch, heads, d_k, d_v)}``; ``None`` means zeros.

    Returns:
        ``{"q", "k", "v", "gamma" (heads,), "initial_state": {"kv"}}`` in float64.

    Raises:
        ValueError: as :func:`retention`, or a malformed ``do`` / ``dfinal_state``.
    """
    q, k, v, S0, sc = _linear_prep(q, k, v, initial_state, scale)
    gam_log, gk = _retention_gate(gamma, k.shape, gate_space)
    do = _do(do, v.shape)
    dS = _dfinal(dfinal_state, "kv", S0.shape)
    dqs, dk, dv, dgk, dS0 = _linear_vjp(sc * q, k, v, gk, S0, do, dS)
    dgam_log = dgk.sum(axis=(0, 1, 3))
    return {"q": sc * dqs, "k": dk, "v": dv, "gamma": _gate_cotangent(dgam_log, gam_log, gate_space),
            "initial_state": {"kv": dS0}}


def _gla_gate(g, bthk, gate_space):
    g_user = _checks.per_token_channels("g", g, bthk, "d_k")
    return _checks.gate_to_log("g", g_user, gate_space)


def gla(q, k, v, g, *, scale=None, initial_state: State | None = None, gate_space: str = "log"
        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Gated linear attention with a per-key-channel gate (contract v2 ``gla``; fla ``gla``), explicit sum.

    ``S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)``, computed as
    ``o_t = sum_{i<=t} ((scale q_t) * exp(G_t - G_i))^T k_i v_i + S0^T ((scale q_t) * exp(G_t))``.

    Args:
        q: queries, float, shape ``(batch, time, heads, d_k)``.
        k: keys, float, shape ``(batch, time, heads, d_k)``.
        v: values, float, shape ``(batch, time, heads, d_v)``.
        g: gate, shape ``(batch, time, heads, d_k)``, log space ``<= 0`` or (``gate_space="linear"``) ``(0, 1]``.
        scale: multiplies ``q``; ``None`` means ``d_k ** -0.5``.
        initial_state: ``{"kv": (batch, heads, d_k, d_v)}``; ``None`` means zeros.
        gate_space: ``"log"`` or ``"linear"``.

    Returns:
        ``(o, {"kv": S_T})``, float64, shapes ``(batch, time, heads, d_v)`` and ``(batch, heads, d_k, d_v)``.

    Raises:
        ValueError: wrong axes or shapes, a gate out of its domain or non-finite, bad ``scale``,
            ``gate_space`` or state.
    """
    q, k, v, S0, sc = _linear_prep(q, k, v, initial_state, scale)
    gk = _gla_gate(g, k.shape, gate_space)
    o, S = _linear_explicit(sc * q, k, v, gk, S0)
    return o, {"kv": S}


def gla_vjp(q, k, v, g, do, *, dfinal_state: State | None = None, scale=None,
            initial_state: State | None = None, gate_space: str = "log") -> dict[str, Any]:
    """Hand-derived float64 VJP of :func:`gla`.

    Args:
        q, k, v, g, scale, initial_state, gate_space: as for :func:`gla`.
        do: cotangent of ``o``, shape ``(batch, time, heads, d_v)``.
        dfinal_state: ``{"kv": (batch, heads, d_k, d_v)}``; ``None`` means zeros.

    Returns:
        ``{"q", "k", "v", "g" (batch, time, heads, d_k), "initial_state": {"kv"}}`` in float64.

    Raises:
        ValueError: as :func:`gla`, or a malformed ``do`` / ``dfinal_state``.
    """
    q, k, v, S0, sc = _linear_prep(q, k, v, initial_state, scale)
    gk = _gla_gate(g, k.shape, gate_space)
    do = _do(do, v.shape)
    dS = _dfinal(dfinal_state, "kv", S0.shape)
    dqs, dk, dv, dgk, dS0 = _linear_vjp(sc * q, k, v, gk, S0, do, dS)
    return {"q": sc * dqs, "k": dk, "v": dv, "g": _gate_cotangent(dgk, gk, gate_space),
            "initial_state": {"kv": dS0}}


# ------------------------------------------------------------------------------------------ delta-rule layers
def _delta_prep(q, k, v, beta, initial_state, scale, l2_normalize, form):
    q, k, v = _checks.qkv(q, k, v)
    B, T, H, K = k.shape
    V = v.shape[3]
    if not isinstance(l2_normalize, (bool, np.bool_)):
        raise ValueError(f"l2_normalize: expected a bool, got {l2_normalize!r}")
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
    b_user = _checks.as_float64("beta", beta)
    b_full = _checks.unit_interval("beta", _checks.per_token_scalar_or_channels("beta", b_user, (B, T, H), V,
                                                                                "d_v"))
    per_channel_beta = b_user.ndim == 4
    st = _checks.state(initial_state, {"S": (B, H, K, V)}, {"S": np.zeros((B, H, K, V))})
    sc = _scale(scale, K)
    if l2_normalize:
        qn, rq = _l2n(q)
        kn, rk = _l2n(k)
    else:
        qn, rq, kn, rk = q, None, k, None
    return q, k, v, b_full, per_channel_beta, st["S"], sc, qn, rq, kn, rk


def _delta_recurrent(qs, kn, v, gk, beta, S0, keep=False):
    """Token loop; ``gk`` log gates ``[B, T, H, K]``, ``beta`` ``[B, T, H, V]``. Optionally keeps states."""
    B, T, H, K = kn.shape
    V = v.shape[3]
    o = np.zeros((B, T, H, V))
    S_fin = np.zeros((B, H, K, V))
    prev = np.zeros((B, T, H, K, V))                                              # S_{t-1}
    errs = np.zeros((B, T, H, V))
    post = np.zeros((B, T, H, K, V))                                              # S_t
    for b in range(B):
        for h in range(H):
            S = S0[b, h].copy()
            for t in range(T):
                kt = kn[b, t, h]
                prev[b, t, h] = S
                Sp = np.exp(gk[b, t, h])[:, None] * S                             # decay first
                err = v[b, t, h] - Sp.T @ kt                                      # (V,)
                S = Sp + np.outer(kt, beta[b, t, h] * err)
                errs[b, t, h], post[b, t, h] = err, S
                o[b, t, h] = S.T @ qs[b, t, h]
            S_fin[b, h] = S
    if keep:
        return o, S_fin, prev, errs, post
    return o, S_fin


def _delta_products(qs, kn, v, gk, beta, S0):
    """Per value column: ``S_t = prod M S0 + sum prod M beta k v`` with explicit ``K x K`` factors."""
    B, T, H, K = kn.shape
    V = v.shape[3]
    eye = np.eye(K)
    o = np.zeros((B, T, H, V))
    S_fin = S0.copy()
    for b in range(B):
        for h in range(H):
            for j in range(V):
                # M[t] = (I - beta_{t,j} k_t k_t^T) Diag(alpha_t)
                M = [(eye - beta[b, t, h, j] * np.outer(kn[b, t, h], kn[b, t, h])) @ np.diag(np.exp(gk[b, t, h]))
                     for t in range(T)]
                for t in range(T):
                    P = eye.copy()                                                # M_t ... M_0
                    col = np.zeros(K)
                    for i in range(t, -1, -1):                                    # P = M_t ... M_{i+1}
                        col = col + P @ (beta[b, i, h, j] * kn[b, i, h] * v[b, i, h, j])
                        P = P @ M[i]
                    col = col + P @ S0[b, h, :, j]
                    o[b, t, h, j] = col @ qs[b, t, h]
                    if t == T - 1:
                        S_fin[b, h, :, j] = col
    return o, S_fin


def _delta_vjp(qs, kn, v, gk, beta, S0, do, dS_fin):
    """Reverse recursion; returns ``(dqs, dkn, dv, dgk (log), dbeta ([B,T,H,V]), dS0)``."""
    B, T, H, K = kn.shape
    _, _, prev, errs, post = _delta_recurrent(qs, kn, v, gk, beta, S0, keep=True)
    dqs, dkn, dv = np.zeros_like(qs), np.zeros_like(kn), np.zeros_like(v)
    dgk, dbeta = np.zeros_like(gk), np.zeros_like(beta)
    dS0 = np.zeros_like(S0)
    for b in range(B):
        for h in range(H):
            dS = dS_fin[b, h].copy()                                              # cotangent of S_t
            for t in range(T - 1, -1, -1):
                kt, a = kn[b, t, h], np.exp(gk[b, t, h])
                Sprev, St, err, bt = prev[b, t, h], post[b, t, h], errs[b, t, h], beta[b, t, h]
                Sp = a[:, None] * Sprev
                # o_t = S_t^T qs_t
                dS = dS + np.outer(qs[b, t, h], do[b, t, h])
                dqs[b, t, h] = St @ do[b, t, h]
                # S_t = S' + k u^T, u = beta * err
                u = bt * err
                dk = dS @ u
                du = dS.T @ kt
                dSp = dS.copy()
                dbeta[b, t, h] = du * err
                derr = bt * du
                # err = v - S'^T k
                dv[b, t, h] = derr
                dSp -= np.outer(kt, derr)
                dk = dk - Sp @ derr
                dkn[b, t, h] = dk
                # S' = Diag(a) S_{t-1}, a = exp(g)
                dgk[b, t, h] = np.sum(dSp * Sprev, axis=1) * a
                dS = a[:, None] * dSp
            dS0[b, h] = dS
    return dqs, dkn, dv, dgk, dbeta, dS0


def _delta_inputs_back(sc, l2_normalize, qn, rq, kn, rk, dqs, dkn):
    """Cotangents of ``q, k`` from those of ``q~ = sc phi(q)`` and ``k~ = phi(k)``."""
    dqn = sc * dqs
    if l2_normalize:
        return _l2n_vjp(qn, rq, dqn), _l2n_vjp(kn, rk, dkn)
    return dqn, dkn


def _gd_gate(g, bthk, gate_space):
    g_user = _checks.per_token("g", g, bthk[:3])
    g_log = _checks.gate_to_log("g", g_user, gate_space)
    return g_log, np.repeat(g_log[..., None], bthk[3], axis=3)


def gated_delta(q, k, v, g, beta, *, scale=None, initial_state: State | None = None, l2_normalize: bool = True,
                gate_space: str = "log", form: str = "recurrent") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Gated delta rule (contract v2 ``gated_delta``; fla ``gated_delta_rule`` with q/k l2norm in kernel).

    With ``k~ = phi(k)``, ``q~ = scale phi(q)`` (``phi`` = l2 normalisation, eps 1e-6, or identity):
    ``S' = alpha_t S_{t-1}``, ``S_t = S' + k~_t (beta_t * (v_t - S'^T k~_t))^T``, ``o_t = S_t^T q~_t``.

    Args:
        q: queries, float, shape ``(batch, time, heads, d_k)``.
        k: keys, float, shape ``(batch, time, heads, d_k)``.
        v: values, float, shape ``(batch, time, heads, d_v)``.
        g: gate, shape ``(batch, time, heads)``, log space ``<= 0`` or (``gate_space="linear"``) ``(0, 1]``.
        beta: step size in ``[0, 1]``, shape ``(batch, time, heads)`` or per value channel
            ``(batch, time, heads, d_v)``.
        scale: multiplies ``phi(q)``; ``None`` means ``d_k ** -0.5``.
        initial_state: ``{"S": (batch, heads, d_k, d_v)}``; ``None`` means zeros.
        l2_normalize: apply ``phi`` to ``q`` and ``k`` (the contract's feature map); ``False`` = identity.
        gate_space: ``"log"`` or ``"linear"``.
        form: ``"recurrent"`` (token loop) or ``"products"`` (unrolled products of explicit ``K x K`` factors,
            an independent second form).

    Returns:
        ``(o, {"S": S_T})``, float64, shapes ``(batch, time, heads, d_v)`` and ``(batch, heads, d_k, d_v)``.

    Raises:
        ValueError: wrong axes or shapes, a gate out of its domain, ``beta`` outside ``[0, 1]``, non-finite
            gates, bad ``scale``, ``gate_space``, ``form``, ``l2_normalize`` or state.
    """
    q, k, v, bf, _, S0, sc, qn, _, kn, _ = _delta_prep(q, k, v, beta, initial_state, scale, l2_normalize, form)
    _, gk = _gd_gate(g, k.shape, gate_space)
    run = _delta_recurrent if form == "recurrent" else _delta_products
    o, S = run(sc * qn, kn, v, gk, bf, S0)
    return o, {"S": S}


def gated_delta_vjp(q, k, v, g, beta, do, *, dfinal_state: State | None = None, scale=None,
                    initial_state: State | None = None, l2_normalize: bool = True, gate_space: str = "log"
                    ) -> dict[str, Any]:
    """Hand-derived float64 VJP of :func:`gated_delta` (reverse recursion through the token loop).

    Args:
        q, k, v, g, beta, scale, initial_state, l2_normalize, gate_space: as for :func:`gated_delta`.
        do: cotangent of ``o``, shape ``(batch, time, heads, d_v)``.
        dfinal_state: ``{"S": (batch, heads, d_k, d_v)}``; ``None`` means zeros.

    Returns:
        ``{"q", "k", "v", "g" (batch, time, heads), "beta" (shaped like ``beta``), "initial_state": {"S"}}``.

    Raises:
        ValueError: as :func:`gated_delta`, or a malformed ``do`` / ``dfinal_state``.
    """
    q, k, v, bf, per_ch, S0, sc, qn, rq, kn, rk = _delta_prep(q, k, v, beta, initial_state, scale,
                                                              l2_normalize, "recurrent")
    g_log, gk = _gd_gate(g, k.shape, gate_space)
    do = _do(do, v.shape)
    dS = _dfinal(dfinal_state, "S", S0.shape)
    dqs, dkn, dv, dgk, dbeta, dS0 = _delta_vjp(sc * qn, kn, v, gk, bf, S0, do, dS)
    dq, dk = _delta_inputs_back(sc, l2_normalize, qn, rq, kn, rk, dqs, dkn)
    return {"q": dq, "k": dk, "v": dv, "g": _gate_cotangent(dgk.sum(axis=3), g_log, gate_space),
            "beta": dbeta if per_ch else dbeta.sum(axis=3), "initial_state": {"S": dS0}}


def kda(q, k, v, g, beta, *, scale=None, initial_state: State | None = None, l2_normalize: bool = True,
        gate_space: str = "log", form: str = "recurrent") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Kimi delta attention: gated delta rule with a per-key-channel gate (contract v2 ``kda``; fla ``kda``).

    With ``k~ = phi(k)``, ``q~ = scale phi(q)``: ``S' = Diag(alpha_t) S_{t-1}``,
    ``S_t = S' + k~_t (beta_t * (v_t - S'^T k~_t))^T``, ``o_t = S_t^T q~_t``.

    Args:
        q: queries, float, shape ``(batch, time, heads, d_k)``.
        k: keys, float, shape ``(batch, time, heads, d_k)``.
        v: values, float, shape ``(batch, time, heads, d_v)``.
        g: gate, shape ``(batch, time, heads, d_k)``, log space ``<= 0`` or (``gate_space="linear"``) ``(0, 1]``.
        beta: step size in ``[0, 1]``, shape ``(batch, time, heads)`` or ``(batch, time, heads, d_v)``.
        scale: multiplies ``phi(q)``; ``None`` means ``d_k ** -0.5``.
        initial_state: ``{"S": (batch, heads, d_k, d_v)}``; ``None`` means zeros.
        l2_normalize: apply ``phi`` to ``q`` and ``k``; ``False`` = identity.
        gate_space: ``"log"`` or ``"linear"``.
        form: ``"recurrent"`` or ``"products"`` (see :func:`gated_delta`).

    Returns:
        ``(o, {"S": S_T})``, float64, shapes ``(batch, time, heads, d_v)`` and ``(batch, heads, d_k, d_v)``.

    Raises:
        ValueError: as :func:`gated_delta`.
    """
    q, k, v, bf, _, S0, sc, qn, _, kn, _ = _delta_prep(q, k, v, beta, initial_state, scale, l2_normalize, form)
    gk = _gla_gate(g, k.shape, gate_space)
    run = _delta_recurrent if form == "recurrent" else _delta_products
    o, S = run(sc * qn, kn, v, gk, bf, S0)
    return o, {"S": S}


def kda_vjp(q, k, v, g, beta, do, *, dfinal_state: State | None = None, scale=None,
            initial_state: State | None = None, l2_normalize: bool = True, gate_space: str = "log"
            ) -> dict[str, Any]:
    """Hand-derived float64 VJP of :func:`kda` (reverse recursion through the token loop).

    Args:
        q, k, v, g, beta, scale, initial_state, l2_normalize, gate_space: as for :func:`kda`.
        do: cotangent of ``o``, shape ``(batch, time, heads, d_v)``.
        dfinal_state: ``{"S": (batch, heads, d_k, d_v)}``; ``None`` means zeros.

    Returns:
        ``{"q", "k", "v", "g" (batch, time, heads, d_k), "beta" (shaped like ``beta``), "initial_state": {"S"}}``.

    Raises:
        ValueError: as :func:`kda`, or a malformed ``do`` / ``dfinal_state``.
    """
    q, k, v, bf, per_ch, S0, sc, qn, rq, kn, rk = _delta_prep(q, k, v, beta, initial_state, scale,
                                                              l2_normalize, "recurrent")
    gk = _gla_gate(g, k.shape, gate_space)
    do = _do(do, v.shape)
    dS = _dfinal(dfinal_state, "S", S0.shape)
    dqs, dkn, dv, dgk, dbeta, dS0 = _delta_vjp(sc * qn, kn, v, gk, bf, S0, do, dS)
    dq, dk = _delta_inputs_back(sc, l2_normalize, qn, rq, kn, rk, dqs, dkn)
    return {"q": dq, "k": dk, "v": dv, "g": _gate_cotangent(dgk, gk, gate_space),
            "beta": dbeta if per_ch else dbeta.sum(axis=3), "initial_state": {"S": dS0}}

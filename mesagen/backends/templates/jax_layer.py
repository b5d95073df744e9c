"""Template of the fixed frame of every generated ``layer_jax.py`` (see mesagen.backends.jax_backend).

This is a real Python module so that it can be linted (tests/test_templates.py runs pyflakes on it), but it is
never imported by generated code. The backend reads it as text: everything after the marker line
``# ==== template body ====`` is split at the ``# ==== section: NAME ====`` lines (the markers themselves are not
emitted), and each section is filled by :func:`mesagen.backends.templates.fill`, which substitutes the
placeholders ``__NAME__`` and refuses a missing, unknown or left-over placeholder.

The names below stand for what the generated module defines before the frame (printed from the IR) and for the
placeholders, so that the body lints as a module.
"""
# flake8: noqa
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

SPEC_NAME: str = ""
PARAMS: dict = {}
INPUTS: dict = {}
FORMS: tuple = ()
DEFAULT_SCALE: Any = 1.0
_PARAM_NAMES: tuple = ()
_INPUT_NAMES: tuple = ()
_INPUT_NEUTRAL: tuple = ()
_STATE_DIMS: tuple = ()
_LOG_GATE: Any = None
State: Any = NamedTuple
_step_head = _stats_head = _precondition_head = _final_head = _features = init_state = None
__STEP_HEAD_AXES__ = __STEP_BATCH_AXES__ = __STATS_HEAD_AXES__ = __STATS_BATCH_AXES__ = ()
__USES_GRAM__ = __PER_CHANNEL__ = False
__IMPORTANCE__ = __GATE_INPUT__ = __GATE_PARAM__ = None
__MAX_ITERATIONS__ = __TOLERANCE__ = 1
__DELTA_HEAD_AXES__ = __DELTA_BATCH_AXES__ = ()
_delta_step_head = None

# ==== template body ====
# ==== section: spd_helpers ====
def _spd_substitute(A, b):
    """A⁻¹ b for a symmetric positive-definite A [K, K] and b [K, N]: Cholesky A = L Lᵀ, then forward and back
    substitution, one row at a time (XLA-CPU's batched triangular solve is orders of magnitude slower at these
    sizes). Never a general inverse."""
    L = jnp.linalg.cholesky(A)
    n = A.shape[-1]

    def forward_row(i, y):
        return y.at[i].set((b[i] - L[i] @ y) / L[i, i])

    def back_row(j, x):
        i = n - 1 - j
        return x.at[i].set((y[i] - L[:, i] @ x) / L[i, i])

    y = lax.fori_loop(0, n, forward_row, jnp.zeros_like(b))
    return lax.fori_loop(0, n, back_row, jnp.zeros_like(b))


@jax.custom_jvp
def _spd_solve(A, b):
    """A⁻¹ b for a symmetric positive-definite A [K, K] and b [K, N] by Cholesky (_spd_substitute), differentiated
    implicitly (_spd_solve_jvp), never through the factorisation and the substitution loops."""
    return _spd_substitute(A, b)


@_spd_solve.defjvp
def _spd_solve_jvp(primals, tangents):
    """x = A⁻¹ b  ⇒  ẋ = A⁻¹ (ḃ − Ȧ x), applied as a product with A⁻¹ (formed once by _spd_substitute), so that
    reverse mode transposes a matmul (b̄ = A⁻¹ x̄, Ā = −sym(b̄ xᵀ): the tangent Ȧ is symmetrised, as A is read as a symmetric matrix). Autodiff through the Cholesky
    factorisation and the substitution loops costs about 400× the solve on XLA:CPU at K = 32."""
    A, b = primals
    dA, db = tangents
    dA = (dA + dA.T) / 2   # A is symmetric and only its lower triangle is read: a symmetric tangent (as jnp.linalg.cholesky's)
    x = _spd_substitute(A, b)
    P = _spd_substitute(A, jnp.eye(A.shape[-1], dtype=A.dtype))
    return x, P @ (db - dA @ x)


def _spd_inv(A):
    """A⁻¹ for a symmetric positive-definite A [K, K], by Cholesky (see _spd_solve)."""
    return _spd_solve(A, jnp.eye(A.shape[-1], dtype=A.dtype))


# ==== section: cg_helpers ====
_CG_MAX_ITERATIONS = __MAX_ITERATIONS__   # the spec's solver.max_iterations
_CG_TOLERANCE = __TOLERANCE__        # the spec's solver.tolerance: stop once ‖A x − b‖₂ ≤ tolerance · ‖b‖₂


def _cg_iterate(A, b):
    """Conjugate gradient for A x = b, A [K, K] symmetric positive-definite, b [K, N] (each column its own run).

    Starts from the Jacobi guess x⁰ = b / diag(A); stops a column once ‖r‖₂ ≤ _CG_TOLERANCE · ‖b‖₂ and the loop
    after _CG_MAX_ITERATIONS iterations at most (lax.while_loop: no cost for iterations never needed). Guarded:
    b = 0 returns 0 after no iteration, and a zero curvature pᵀAp (a converged column) divides by 1, not 0.
    Hestenes & Stiefel (1952); MesaNet (von Oswald et al. 2025) solves its readout this way.
    """
    x = b / jnp.diagonal(A)[:, None]
    r = b - A @ x
    rs = jnp.sum(r * r, axis=0, keepdims=True)
    stop = (_CG_TOLERANCE * _CG_TOLERANCE) * jnp.sum(b * b, axis=0, keepdims=True)

    def cond(c):
        i, _, _, _, rs = c
        return (i < _CG_MAX_ITERATIONS) & jnp.any(rs > stop)

    def body(c):
        i, x, r, p, rs = c
        active = rs > stop
        Ap = A @ p
        pAp = jnp.sum(p * Ap, axis=0, keepdims=True)
        a = jnp.where(active, rs / jnp.where(pAp > 0, pAp, 1), 0)
        x, r = x + a * p, r - a * Ap
        rs_new = jnp.sum(r * r, axis=0, keepdims=True)
        p = r + jnp.where(active, rs_new / jnp.where(rs > 0, rs, 1), 0) * p
        return i + 1, x, r, p, rs_new

    return lax.while_loop(cond, body, (0, x, r, r, rs))[1]


def _cg_solve(A, b):
    """x ≈ A⁻¹ b by conjugate gradient (_cg_iterate), A [K, K] symmetric positive-definite, b [K, N].

    Differentiated implicitly, never through the iterations (lax.custom_linear_solve, symmetric): forward mode
    is ẋ = A⁻¹(ḃ − Ȧ x), reverse mode b̄ = A⁻¹ x̄ and Ā = −b̄ xᵀ, each one more conjugate-gradient solve. A zero
    cotangent gives zero gradients (b = 0 returns 0), a tiny one a tiny gradient (the tolerance is relative).
    jit, vmap, grad, vjp, jvp, checkpoint and scan compose.
    """
    return lax.custom_linear_solve(lambda x: A @ x, b, lambda _, r: _cg_iterate(A, r), symmetric=True)
# ==== section: frame ====
# ----------------------------------------------------------------------------------------------------
# Batched frame: vmaps over heads and batch, lax.scan over time.

_step_heads = jax.vmap(_step_head, in_axes=__STEP_HEAD_AXES__)
_step_all = jax.vmap(_step_heads, in_axes=__STEP_BATCH_AXES__)


def _step_batched(state, q_t, k_t, v_t, ps, inputs_t):
    """One token for every (batch, head): q_t, k_t [B, H, K]; v_t [B, H, V]; ps: [H] arrays; inputs_t: [B, H]."""
    o_t, new = _step_all(*state, q_t, k_t, v_t, *ps, *inputs_t)
    return o_t, State(*new)


def _scan(ps, state, xs, live=None):
    """Scan the step over time-major xs = (q, k, v, *inputs), each [T, B, H, ...]; returns (final, o [T, B, H, V]).

    ``live`` ([T, B] bool, or None for all live): a token that is not live (cu_seqlens padding, see _varlen_pack)
    leaves the state exactly as it was, whatever the step would do (e.g. a constant per-head decay γ).
    """

    def body(carry, x):
        x, live_t = x
        q_t, k_t, v_t = x[0], x[1], x[2]
        o_t, new = _step_batched(carry, q_t, k_t, v_t, ps, x[3:])
        if live_t is not None:
            new = State(*(jnp.where(live_t.reshape((-1,) + (1,) * (n.ndim - 1)), n, c) for n, c in zip(new, carry)))
        return new, o_t

    return lax.scan(body, state, (xs, live))


def _featurise(q, k, scale, live):
    """What the per-head programs read: scale · φ(q) and φ(k), [B, T, H, K]. With ``live`` ([B, T] bool, the
    cu_seqlens padding mask, see _varlen_pack) the keys of padding tokens are set to 0 *after* φ (φ(0) need not
    be 0: elu(0) + 1 = 1), so that a padding token adds nothing to any running sum (k = v = 0, docs/contract.md
    §10)."""
    q, k = scale * _features(q), _features(k)
    if live is not None:
        k = jnp.where(live[:, :, None, None], k, 0)
    return q, k
# ==== section: closed_form_vmaps ====

_stats_all = jax.vmap(jax.vmap(_stats_head, in_axes=__STATS_HEAD_AXES__), in_axes=__STATS_BATCH_AXES__)
_precondition_all = jax.vmap(jax.vmap(jax.vmap(_precondition_head, in_axes=(0, 0) + (0,) * len(_PARAM_NAMES)),
                                      in_axes=(0, 0) + (None,) * len(_PARAM_NAMES)),
                             in_axes=(0, 0) + (None,) * len(_PARAM_NAMES))
_final_all = jax.vmap(jax.vmap(_final_head, in_axes=(0, 0) + (0,) * len(_PARAM_NAMES)),
                      in_axes=(0, 0) + (None,) * len(_PARAM_NAMES))
_USES_GRAM = __USES_GRAM__
_IMPORTANCE = __IMPORTANCE__  # index of the importance-weight input, or None
_GATE_INPUT = __GATE_INPUT__  # index of the forget-gate input, or None
_GATE_PARAM = __GATE_PARAM__  # index of the forget-gate parameter (a constant decay per head), or None
_PER_CHANNEL = __PER_CHANNEL__  # one gate per key channel


# ==== section: segments ====


def _segment_length(T):
    """Segment length max(⌈√T⌉, 64): the checkpoint interval of the backward (O(√T) stored states for long T)
    and, for the ridge family, the refactorisation interval. Below 64 tokens per segment, the fixed cost of each
    boundary outweighs what it saves (and 64 rank-one steps lose little accuracy, docs/numerics.md)."""
    return max(64, math.isqrt(max(T - 1, 0)) + 1)


def _split_segments(xs, T):
    L = _segment_length(T)
    n = T // L
    head = jax.tree.map(lambda x: x[: n * L].reshape((n, L) + x.shape[1:]), xs)
    tail = jax.tree.map(lambda x: x[n * L:], xs)
    return head, tail, n, L
# ==== section: checkpointed_scan ====


def _scan_recurrent(ps, state, xs, live=None):
    """lax.scan of the step in two levels: an outer scan over max(⌈√T⌉, 64)-token segments whose body is rematerialised
    (``jax.checkpoint``), so reverse mode keeps only the state entering each segment and recomputes one segment
    at a time. Plain JAX transformations throughout (no custom VJP), so jit, vmap (batched or unbatched
    parameters), grad, vjp, jvp, checkpoint and scan all compose. No inverse is ever reconstructed backwards.
    """
    T = xs[0].shape[0]
    head, tail, n, L = _split_segments((xs, live), T)                 # live: [T, B] mask or None (see _scan)
    segment = jax.checkpoint(lambda carry, seg: _scan(ps, carry, *seg))
    mid, o_head = lax.scan(segment, state, head)
    final, o_tail = _scan(ps, mid, *tail)
    o = jnp.concatenate([o_head.reshape((n * L,) + o_head.shape[2:]), o_tail], axis=0)
    return final, o
# ==== section: implicit_scan ====



def _gram_sums(seg):
    """Σ v kᵀ [B, H, V, K] and Σ k kᵀ [B, H, K, K] over the tokens of time-major seg = (q, k, v, ...)."""
    k, v = seg[1], seg[2]
    return jnp.einsum("tbhv,tbhk->bhvk", v, k), jnp.einsum("tbhk,tbhj->bhkj", k, k)


def _scan_refactorised(ps, state, xs):
    """Forward of the recurrent form: the rank-one (Sherman–Morrison) step inside each max(⌈√T⌉, 64)-token segment, and
    at every segment boundary a fresh state from the exact statistics C̄ = C̄₀ + Σ v kᵀ, Ā = Ā₀ + Σ k kᵀ
    (a Cholesky-based inverse), so rank-one rounding errors never accumulate over more than one segment.

    Returns:
        (final State, o [T, B, H, V], checkpoints: the State entering each full segment [n, B, H, ...],
        the State entering the tail, (C̄₀, Ā₀), (C̄_T, Ā_T)).
    """
    T = xs[0].shape[0]
    head, tail, n, L = _split_segments(xs, T)
    stats0 = _stats_all(*state, *ps)

    def segment(carry, seg):
        st, C, A = carry
        _, o = _scan(ps, st, seg)
        dC, dA = _gram_sums(seg)
        C, A = C + dC, A + dA
        return (State(*_final_all(C, A, *ps)), C, A), (o, st)

    (mid, C, A), (o_head, checkpoints) = lax.scan(segment, (state,) + tuple(stats0), head)
    _, o_tail = _scan(ps, mid, tail)
    dC, dA = _gram_sums(tail)
    statsT = (C + dC, A + dA)
    final = State(*_final_all(*statsT, *ps))
    o = jnp.concatenate([o_head.reshape((n * L,) + o_head.shape[2:]), o_tail], axis=0)
    return final, o, checkpoints, mid, stats0, statsT


def _scan_recurrent(ps, state, xs, live=None):
    """The recurrent form, differentiated implicitly (_scan_implicit). ``live`` (the cu_seqlens padding mask) is
    not needed: the implicit backward exists for uniform weights only (no decay), so a padding token, whose key
    is 0 after the feature map (_featurise), adds nothing to Σ v kᵀ or Σ k kᵀ and leaves the state unchanged."""
    del live
    return _scan_implicit(ps, state, xs)


@jax.custom_vjp
def _scan_implicit(ps, state, xs):
    """The recurrent form, differentiated implicitly (see _scan_recurrent_bwd)."""
    final, o = _scan_refactorised(ps, state, xs)[:2]
    return final, o


def _scan_recurrent_fwd(ps, state, xs):
    final, o, checkpoints, mid, stats0, statsT = _scan_refactorised(ps, state, xs)
    return (final, o), (ps, state, xs, checkpoints, mid, statsT)


def _segment_states(ps, state, seg):
    """The states after every token of a segment (recomputed from the state entering it): [L, B, H, ...]."""

    def body(carry, x):
        _, new = _step_batched(carry, x[0], x[1], x[2], ps, x[3:])
        return new, new

    return lax.scan(body, state, seg)[1]


def _segment_pullback(ps, state, seg, g_o, acc):
    """Reverse sweep over one segment of L tokens. With W_t = C̄_t Ā_t⁻¹, x_t = Ā_t⁻¹ q_t = P_t q_t and
    y_t = W_tᵀ ḡ_t (ḡ_t the cotangent of o_t), the exact derivatives of o_t = C̄_t Ā_t⁻¹ q_t are
        ∂q_t = y_t,   ∂C̄_t = ḡ_t x_tᵀ,   ∂Ā_t = −y_t x_tᵀ,
    and since C̄_t, Ā_t are running sums, token i receives the reverse sums Ĉ_i = Σ_{t≥i} ḡ_t x_tᵀ and
    Â_i = −Σ_{t≥i} y_t x_tᵀ:  ∂v_i = Ĉ_i k_i,  ∂k_i = Ĉ_iᵀ v_i + (Â_i + Â_iᵀ) k_i. Inside the segment these
    are causal-masked products of [L, L] score matrices (matmuls, no loop); acc = (Ĉ, Â, seen) carries the sums
    of later segments. Positions whose own and later cotangents are all zero get exactly zero (never 0 times
    a non-finite value).
    """
    S, P = _segment_states(ps, state, seg)                          # [L, B, H, K, V], [L, B, H, K, K]
    q, k, v = seg[0], seg[1], seg[2]
    Ch, Ah, seen = acc
    live = jnp.any(g_o != 0, axis=-1)                               # [L, B, H]
    x = jnp.where(live[..., None], jnp.einsum("tbhkj,tbhj->tbhk", P, q), 0)
    y = jnp.where(live[..., None], jnp.einsum("tbhkv,tbhv->tbhk", S, g_o), 0)
    g = jnp.where(live[..., None], g_o, 0)
    Ls = q.shape[0]
    later = jnp.arange(Ls)[:, None] >= jnp.arange(Ls)[None, :]     # [t, i]: t ≥ i
    mask = lambda a: jnp.where(later[:, :, None, None], a, 0)       # noqa: E731  [t, i, B, H]
    xk = mask(jnp.einsum("tbhk,ibhk->tibh", x, k))                  # x_tᵀ k_i
    gv = mask(jnp.einsum("tbhv,ibhv->tibh", g, v))                  # ḡ_tᵀ v_i
    yk = mask(jnp.einsum("tbhk,ibhk->tibh", y, k))                  # y_tᵀ k_i
    dv = jnp.einsum("tibh,tbhv->ibhv", xk, g) + jnp.einsum("bhvk,ibhk->ibhv", Ch, k)
    dk = (jnp.einsum("tibh,tbhk->ibhk", gv - yk, x) - jnp.einsum("tibh,tbhk->ibhk", xk, y)
          + jnp.einsum("bhvk,ibhv->ibhk", Ch, v) + jnp.einsum("bhkj,ibhj->ibhk", Ah + jnp.swapaxes(Ah, -1, -2), k))
    seen_i = seen | (jnp.cumsum(live[::-1], axis=0)[::-1] > 0)       # [L, B, H]: a live cotangent at t ≥ i
    dv = jnp.where(seen_i[..., None], dv, 0)
    dk = jnp.where(seen_i[..., None], dk, 0)
    Ch = Ch + jnp.einsum("tbhv,tbhk->bhvk", g, x)
    Ah = Ah - jnp.einsum("tbhk,tbhj->bhkj", y, x)
    seen = seen | jnp.any(live, axis=0)
    return (Ch, Ah, seen), (y, dk, dv) + tuple(jnp.zeros_like(a) for a in seg[3:])


def _scan_recurrent_bwd(res, cotangents):
    """Implicit differentiation of the exact ridge solution (no adjoint through Sherman–Morrison steps, whose
    rounding errors the reverse sweep would amplify by up to 1/λ²): the final state's cotangent is pulled back
    through state_from_stats, every output's through the formulas of _segment_pullback, and the statistics'
    reverse sums Ĉ₀, Â₀ through stats_from_state to the initial state. Recomputes one segment at a time from
    the stored checkpoints: activation memory O(√T · B·H·(K² + K·V)).
    """
    ps, state, xs, checkpoints, mid, statsT = res
    g_final, g_o = cotangents
    T = g_o.shape[0]
    head, tail, n, L = _split_segments(xs, T)
    live_final = jnp.any(jnp.stack([jnp.any(g != 0, axis=(-2, -1)) for g in g_final]), axis=0)   # [B, H]
    _, pull_final = jax.vjp(lambda C, A, *p: State(*_final_all(C, A, *p)), *statsT, *ps)
    gC, gA, *g_ps = pull_final(State(*(jnp.where(live_final[..., None, None], g, 0) for g in g_final)))
    gC = jnp.where(live_final[..., None, None], gC, 0)
    gA = jnp.where(live_final[..., None, None], gA, 0)
    acc = (gC, gA, live_final)
    acc, g_tail = _segment_pullback(ps, mid, tail, g_o[n * L:], acc)
    g_o_head = g_o[: n * L].reshape((n, L) + g_o.shape[1:])

    def back(acc, seg):
        checkpoint, xs_seg, g_o_seg = seg
        return _segment_pullback(ps, checkpoint, xs_seg, g_o_seg, acc)

    (gC0, gA0, _), g_head = lax.scan(back, acc, (checkpoints, head, g_o_head), reverse=True)
    _, pull_stats = jax.vjp(lambda st, *p: _stats_all(*st, *p), state, *ps)
    g_state, *g_ps0 = pull_stats((gC0, gA0))
    g_xs = jax.tree.map(lambda a, b: jnp.concatenate([a.reshape((n * L,) + a.shape[2:]), b], axis=0),
                        g_head, g_tail)
    return tuple(a + b for a, b in zip(g_ps, g_ps0)), g_state, g_xs


_scan_implicit.defvjp(_scan_recurrent_fwd, _scan_recurrent_bwd)
# ==== section: forward_recurrent ====


def _recurrent_inputs(inputs):
    """Per-token inputs as the per-head programs read them: a log-space forget gate g becomes α = exp(g)."""
    inputs = tuple(inputs)
    if _LOG_GATE is None:
        return inputs
    return inputs[:_LOG_GATE] + (jnp.exp(inputs[_LOG_GATE]),) + inputs[_LOG_GATE + 1:]


@jax.jit
def _forward_recurrent(q, k, v, ps, state, inputs, scale, live=None):
    q, k = _featurise(q, k, scale, live)
    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v) + _recurrent_inputs(inputs))
    final, o = _scan_recurrent(tuple(ps), state, xs, None if live is None else jnp.swapaxes(live, 0, 1))
    return jnp.swapaxes(o, 0, 1), final
# ==== section: forward_closed_form ====


@jax.jit
def _forward_closed_form(q, k, v, ps, state, inputs, scale, live=None):
    """Parallel form: Ā_t by a cumulative sum over time, x_t = M(Ā_t) q_t, o = C̄₀ x + tril(X Kᵀ) V."""
    q, k = _featurise(q, k, scale, live)                               # padding tokens: k = 0, add nothing
    B, T, H, K = q.shape
    C0, A0 = _stats_all(*state, *ps)                                  # [B, H, V, K], [B, H, K, K]
    if _IMPORTANCE is not None:                                         # β_i weights pair i: scale v_i (and k_i k_iᵀ)
        v = v * inputs[_IMPORTANCE][..., None]
    if _USES_GRAM:
        kw = k if _IMPORTANCE is None else k * inputs[_IMPORTANCE][..., None]
        Abar = A0[:, None] + jnp.cumsum(jnp.einsum("bthk,bthj->bthkj", kw, k), axis=1)   # [B, T, H, K, K]
    else:
        Abar = jnp.zeros((B, T, H, 0, 0), q.dtype)
    x = _precondition_all(q, Abar, *ps)                                # [B, T, H, K]
    scores = jnp.einsum("bthk,bshk->bhts", x, k)                       # [B, H, T, T]
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))
    # Multiply the masked scores only with finite values (0·NaN would reach every position); the non-finite
    # entries of v reach positions t ≥ s through a cumulative sum, where the recurrence has them too.
    finite_v = jnp.isfinite(v)
    o = (jnp.einsum("bhts,bshv->bthv", jnp.where(causal, scores, 0), jnp.where(finite_v, v, 0))
         + jnp.einsum("bhvk,bthk->bthv", C0, x) + jnp.cumsum(jnp.where(finite_v, 0, v), axis=1))
    Cbar = C0 + jnp.einsum("bthv,bthk->bhvk", v, k)
    if _USES_GRAM:                                                      # (also for T = 0)
        kw = k if _IMPORTANCE is None else k * inputs[_IMPORTANCE][..., None]
        Abar_T = A0 + jnp.einsum("bthk,bthj->bhkj", kw, k)
    else:
        Abar_T = jnp.zeros((B, H, 0, 0), q.dtype)
    return o, State(*_final_all(Cbar, Abar_T, *ps))
# ==== section: forward_closed_form_decayed ====


def _log_decay(ps, inputs, B, T, H, live=None):
    """G_t = Σ_{j≤t} log α_j, [B, T, H] (or [B, T, H, K] per key channel): the decay ω_{t,i} = exp(G_t − G_i).
    A token that is not live (``live`` [B, T], cu_seqlens padding) decays nothing (log α = 0)."""
    if _GATE_PARAM is not None and live is not None:                     # γ per head, padding tokens neutral
        return jnp.cumsum(jnp.where(live[:, :, None], jnp.log(ps[_GATE_PARAM]), 0), axis=1)
    if _GATE_PARAM is not None:                                          # a constant decay γ per head
        return jnp.broadcast_to(jnp.arange(1, T + 1, dtype=ps[_GATE_PARAM].dtype)[:, None]
                                * jnp.log(ps[_GATE_PARAM]), (B, T, H))
    g = inputs[_GATE_INPUT]
    return jnp.cumsum(g if _LOG_GATE is not None else jnp.log(g), axis=1)


@jax.jit
def _forward_closed_form(q, k, v, ps, state, inputs, scale, live=None):
    """Parallel form with decayed weights: o_t = C̄_t x_t with
        C̄_t = ω_{t,0} C̄₀ + Σ_{i≤t} ω_{t,i} v_i k_iᵀ,  ω_{t,i} = exp(G_t − G_i)  (per key channel: on k's channels),
    x_t = M(Ā_t) q_t. Decays come from differences of cumulative log gates masked to i ≤ t before the exp (never
    a product of α's, which underflows, and never exp of a positive number); quadratic in T."""
    q, k = _featurise(q, k, scale, live)                               # padding tokens: k = 0, add nothing
    B, T, H, K = q.shape
    if T == 0:                                                          # nothing to absorb
        return jnp.zeros((B, 0, H, v.shape[-1]), q.dtype), state
    C0, A0 = _stats_all(*state, *ps)                                  # [B, H, V, K], [B, H, K, K]
    if _IMPORTANCE is not None:                                         # β_i weights pair i
        v = v * inputs[_IMPORTANCE][..., None]
    G = _log_decay(ps, inputs, B, T, H, live)                           # [B, T, H] or [B, T, H, K]
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))                     # [t, i]: i ≤ t
    diff = G[:, :, None] - G[:, None, :]                                # [B, t, i, H(, K)]: G_t − G_i
    mask = causal.reshape((1, T, T) + (1,) * (diff.ndim - 3))
    decay = jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0)), 0)       # ω_{t,i}, exactly 0 for i > t
    last = jnp.exp(G[:, -1:] - G)                                       # ω_{T,i}
    if _PER_CHANNEL:
        x = _x_plain(q, ps)                                             # [B, T, H, K]
        scores = jnp.einsum("bthk,bihk,btihk->bhti", x, k, decay)
        o0 = jnp.einsum("bhvk,bthk->bthv", C0, x * jnp.exp(G))
        Cbar = C0 * jnp.exp(G[:, -1])[:, :, None, :] + jnp.einsum("bthv,bthk->bhvk", v, k * last)
        Abar_T = jnp.zeros((B, H, 0, 0), q.dtype)
    else:
        if _USES_GRAM:
            kw = k if _IMPORTANCE is None else k * inputs[_IMPORTANCE][..., None]
            Abar = (jnp.exp(G)[..., None, None] * A0[:, None]
                    + jnp.einsum("btih,bihk,bihj->bthkj", decay, kw, k))     # [B, T, H, K, K]
            Abar_T = Abar[:, -1]
        else:
            Abar = jnp.zeros((B, T, H, 0, 0), q.dtype)
            Abar_T = jnp.zeros((B, H, 0, 0), q.dtype)
        x = _precondition_all(q, Abar, *ps)                            # [B, T, H, K]
        scores = jnp.einsum("bthk,bihk->bhti", x, k) * jnp.moveaxis(decay, 3, 1)
        o0 = jnp.exp(G)[..., None] * jnp.einsum("bhvk,bthk->bthv", C0, x)
        Cbar = C0 * jnp.exp(G[:, -1])[:, :, None, None] + jnp.einsum("bthv,bthk->bhvk", v * last[..., None], k)
    finite_v = jnp.isfinite(v)
    o = (jnp.einsum("bhti,bihv->bthv", jnp.where(causal, scores, 0), jnp.where(finite_v, v, 0)) + o0
         + jnp.cumsum(jnp.where(finite_v, 0, v), axis=1))
    return o, State(*_final_all(Cbar, Abar_T, *ps))


def _x_plain(q, ps):
    """x_t = M q_t for a preconditioner that does not read Ā (one GD step), [B, T, H, K]."""
    B, T, H, _ = q.shape
    return _precondition_all(q, jnp.zeros((B, T, H, 0, 0), q.dtype), *ps)
# ==== section: chunk_log_gates ====


def _chunk_log_gates(ps, inputs, B, T, H, live=None):
    """Per-token log forget gates log α_t, [B, T, H] (or [B, T, H, K] per key channel); None for uniform weights.
    A token that is not live (``live`` [B, T], cu_seqlens padding) decays nothing (log α = 0)."""
    if _GATE_PARAM is not None:                                          # a constant decay γ per head
        g = jnp.broadcast_to(jnp.log(ps[_GATE_PARAM]), (B, T, H))
        return g if live is None else jnp.where(live[:, :, None], g, 0)
    if _GATE_INPUT is None:
        return None
    g = inputs[_GATE_INPUT]
    return g if _LOG_GATE is not None else jnp.log(g)
# ==== section: forward_chunked ====


def _chunk_step(Cbar, chunk):
    """One chunk of C tokens for every (batch, head), as masked matmuls.

    Args:
        Cbar: C̄ entering the chunk, [B, H, V, K].
        chunk: (x, k, v) or (x, k, v, log α): x, k [B, C, H, K]; v [B, C, H, V] (importance weights applied);
            log α [B, C, H] or [B, C, H, K].

    Returns:
        (C̄ leaving the chunk [B, H, V, K], o [B, C, H, V]).

    With b_t = G_t − G_start = Σ_{start<j≤t} log α_j (a cumulative sum *within* the chunk, so never far below 0):
        o_t = C̄ (x_t ⊙ exp(b_t)) + Σ_{i≤t} v_i Σ_d x_td k_id exp(b_td − b_id),
        C̄ ← exp(b_end) ⊙ C̄ + Σ_i v_i (k_i ⊙ exp(b_end − b_i))ᵀ      (⊙ on k's channels; a scalar per head
                                                                     when the gate is per head).
    The differences b_t − b_i are masked to i < t before the exp (so every exp is of a number ≤ 0 and a masked
    pair gets exactly 0, also in the backward); nothing is a product of α's. The pairs i = t, and i = end in
    exp(G_end − G_i), take the constant 1 rather than exp(b_t − b_t) (whose O(1) cotangents would reach the
    gates as +x − x and cancel only to round-off, swamping gate gradients as small as the decays), and
    G_end − G_i is a suffix sum of the gates, not a difference.
    """
    x, k, v = chunk[0], chunk[1], chunk[2]
    C = x.shape[1]
    if len(chunk) == 3:                                                 # uniform weights
        causal = jnp.tril(jnp.ones((C, C), dtype=bool))                 # [t, i]: i ≤ t
        scores = jnp.where(causal, jnp.einsum("bthk,bihk->bhti", x, k), 0)
        o = jnp.einsum("bhti,bihv->bthv", scores, v) + jnp.einsum("bhvk,bthk->bthv", Cbar, x)
        return Cbar + jnp.einsum("bthv,bthk->bhvk", v, k), o
    g = chunk[3]
    b = jnp.cumsum(g, axis=1)                                           # [B, C, H(, K)]: G_t − G_start
    diff = b[:, :, None] - b[:, None, :]                                # [B, t, i, H(, K)]: G_t − G_i
    before = jnp.tril(jnp.ones((C, C), dtype=bool), -1).reshape((1, C, C) + (1,) * (diff.ndim - 3))   # i < t
    diagonal = jnp.eye(C, dtype=g.dtype).reshape(before.shape)
    decay = jnp.where(before, jnp.exp(jnp.where(before, diff, 0)), diagonal)   # exp(G_t − G_i); 1 at i = t, 0 above
    rest = jnp.cumsum(g[:, :0:-1], axis=1)[:, ::-1]                     # Σ_{i<j≤end} log α_j for i < end
    last = jnp.concatenate([jnp.exp(rest), jnp.ones_like(g[:, :1])], axis=1)   # exp(G_end − G_i)
    end = jnp.exp(b[:, -1])                                             # exp(G_end − G_start), [B, H(, K)]
    if _PER_CHANNEL:                                                    # the decay sits on k's channels
        scores = jnp.moveaxis(jnp.sum(x[:, :, None] * k[:, None] * decay, axis=-1), 3, 1)   # not an einsum: 4× faster on XLA:CPU
        o_in = jnp.einsum("bhvk,bthk->bthv", Cbar, x * jnp.exp(b))
        Cbar = Cbar * end[:, :, None, :] + jnp.einsum("bthv,bthk->bhvk", v, k * last)
    else:
        scores = jnp.einsum("bthk,bihk->bhti", x, k) * jnp.moveaxis(decay, 3, 1)
        o_in = jnp.exp(b)[..., None] * jnp.einsum("bhvk,bthk->bthv", Cbar, x)
        Cbar = Cbar * end[:, :, None, None] + jnp.einsum("bthv,bthk->bhvk", v * last[..., None], k)
    return Cbar, jnp.einsum("bhti,bihv->bthv", scores, v) + o_in


def _forward_chunked(q, k, v, ps, state, inputs, scale, chunk_size, live=None):
    """Chunkwise-parallel form: o_t = C̄_t x_t (x_t = M q_t, which reads no Gram sums) computed chunk by chunk.

    The sequence is cut into ⌈T/C⌉ chunks of C = min(chunk_size, T) tokens; the tail is padded with neutral
    tokens (x = k = v = 0, log α = 0: they add nothing and decay nothing) whose outputs are dropped. Inside a
    chunk everything is masked matmuls (_chunk_step); a lax.scan over chunks carries C̄ [B, H, V, K] from the
    state entering the chunk to the one leaving it. Per key channel (GLA) the in-chunk scores are
    Σ_d x_td k_id exp(b_td − b_id) with the mask applied before the exp — one [C, C, K] product per chunk and
    head — rather than the factorised (x ⊙ exp(b_t))(k ⊙ exp(−b_i))ᵀ, whose exp(−b_i) overflows (and loses
    the small decays to round-off) once a chunk's cumulative log gate falls below about −88 in float32: with
    strong gates that happens inside a 64-token chunk, and the masked form is exact for any C.

    Backward: the body of the scan is rematerialised (jax.checkpoint), so reverse mode stores only the C̄
    entering each chunk — ⌈T/C⌉ · B·H·K·V numbers, besides the inputs — and recomputes one chunk at a time:
    O(B·H·C·(C·K + K + V)) work arrays with a per-channel gate, O(B·H·C·(C + K + V)) otherwise (no per-token
    state is ever stored, unlike the recurrent form's rematerialised segments).
    """
    q, k = _featurise(q, k, scale, live)                               # padding tokens: k = 0, add nothing
    B, T, H, K = q.shape
    if T == 0:                                                          # nothing to absorb
        return jnp.zeros((B, 0, H, v.shape[-1]), q.dtype), state
    C0 = _stats_all(*state, *ps)[0]                                     # [B, H, V, K]
    if _IMPORTANCE is not None:                                         # β_i weights pair i: scale v_i
        v = v * inputs[_IMPORTANCE][..., None]
    x = _precondition_all(q, jnp.zeros((B, T, H, 0, 0), q.dtype), *ps)   # [B, T, H, K]
    g = _chunk_log_gates(ps, inputs, B, T, H, live)
    C = min(chunk_size, T)
    n = -(-T // C)

    def chunks(a):
        """[B, T, ...] → [n, B, C, ...], the tail padded with zeros (neutral tokens)."""
        a = jnp.pad(a, ((0, 0), (0, n * C - T)) + ((0, 0),) * (a.ndim - 2))
        return jnp.moveaxis(a.reshape((B, n, C) + a.shape[2:]), 1, 0)

    xs = tuple(chunks(a) for a in (x, k, v) + (() if g is None else (g,)))
    Cbar, o = lax.scan(jax.checkpoint(_chunk_step), C0, xs)
    o = jnp.moveaxis(o, 0, 1).reshape((B, n * C, H, o.shape[-1]))[:, :T]
    return o, State(*_final_all(Cbar, jnp.zeros((B, H, 0, 0), q.dtype), *ps))


_CHUNKED_IMPLS = {}


def _chunked_impl(chunk_size):
    """The chunked form with a fixed chunk size as an ``impl`` of _causal_forward, (q, k, v, ps, state, inputs,
    scale, live=None) → (o, State), jitted; one function per size, kept, so that _causal_forward_jit's cache keys on it."""
    if chunk_size not in _CHUNKED_IMPLS:
        _CHUNKED_IMPLS[chunk_size] = jax.jit(
            lambda q, k, v, ps, state, inputs, scale, live=None: _forward_chunked(q, k, v, ps, state, inputs, scale,
                                                                                  chunk_size, live))
    return _CHUNKED_IMPLS[chunk_size]
# ==== section: forward_chunked_delta ====


_GATE_INPUT = __GATE_INPUT__  # index of the forget-gate input, or None
_GATE_PARAM = __GATE_PARAM__  # index of the forget-gate parameter (a constant decay per head), or None
_PER_CHANNEL = __PER_CHANNEL__  # one gate per key channel
_delta_steps = jax.vmap(jax.vmap(jax.vmap(_delta_step_head, in_axes=__DELTA_HEAD_AXES__),
                                 in_axes=__DELTA_BATCH_AXES__), in_axes=__DELTA_BATCH_AXES__)


def _unit_lower_solve(A, R):
    """(I + A)⁻¹ R for a strictly lower-triangular A [..., C, C] and R [..., C, V], by forward substitution one
    row at a time: u_t = r_t − Σ_{i<t} A_ti u_i (rows not yet computed are still 0). Never an inverse; XLA:CPU's
    batched triangular solve is about ten times slower at these sizes."""

    def row(t, U):
        return U.at[..., t, :].set(R[..., t, :] - jnp.einsum("...i,...iv->...v", A[..., t, :], U))

    return lax.fori_loop(0, A.shape[-1], row, jnp.zeros_like(R))


def _delta_chunk_step(S, chunk):
    """One chunk of C tokens of the delta rule for every (batch, head): the WY / UT form.

    Args:
        S: the state entering the chunk, [B, H, K, V].
        chunk: (q, k, v, ε) or (q, k, v, ε, log α): q, k [B, C, H, K] (feature map and scale applied);
            v [B, C, H, V]; ε the effective steps [B, C, H]; log α [B, C, H] or [B, C, H, K].

    Returns:
        (S leaving the chunk [B, H, K, V], o [B, C, H, V]).

    With b_t = Σ_{start≤j≤t} log α_j (cumulative within the chunk) and the decays Γ_{t,i} = exp(b_t − b_i) for
    i ≤ t (per key channel: a [K] vector), the token recursion S' = Γ S, S_t = S' + ε_t k_t (v_t − S'ᵀ k_t)ᵀ
    gives S_t = exp(b_t) ⊙ S + Σ_{i≤t} (Γ_{t,i} ⊙ k_i) u_iᵀ with pseudo-values u_t = ε_t (v_t − S'ᵀ k_t) that solve
    the unit lower-triangular system
        u_t + ε_t Σ_{i<t} ⟨k_t, Γ_{t,i} ⊙ k_i⟩ u_i = ε_t (v_t − Sᵀ (exp(b_t) ⊙ k_t))
    (one triangular solve per chunk and head, _unit_lower_solve); then
        o_t = Sᵀ (exp(b_t) ⊙ q_t) + Σ_{i≤t} ⟨q_t, Γ_{t,i} ⊙ k_i⟩ u_i,
        S ← exp(b_end) ⊙ S + Σ_i (Γ_{end,i} ⊙ k_i) u_iᵀ
    (Yang et al. 2024, Sec. 3; gated: Yang et al. 2025; per key channel as KDA). As in _chunk_step of the gated
    linear layers, the differences b_t − b_i are masked to i < t before the exp, the pairs i = t take the
    constant 1, and b_end − b_i is a suffix sum of the gates: every exp is of a number ≤ 0, nothing is a
    product of α's.
    """
    q, k, v, eps = chunk[0], chunk[1], chunk[2], chunk[3]
    C = k.shape[1]
    causal = jnp.tril(jnp.ones((C, C), dtype=bool))                     # [t, i]: i ≤ t
    before = jnp.tril(jnp.ones((C, C), dtype=bool), -1)                 # i < t
    if len(chunk) == 4:                                                 # no forget gate
        qk = jnp.where(causal, jnp.einsum("bthk,bihk->bhti", q, k), 0)
        kk = jnp.where(before, jnp.einsum("bthk,bihk->bhti", k, k), 0)
        kS, qS, S_kept, k_end = (jnp.einsum("bthk,bhkv->bhtv", k, S), jnp.einsum("bthk,bhkv->bhtv", q, S), S, k)
    else:
        g = chunk[4]
        b = jnp.cumsum(g, axis=1)                                       # [B, C, H(, K)]: b_t
        diff = b[:, :, None] - b[:, None, :]                            # [B, t, i, H(, K)]: b_t − b_i
        mask = before.reshape((1, C, C) + (1,) * (diff.ndim - 3))
        diagonal = jnp.eye(C, dtype=g.dtype).reshape(mask.shape)
        decay = jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0)), diagonal)   # Γ_{t,i}; 1 at i = t, 0 above
        rest = jnp.cumsum(g[:, :0:-1], axis=1)[:, ::-1]                 # Σ_{i<j≤end} log α_j for i < end
        last = jnp.concatenate([jnp.exp(rest), jnp.ones_like(g[:, :1])], axis=1)   # Γ_{end,i}
        end = jnp.exp(b[:, -1])                                         # exp(b_end), [B, H(, K)]
        if _PER_CHANNEL:                                                # the decay sits on k's channels
            qk = jnp.moveaxis(jnp.sum(q[:, :, None] * k[:, None] * decay, axis=-1), 3, 1)   # [B, H, t, i]
            kk = jnp.where(before, jnp.moveaxis(jnp.sum(k[:, :, None] * k[:, None] * decay, axis=-1), 3, 1), 0)
            kS = jnp.einsum("bthk,bhkv->bhtv", k * jnp.exp(b), S)
            qS = jnp.einsum("bthk,bhkv->bhtv", q * jnp.exp(b), S)
            S_kept, k_end = S * end[..., None], k * last
        else:
            dec = jnp.moveaxis(decay, 3, 1)                             # [B, H, t, i]
            qk = jnp.einsum("bthk,bihk->bhti", q, k) * dec
            kk = jnp.where(before, jnp.einsum("bthk,bihk->bhti", k, k) * dec, 0)
            eb = jnp.moveaxis(jnp.exp(b), 1, 2)[..., None]              # [B, H, C, 1]
            kS = eb * jnp.einsum("bthk,bhkv->bhtv", k, S)
            qS = eb * jnp.einsum("bthk,bhkv->bhtv", q, S)
            S_kept, k_end = S * end[:, :, None, None], k * last[..., None]
    e = jnp.moveaxis(eps, 1, 2)[..., None]                              # [B, H, C, 1]
    U = _unit_lower_solve(e * kk, e * (jnp.moveaxis(v, 1, 2) - kS))    # [B, H, C, V]: the pseudo-values
    o = jnp.einsum("bhti,bhiv->bthv", qk, U) + jnp.moveaxis(qS, 1, 2)
    return S_kept + jnp.einsum("bihk,bhiv->bhkv", k_end, U), o


def _forward_chunked(q, k, v, ps, state, inputs, scale, chunk_size, live=None):
    """Chunkwise-parallel form of the delta rule (the WY / UT representation; see _delta_chunk_step).

    The sequence is cut into ⌈T/C⌉ chunks of C = min(chunk_size, T) tokens; the tail is padded with neutral
    tokens (q = k = v = 0, ε = 0, log α = 0: they change nothing) whose outputs are dropped. The effective step
    ε_t of every token comes from the per-head program _delta_step_head (printed from the IR: ε = β for online
    GD). A lax.scan over chunks carries S [B, H, K, V].

    Backward: the body of the scan is rematerialised (jax.checkpoint), so reverse mode stores only the S
    entering each chunk — ⌈T/C⌉ · B·H·K·V numbers, besides the inputs — and recomputes one chunk at a time:
    O(B·H·C·(C·K + K + V)) work arrays with a per-channel gate, O(B·H·C·(C + K + V)) otherwise.
    """
    q, k = _featurise(q, k, scale, live)                               # padding tokens: k = 0, add nothing
    B, T, H, K = q.shape
    if T == 0:                                                          # nothing to absorb
        return jnp.zeros((B, 0, H, v.shape[-1]), q.dtype), state
    eps = _delta_steps(k, *ps, *_recurrent_inputs(inputs))              # [B, T, H]
    g = _chunk_log_gates(ps, inputs, B, T, H, live)
    C = min(chunk_size, T)
    n = -(-T // C)

    def chunks(a):
        """[B, T, ...] → [n, B, C, ...], the tail padded with zeros (neutral tokens)."""
        a = jnp.pad(a, ((0, 0), (0, n * C - T)) + ((0, 0),) * (a.ndim - 2))
        return jnp.moveaxis(a.reshape((B, n, C) + a.shape[2:]), 1, 0)

    xs = tuple(chunks(a) for a in (q, k, v, eps) + (() if g is None else (g,)))
    S, o = lax.scan(jax.checkpoint(_delta_chunk_step), state[0], xs)
    o = jnp.moveaxis(o, 0, 1).reshape((B, n * C, H, o.shape[-1]))[:, :T]
    return o, State(S)


_CHUNKED_IMPLS = {}


def _chunked_impl(chunk_size):
    """The chunked form with a fixed chunk size as an ``impl`` of _causal_forward, (q, k, v, ps, state, inputs,
    scale, live=None) → (o, State), jitted; one function per size, kept, so that _causal_forward_jit's cache keys on it."""
    if chunk_size not in _CHUNKED_IMPLS:
        _CHUNKED_IMPLS[chunk_size] = jax.jit(
            lambda q, k, v, ps, state, inputs, scale, live=None: _forward_chunked(q, k, v, ps, state, inputs, scale,
                                                                                  chunk_size, live))
    return _CHUNKED_IMPLS[chunk_size]
# ==== section: forward_chunked_ridge ====


def _tril_inv(L):
    """L⁻¹ for lower-triangular L [..., n, n] with a nonzero diagonal, by recursive doubling over diagonal blocks:
    [[L₁₁, 0], [L₂₁, L₂₂]]⁻¹ = [[L₁₁⁻¹, 0], [−L₂₂⁻¹ L₂₁ L₁₁⁻¹, L₂₂⁻¹]], every block of one size at once (⌈log₂ n⌉
    rounds of batched matmuls; n is padded with an identity block to a power of two). On XLA:CPU at n = 32..64
    this is 1.5-2× faster than forward substitution one row at a time, and 5-15× faster than the batched
    lax.linalg.triangular_solve."""
    n = L.shape[-1]
    size = 1 << max(n - 1, 0).bit_length()
    lead = L.shape[:-2]
    if size != n:                                                       # [[L, 0], [0, I]]
        L = jnp.pad(L, [(0, 0)] * len(lead) + [(0, size - n)] * 2)
        L = L + jnp.diag(jnp.arange(size) >= n).astype(L.dtype)
    inv = (1 / jnp.diagonal(L, axis1=-2, axis2=-1))[..., None, None]     # [..., size, 1, 1]: 1 × 1 blocks
    s = 1
    while s < size:
        nb = size // (2 * s)
        blocks = jnp.diagonal(L.reshape(lead + (nb, 2 * s, nb, 2 * s)), axis1=-4, axis2=-2)   # [..., 2s, 2s, nb]
        L21 = jnp.moveaxis(blocks, -1, -3)[..., s:, :s]                  # [..., nb, s, s]
        I11, I22 = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        I21 = -I22 @ L21 @ I11
        inv = jnp.concatenate([jnp.concatenate([I11, jnp.zeros_like(I11)], -1),
                               jnp.concatenate([I21, I22], -1)], -2)
        s *= 2
    return inv[..., 0, :n, :n]


def _prefix_ridge_solve(A, k, rhs):
    """Every prefix system of a chunk at once (prefix Woodbury): x_{r,t} = (A + Σ_{j≤t} k_j k_jᵀ)⁻¹ r_{r,t}.

    Args:
        A: [..., K, K] symmetric positive definite (the Gram sums entering the chunk, λI included).
        k: [..., C, K] the chunk's keys, one per row.
        rhs: a tuple of [..., C, K] right-hand sides; row t is solved against the system of prefix t.

    Returns:
        A tuple of [..., C, K], the solutions, row t of each = (A + Σ_{j≤t} k_j k_jᵀ)⁻¹ r_t.

    With P = A⁻¹ (a Cholesky A = L_A L_Aᵀ and L_A⁻¹) and I + K P Kᵀ = L Lᵀ (C × C), the leading t × t block of L
    factors the prefix-t system, so by Woodbury
        x_t = P r_t − Σ_{j≤t} Z_j Y_{j,t},   Y = L⁻¹ (K P Rᵀ),   Zᵀ = L⁻¹ (K P)
    (Y masked to j ≤ t): two Cholesky factorisations (K × K and C × C), the inverses of their triangular factors
    (_tril_inv) and matmuls for all C positions and m right-hand sides; no recurrence over the positions, and
    each chunk starts from a fresh factorisation of A (no rank-one rounding carried over).
    """
    C = k.shape[-2]
    W = _tril_inv(jnp.linalg.cholesky(A))                                           # L_A⁻¹
    P = jnp.einsum("...ji,...jk->...ik", W, W)                                      # A⁻¹ = L_A⁻ᵀ L_A⁻¹
    Pk = jnp.einsum("...cj,...jk->...ck", k, P)                                     # rows (P k_j)ᵀ
    M = jnp.eye(C, dtype=A.dtype) + jnp.einsum("...ik,...jk->...ij", k, Pk)         # I + K P Kᵀ
    L = jnp.linalg.cholesky(M)
    Pr = [jnp.einsum("...tj,...jk->...tk", r, P) for r in rhs]                      # rows (P r_t)ᵀ
    sol = jnp.einsum("...ij,...jm->...im", _tril_inv(L),
                     jnp.concatenate([jnp.einsum("...jk,...tk->...jt", k, x) for x in Pr] + [Pk], axis=-1))
    Zt = sol[..., C * len(rhs):]                                                    # [..., C, K]: rows of Zᵀ
    upper = jnp.triu(jnp.ones((C, C), dtype=bool))                                 # [j, t]: j ≤ t
    return tuple(x - jnp.einsum("...jt,...jk->...tk", jnp.where(upper, sol[..., i * C:(i + 1) * C], 0), Zt)
                 for i, x in enumerate(Pr))


def _ridge_chunks(q, k, v, chunk_size):
    """[B, T, H, ·] → [B, H, n, C, ·] with n = ⌈T/C⌉, C = min(chunk_size, T), the tail padded with zero tokens
    (a zero key adds nothing to the Gram sums, a zero value nothing to the cross sums; their outputs are dropped)."""
    B, T, H, _ = q.shape
    C = min(chunk_size, T)
    n = -(-T // C)

    def cut(a):
        a = jnp.pad(a, ((0, 0), (0, n * C - T), (0, 0), (0, 0)))
        return jnp.moveaxis(a.reshape((B, n, C, H, a.shape[-1])), 3, 1)

    return cut(q), cut(k), cut(v), C


def _ridge_chunk_stats(C0, A0, k, v):
    """Statistics entering every chunk, (C̄_c [B, H, n, V, K], Ā_c [B, H, n, K, K]), and leaving the last,
    (C̄_T, Ā_T): the initial ones plus exclusive prefix sums over chunks of Σ v kᵀ and Σ k kᵀ (k, v chunked)."""
    dC = jnp.einsum("bhncv,bhnck->bhnvk", v, k)
    dA = jnp.einsum("bhnck,bhncj->bhnkj", k, k)
    Cin = C0[:, :, None] + _chunk_prefix(dC, -1)
    Ain = A0[:, :, None] + _chunk_prefix(dA, -1)
    return Cin, Ain, Cin[:, :, -1] + dC[:, :, -1], Ain[:, :, -1] + dA[:, :, -1]


def _chunk_prefix(d, side):
    """Exclusive sums over the chunk axis 2 of d [B, H, n, ...]: over earlier chunks (side −1) or later ones (+1).
    A product with a strictly triangular 0/1 matrix: XLA:CPU's cumsum (a reduce-window) is several times slower."""
    n = d.shape[2]
    mask = (jnp.tril if side < 0 else jnp.triu)(jnp.ones((n, n), d.dtype), side)   # [c, c']: c' before/after c
    return jnp.einsum("mn,bhn...->bhm...", mask, d)


def _ridge_chunk_outputs(Cin, Ain, q, k, v):
    """x_t = Ā_t⁻¹ q_t and o_t = C̄_t x_t for every position of every chunk: x [B, H, n, C, K], o [.., C, V]."""
    (x,) = _prefix_ridge_solve(Ain, k, (q,))
    C = q.shape[-2]
    lower = jnp.tril(jnp.ones((C, C), dtype=bool))                                  # [t, j]: j ≤ t
    o = (jnp.einsum("bhnvk,bhntk->bhntv", Cin, x)
         + jnp.einsum("bhntj,bhnjv->bhntv", jnp.where(lower, jnp.einsum("bhntk,bhnjk->bhntj", x, k), 0), v))
    return x, o


def _ridge_unchunk(a, T):
    """[B, H, n, C, ·] → [B, T, H, ·] (the padded tail dropped)."""
    B, H, n, C = a.shape[:4]
    return jnp.moveaxis(a, 1, 3).reshape((B, n * C, H) + a.shape[4:])[:, :T]


def _ridge_chunked_values(ps, state, q, k, v):
    stats0 = _stats_all(*state, *ps)
    Cin, Ain, CT, AT = _ridge_chunk_stats(*stats0, k, v)
    _, o = _ridge_chunk_outputs(Cin, Ain, q, k, v)
    return (o, State(*_final_all(CT, AT, *ps))), (Cin, Ain, CT, AT)


@jax.custom_vjp
def _ridge_chunked(ps, state, q, k, v):
    """The chunked ridge form on chunked inputs q, k [B, H, n, C, K], v [B, H, n, C, V]: (o [B, H, n, C, V], final
    State), differentiated implicitly (_ridge_chunked_bwd)."""
    return _ridge_chunked_values(ps, state, q, k, v)[0]


def _ridge_chunked_fwd(ps, state, q, k, v):
    out, (Cin, Ain, CT, AT) = _ridge_chunked_values(ps, state, q, k, v)
    return out, (ps, state, q, k, v, Cin, Ain, CT, AT)


def _ridge_chunked_bwd(res, cotangents):
    """Implicit differentiation of o_t = C̄_t Ā_t⁻¹ q_t, chunk by chunk from the stored chunk-boundary statistics.

    With x_t = Ā_t⁻¹ q_t and y_t = Ā_t⁻¹ C̄_tᵀ ḡ_t (one more prefix solve, with the cotangent ḡ_t of o_t, sharing
    the chunk's factorisations): ∂q_t = y_t, ∂C̄_t = ḡ_t x_tᵀ, ∂Ā_t = −y_t x_tᵀ, and since C̄_t, Ā_t are running
    sums, pair i receives the reverse sums Ĉ_i = Σ_{t≥i} ḡ_t x_tᵀ, Â_i = −Σ_{t≥i} y_t x_tᵀ:
        ∂v_i = Ĉ_i k_i,   ∂k_i = Ĉ_iᵀ v_i + (Â_i + Â_iᵀ) k_i,
    inside a chunk as causal-masked [C, C] products, across chunks by reverse prefix sums of each chunk's
    Σ ḡ xᵀ and Σ y xᵀ (the adjoint of a linear solve is a solve with the transposed matrix; here Ā_t is
    symmetric). The final state's cotangent enters through state_from_stats, the reverse sums at the start reach
    the initial state and the parameters through stats_from_state. The factorisations are recomputed from Ā_c
    (never a reverse downdate); stored between forward and backward are only the inputs and the statistics
    entering each chunk.
    """
    ps, state, qc, kc, vc, Cin, Ain, CT, AT = res
    gc, g_final = cotangents                                                        # gc [B, H, n, C, V]
    _, pull_final = jax.vjp(lambda C, A, *p: State(*_final_all(C, A, *p)), CT, AT, *ps)
    gC, gA, *g_ps = pull_final(State(*g_final))
    C = qc.shape[-2]
    lower = jnp.tril(jnp.ones((C, C), dtype=bool))                                  # [t, i]: i ≤ t
    gv = jnp.where(lower, jnp.einsum("bhntv,bhniv->bhnti", gc, vc), 0)            # ḡ_tᵀ v_i
    b = jnp.einsum("bhnvk,bhntv->bhntk", Cin, gc) + jnp.einsum("bhnti,bhnik->bhntk", gv, kc)   # C̄_tᵀ ḡ_t
    x, y = _prefix_ridge_solve(Ain, kc, (qc, b))
    dC = jnp.einsum("bhntv,bhntk->bhnvk", gc, x)                                    # Σ_t ḡ_t x_tᵀ per chunk
    dA = -jnp.einsum("bhntk,bhntj->bhnkj", y, x)                                    # −Σ_t y_t x_tᵀ per chunk
    Ch = gC[:, :, None] + _chunk_prefix(dC, 1)                                     # sums over later chunks
    Ah = gA[:, :, None] + _chunk_prefix(dA, 1)
    xk = jnp.where(lower, jnp.einsum("bhntk,bhnik->bhnti", x, kc), 0)             # x_tᵀ k_i
    yk = jnp.where(lower, jnp.einsum("bhntk,bhnik->bhnti", y, kc), 0)             # y_tᵀ k_i
    dv = jnp.einsum("bhnti,bhntv->bhniv", xk, gc) + jnp.einsum("bhnvk,bhnik->bhniv", Ch, kc)
    dk = (jnp.einsum("bhnti,bhntk->bhnik", gv - yk, x) - jnp.einsum("bhnti,bhntk->bhnik", xk, y)
          + jnp.einsum("bhnvk,bhniv->bhnik", Ch, vc)
          + jnp.einsum("bhnkj,bhnij->bhnik", Ah + jnp.swapaxes(Ah, -1, -2), kc))
    _, pull_stats = jax.vjp(lambda st, *p: _stats_all(*st, *p), state, *ps)
    g_state, *g_ps0 = pull_stats((Ch[:, :, 0] + dC[:, :, 0], Ah[:, :, 0] + dA[:, :, 0]))
    return tuple(a + c for a, c in zip(g_ps, g_ps0)), g_state, y, dk, dv


_ridge_chunked.defvjp(_ridge_chunked_fwd, _ridge_chunked_bwd)


def _forward_chunked(q, k, v, ps, state, inputs, scale, chunk_size, live=None):
    """Exact chunkwise-parallel ridge form: o_t = C̄_t Ā_t⁻¹ q_t for every t, chunk by chunk.

    The sequence is cut into ⌈T/C⌉ chunks of C = min(chunk_size, T) tokens (the tail padded with zero tokens).
    The statistics entering each chunk, C̄_c = C̄₀ + Σ v kᵀ and Ā_c = Ā₀ + Σ k kᵀ (λI included), are prefix sums
    over chunks of the chunks' own sums; inside a chunk every position's prefix system is solved at once by
    _prefix_ridge_solve (a K × K and a C × C Cholesky factorisation per chunk), and
        o_t = C̄_c x_t + Σ_{j≤t in chunk} v_j (k_jᵀ x_t),   x_t = (Ā_c + Σ_{j≤t in chunk} k_j k_jᵀ)⁻¹ q_t.
    All chunks are processed at once (no sequential loop over chunks or tokens). Work per chunk and head:
    O(C²K + CK² + CKV + C³/3 + K³/3). The backward is a custom VJP (implicit differentiation, _ridge_chunked_bwd).

    Activation memory: between forward and backward only the inputs and the statistics entering every chunk are
    kept, ⌈T/C⌉ · B·H·(K² + K·V) numbers (no per-token state); the backward's transient work arrays are
    O(B·H·T·(C + K + V)) (every chunk's [C, C] masks and factors at once).
    """
    q, k = _featurise(q, k, scale, live)                               # cu_seqlens padding: k = 0 adds nothing
    B, T, H, K = q.shape
    if T == 0:                                                          # nothing to absorb
        return jnp.zeros((B, 0, H, v.shape[-1]), q.dtype), state
    qc, kc, vc, _ = _ridge_chunks(q, k, v, chunk_size)
    o, final = _ridge_chunked(tuple(ps), state, qc, kc, vc)
    return _ridge_unchunk(o, T), final


_CHUNKED_IMPLS = {}


def _chunked_impl(chunk_size):
    """The chunked form with a fixed chunk size as an ``impl`` of _causal_forward, (q, k, v, ps, state, inputs,
    scale) → (o, State), jitted; one function per size, kept, so that _causal_forward_jit's cache keys on it."""
    if chunk_size not in _CHUNKED_IMPLS:
        _CHUNKED_IMPLS[chunk_size] = jax.jit(
            lambda q, k, v, ps, state, inputs, scale, live=None: _forward_chunked(q, k, v, ps, state, inputs, scale,
                                                                                  chunk_size, live))
    return _CHUNKED_IMPLS[chunk_size]
# ==== section: forward_chunked_stats ====


def _stats_chunk_step(ps, stats, chunk):
    """One chunk of C tokens for every (batch, head): the statistics at every position, then the layer's own
    preconditioned query x_t = M(Ā_t) q_t per position, as batched matmuls.

    Args:
        ps: the parameters ([H] or [H, K] arrays), as _precondition_all takes them.
        stats: (C̄ [B, H, V, K], Ā [B, H, K, K]) entering the chunk.
        chunk: (q, k, kw, v) or (q, k, kw, v, log α): q, k [B, C, H, K] (after the feature map and scale); kw the
            keys of the Gram sums (k, times the importance weight β_i when there is one); v [B, C, H, V]
            (importance applied); log α [B, C, H].

    Returns:
        ((C̄, Ā) leaving the chunk, o [B, C, H, V]).

    With b_t = Σ_{start<j≤t} log α_j (a cumulative sum within the chunk) and ω_{t,i} = exp(b_t − b_i):
        Ā_t = exp(b_t) Ā + Σ_{i≤t} ω_{t,i} kw_i k_iᵀ,   x_t = M(Ā_t) q_t (_precondition_all),
        o_t = exp(b_t) C̄ x_t + Σ_{i≤t} ω_{t,i} v_i (k_iᵀ x_t),
        (C̄, Ā) ← exp(b_end) (C̄, Ā) + Σ_i ω_{end,i} (v_i k_iᵀ, kw_i k_iᵀ).
    Every weight is exp of a number ≤ 0 (masked to i < t before the exp; i = t and i = end take the constant 1,
    and ω_{end,i} is a suffix sum of the gates, as in _chunk_step), so strong gates underflow to 0 and nothing
    overflows. Each Ā_t is formed from the exact sums and solved afresh (no rank-one update is carried).
    """
    Cbar, Abar = stats
    q, k, kw, v = chunk[:4]
    C = q.shape[1]
    causal = jnp.tril(jnp.ones((C, C), dtype=bool))                     # [t, i]: i ≤ t
    if len(chunk) == 4:                                                 # uniform weights
        decay = jnp.broadcast_to(causal.astype(q.dtype)[None, :, :, None], (q.shape[0], C, C, q.shape[2]))
        start = jnp.ones(q.shape[:3], q.dtype)                          # exp(b_t) = 1
        last = jnp.ones(q.shape[:3], q.dtype)                           # ω_{end,i} = 1
        end = jnp.ones((q.shape[0], q.shape[2]), q.dtype)
    else:
        g = chunk[4]
        b = jnp.cumsum(g, axis=1)                                       # [B, C, H]: G_t − G_start
        diff = b[:, :, None] - b[:, None, :]                            # [B, t, i, H]
        before = jnp.tril(jnp.ones((C, C), dtype=bool), -1)[None, :, :, None]   # i < t
        decay = jnp.where(before, jnp.exp(jnp.where(before, diff, 0)), jnp.eye(C, dtype=g.dtype)[None, :, :, None])
        start = jnp.exp(b)                                              # exp(b_t), [B, C, H]
        rest = jnp.cumsum(g[:, :0:-1], axis=1)[:, ::-1]                 # Σ_{i<j≤end} log α_j for i < end
        last = jnp.concatenate([jnp.exp(rest), jnp.ones_like(g[:, :1])], axis=1)   # ω_{end,i}
        end = jnp.exp(b[:, -1])                                         # [B, H]
    A_t = (start[..., None, None] * Abar[:, None]
           + jnp.einsum("btih,bihk,bihj->bthkj", decay, kw, k))         # [B, C, H, K, K]
    x = _precondition_all(q, A_t, *ps)                               # [B, C, H, K]
    scores = jnp.einsum("bthk,bihk->bhti", x, k) * jnp.moveaxis(decay, 3, 1)
    o = jnp.einsum("bhti,bihv->bthv", scores, v) + start[..., None] * jnp.einsum("bhvk,bthk->bthv", Cbar, x)
    Cbar = end[:, :, None, None] * Cbar + jnp.einsum("bthv,bthk->bhvk", v * last[..., None], k)
    Abar = end[:, :, None, None] * Abar + jnp.einsum("bthk,bthj->bhkj", kw * last[..., None], k)
    return (Cbar, Abar), o


def _forward_chunked(q, k, v, ps, state, inputs, scale, chunk_size, live=None):
    """Chunkwise form over the running statistics: o_t = C̄_t M(Ā_t) q_t, chunk by chunk.

    The sequence is cut into ⌈T/C⌉ chunks of C = min(chunk_size, T) tokens; the tail is padded with neutral
    tokens (q = k = v = 0, log α = 0: they add nothing, decay nothing, and their outputs are dropped). A
    lax.scan over chunks carries the exact statistics (C̄ [B, H, V, K], Ā [B, H, K, K]), starting from those
    the initial state stands for (_stats_all); inside a chunk every position's Ā_t is the decayed Ā entering
    the chunk plus the chunk's decayed, masked Gram sums, and x_t = M(Ā_t) q_t is the layer's own
    preconditioner applied to all C positions at once (_stats_chunk_step); the final state comes from the sums
    leaving the last chunk (_final_all). Work per chunk and head: O(C²·K² + C·K·V) for the sums and outputs
    plus C solves of a K × K system (a Cholesky factorisation, conjugate-gradient iterations, or the GD
    polynomial).

    Backward: reverse-mode autodiff through the scan over chunks, whose body is rematerialised (jax.checkpoint):
    only the statistics entering each chunk are stored, ⌈T/C⌉ · B·H·(K² + K·V) numbers besides the inputs, and
    one chunk's work arrays (its C systems, B·H·C·K² numbers, and [C, C] masks) are recomputed at a time. A
    preconditioner that solves (a Cholesky or conjugate-gradient solve) is differentiated implicitly by its own
    rule (_spd_solve's custom JVP, _cg_solve's lax.custom_linear_solve), never through the factorisation or the
    iterations; a GD polynomial is plain matmuls.
    """
    q, k = _featurise(q, k, scale, live)                               # padding tokens: k = 0, add nothing
    B, T, H, K = q.shape
    if T == 0:                                                          # nothing to absorb
        return jnp.zeros((B, 0, H, v.shape[-1]), q.dtype), state
    stats = _stats_all(*state, *ps)                                     # (C̄₀ [B, H, V, K], Ā₀ [B, H, K, K])
    kw = k
    if _IMPORTANCE is not None:                                         # β_i weights pair i: v_i and k_i k_iᵀ
        v = v * inputs[_IMPORTANCE][..., None]
        kw = k * inputs[_IMPORTANCE][..., None]
    g = _chunk_log_gates(ps, inputs, B, T, H, live)
    C = min(chunk_size, T)
    n = -(-T // C)

    def chunks(a):
        """[B, T, ...] → [n, B, C, ...], the tail padded with zeros (neutral tokens)."""
        a = jnp.pad(a, ((0, 0), (0, n * C - T)) + ((0, 0),) * (a.ndim - 2))
        return jnp.moveaxis(a.reshape((B, n, C) + a.shape[2:]), 1, 0)

    xs = tuple(chunks(a) for a in (q, k, kw, v) + (() if g is None else (g,)))
    body = jax.checkpoint(lambda carry, chunk: _stats_chunk_step(tuple(ps), carry, chunk))
    (Cbar, Abar), o = lax.scan(body, tuple(stats), xs)
    o = jnp.moveaxis(o, 0, 1).reshape((B, n * C, H, o.shape[-1]))[:, :T]
    return o, State(*_final_all(Cbar, Abar, *ps))


_CHUNKED_IMPLS = {}


def _chunked_impl(chunk_size):
    """The chunked form with a fixed chunk size as an ``impl`` of _causal_forward, (q, k, v, ps, state, inputs,
    scale, live=None) → (o, State), jitted; one function per size, kept, so that _causal_forward_jit's cache keys on it."""
    if chunk_size not in _CHUNKED_IMPLS:
        _CHUNKED_IMPLS[chunk_size] = jax.jit(
            lambda q, k, v, ps, state, inputs, scale, live=None: _forward_chunked(q, k, v, ps, state, inputs, scale,
                                                                                  chunk_size, live))
    return _CHUNKED_IMPLS[chunk_size]
# ==== section: nonfinite ====


def _causal_forward(impl, q, k, v, ps, state, inputs, scale, live=None):
    """``impl(q, k, v, ps, state, inputs, scale, live)`` whose outputs and gradients stay causal for non-finite
    inputs. ``live`` ([B, T] bool or None) marks the real tokens of a cu_seqlens batch (see _varlen_pack).

    Plain autodiff multiplies the zero cotangents of positions after the loss by the primal values there, so
    one NaN or inf at position s made every gradient NaN (0·NaN). Here the gradient path runs ``impl`` on the
    inputs with their non-finite entries replaced by finite stand-ins (0 for q, k, v; _INPUT_NEUTRAL for
    per-token inputs; the feature map and scale are applied inside ``impl``, to the stand-ins, so that φ'
    at a non-finite value is never met either), and wherever the recurrence on the inputs as given (``_values``) is non-finite, the
    value is taken from it. Finite inputs skip ``_values`` (lax.cond; under vmap both branches run).

    Result: o[:, t] and every gradient through it depend only on positions ≤ t; gradients of a loss on finite
    outputs are exact; non-finite outputs carry no gradient. Plain JAX (no custom derivative rule), so jit,
    vmap, grad, vjp, jvp, checkpoint and scan compose.
    """
    xs = (q, k, v) + tuple(inputs)
    stand_in = (0.0, 0.0, 0.0) + _INPUT_NEUTRAL
    clean = [jnp.where(jnp.isfinite(x), x, jnp.asarray(c, x.dtype)) for x, c in zip(xs, stand_in)]
    o_c, final_c = impl(clean[0], clean[1], clean[2], ps, state, tuple(clean[3:]), scale, live)
    all_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))
    given = lax.stop_gradient((q, k, v, tuple(ps), state, tuple(inputs), scale))
    o_a, final_a = lax.cond(all_finite, lambda: lax.stop_gradient((o_c, final_c)), lambda: _values(*given, live))
    pick = lambda a, c: jnp.where(jnp.isfinite(a), c, a)  # noqa: E731
    return pick(o_a, o_c), jax.tree.map(pick, final_a, final_c)


_causal_forward_jit = jax.jit(_causal_forward, static_argnums=0)


def _values(q, k, v, ps, state, inputs, scale, live=None):
    """The plain token-by-token recurrence (values only): (o [B, T, H, V], final State)."""
    q, k = _featurise(q, k, scale, live)
    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v) + _recurrent_inputs(inputs))
    final, o = _scan(tuple(ps), state, xs, None if live is None else jnp.swapaxes(live, 0, 1))
    return jnp.swapaxes(o, 0, 1), final
# ==== section: api ====


# ----------------------------------------------------------------------------------------------------
# Public API (docs/contract.md §10).

_COMPUTE_DTYPES = (jnp.float32, jnp.float64)


def _real_floating(name, x):
    """Refuse a non-real-floating array ``x`` (integer, bool, complex) named ``name``; any float width passes."""
    dtype = jnp.asarray(x).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{SPEC_NAME}: {name} must be a real floating-point array (it is cast to q's dtype), "
                         f"got {dtype}")


def _check_domain(what, x, domain):
    """Refuse concrete finite values outside the declared domain ("positive": > 0, "unit_interval": [0, 1],
    "nonpositive": ≤ 0 (a log-space gate), "positive_unit_interval": (0, 1] (a linear-space gate)).
    Traced values (under jit, grad, vmap) cannot be inspected and pass; non-finite values are left to the
    causality rule (see _causal_forward)."""
    if domain == "real":
        return
    x = jnp.asarray(x)
    inside = {"positive": lambda: x > 0, "unit_interval": lambda: (x >= 0) & (x <= 1), "nonpositive": lambda: x <= 0,
              "positive_unit_interval": lambda: (x > 0) & (x <= 1)}[domain]()
    try:
        ok = bool(jnp.all(inside | ~jnp.isfinite(x)))
    except jax.errors.ConcretizationTypeError:
        return
    if not ok:
        try:
            example = f" (e.g. {float(x[~(inside | ~jnp.isfinite(x))].ravel()[0])!r})"
        except jax.errors.ConcretizationTypeError:  # a tracer with a concrete primal (eager grad): no example
            example = ""
        raise ValueError(f"{SPEC_NAME}: {what} has values outside its domain {domain!r}{example}")


def _check(q, k, v, params, inputs, lead):
    """Validate dtypes (the dtype policy: q float32 or float64 sets the compute dtype; k, v, parameters, inputs
    real floating of any width) and shapes of forward's / step's arguments; raise ValueError naming the argument."""
    if not any(q.dtype == d for d in _COMPUTE_DTYPES):
        raise ValueError(f"{SPEC_NAME}: q has dtype {q.dtype}, but q's dtype is the compute dtype and must be float32 "
                         f"or float64; cast with q.astype(jnp.float32)")
    _real_floating("k", k)
    _real_floating("v", v)
    if q.ndim != lead + 1:
        want = "forward expects q, k [B, T, H, K]" if lead == 3 else "step expects q_t, k_t [B, H, K]"
        raise ValueError(f"{SPEC_NAME}: {want} ({lead + 1} axes); got q with {q.ndim} axes, shape {q.shape}")
    if not isinstance(params, dict):
        raise ValueError(f"{SPEC_NAME}: params must be a dict name -> [H] array, got {type(params).__name__}")
    if q.ndim != lead + 1 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1] or v.ndim != q.ndim:
        raise ValueError(f"{SPEC_NAME}: expected q, k [..., H, K] and v [..., H, V] with equal leading axes; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    H = q.shape[-2]
    for n in _PARAM_NAMES:
        if n not in params:
            raise ValueError(f"{SPEC_NAME}: missing parameter {n!r} (expected {list(_PARAM_NAMES)})")
        want = (H, q.shape[-1]) if len(PARAMS[n]["shape"]) == 2 else (H,)
        if jnp.shape(params[n]) != want:
            raise ValueError(f"{SPEC_NAME}: parameter {n!r} must have shape {list(PARAMS[n]['shape'])} = {want}, "
                             f"got {jnp.shape(params[n])}")
        _real_floating(f"parameter {n!r}", params[n])
        _check_domain(f"parameter {n!r}", params[n], PARAMS[n]["domain"])
    unknown = sorted(set(inputs) - set(_INPUT_NAMES))
    missing = sorted(set(_INPUT_NAMES) - set(inputs))
    if unknown or missing:
        raise ValueError(f"{SPEC_NAME}: per-token inputs must be exactly {list(_INPUT_NAMES)}; "
                         f"missing {missing}, unknown {unknown}")
    for n in _INPUT_NAMES:
        channel = {"K": q.shape[-1:], "V": v.shape[-1:]}.get(INPUTS[n]["shape"][-1], ())
        want = q.shape[:-1] + channel
        if jnp.shape(inputs[n]) != want:
            raise ValueError(f"{SPEC_NAME}: input {n!r} must have shape {INPUTS[n]['shape'][3 - lead:]} = {want}, "
                             f"got {jnp.shape(inputs[n])}")
        _real_floating(f"input {n!r}", inputs[n])
        _check_domain(f"input {n!r}", inputs[n], INPUTS[n]["domain"])


def _state_in(state, B, H, K, V, dtype, note=""):
    """The caller's initial state as a State of ``dtype`` arrays, after checking its fields and shapes."""
    if not isinstance(state, (tuple, list)):
        raise ValueError(f"{SPEC_NAME}: initial_state must be a State{State._fields} (a NamedTuple of arrays, e.g. "
                         f"the final state of forward or step), got {type(state).__name__}")
    if len(state) != len(State._fields):
        raise ValueError(f"{SPEC_NAME}: initial_state must have fields {State._fields}, got {len(state)} arrays")
    size = {"K": K, "V": V}
    out = []
    for name, x, dims in zip(State._fields, state, _STATE_DIMS):
        x = jnp.asarray(x)
        want = (B, H) + tuple(size[d] for d in dims)
        if x.shape != want:
            raise ValueError(f"{SPEC_NAME}: initial_state.{name} must have shape {want}, got {x.shape}{note}")
        _real_floating(f"initial_state.{name}", x)
        out.append(x.astype(dtype))
    return State(*out)


def _query_scale(scale, K, dtype):
    """The query scale as a dtype scalar: ``scale``, or DEFAULT_SCALE when None ('inverse_sqrt_dk': K ** -0.5)."""
    if scale is None:
        scale = K ** -0.5 if DEFAULT_SCALE == "inverse_sqrt_dk" else DEFAULT_SCALE
    return jnp.asarray(scale, dtype)


_DEFAULT_CHUNK_SIZE = 64


def _chunk_size(form, chunk_size):
    """The chunk length of form "chunked" as an int (None → 64); None for the other forms, which take no
    chunk size. Raises ValueError for a chunk size that is not a positive int (bool, float, array, 0, negative)
    and for a chunk size given with another form."""
    if form != "chunked":
        if chunk_size is not None:
            raise ValueError(f"{SPEC_NAME}: chunk_size applies to form='chunked' only; got chunk_size={chunk_size!r} "
                             f"with form={form!r} (leave it None)")
        return None
    if chunk_size is None:
        return _DEFAULT_CHUNK_SIZE
    size = None
    if not isinstance(chunk_size, bool) and getattr(chunk_size, "ndim", 0) == 0:
        try:
            size = chunk_size.__index__()
        except (AttributeError, TypeError, jax.errors.ConcretizationTypeError):
            size = None
    if size is None or size < 1:
        raise ValueError(f"{SPEC_NAME}: chunk_size must be a positive int (a static Python integer), got "
                         f"{chunk_size!r}")
    return size


# ==== section: varlen ====
def _varlen_lengths(cu_seqlens, B, T, max_seqlen):
    """Check cu_seqlens (fla's convention) and return (cu int32 [N + 1], N, T_pad).

    T_pad, the static padded length of every sequence, is ``max_seqlen`` (a positive Python int) or T. Concrete
    offsets are checked (0 = cu[0] < cu[1] < … < cu[N] = T, every length ≤ T_pad); traced ones cannot be and
    must satisfy the same (a sequence longer than T_pad would be cut).

    Raises:
        ValueError: B ≠ 1; cu_seqlens not a 1-D integer array of at least two entries; concrete offsets that do
            not start at 0, end at T or increase strictly; max_seqlen not a positive int, or below a length.
    """
    if B != 1:
        raise ValueError(f"{SPEC_NAME}: with cu_seqlens the batch must hold one packed row (B = 1, q [1, T, H, K]); "
                         f"got B = {B}")
    cu = jnp.asarray(cu_seqlens)
    if cu.ndim != 1 or cu.shape[0] < 2 or not jnp.issubdtype(cu.dtype, jnp.integer):
        raise ValueError(f"{SPEC_NAME}: cu_seqlens must be a 1-D integer array [N + 1] of sequence offsets "
                         f"(N ≥ 1), got shape {cu.shape} and dtype {cu.dtype}")
    if max_seqlen is None:
        T_pad = T
    elif isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"{SPEC_NAME}: max_seqlen must be a positive Python int (static) or None, got {max_seqlen!r}")
    else:
        T_pad = max_seqlen
    try:
        offsets = [int(x) for x in jax.device_get(cu)]
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        offsets = None                                                  # traced: cannot be checked
    if offsets is not None:
        if offsets[0] != 0 or offsets[-1] != T:
            raise ValueError(f"{SPEC_NAME}: cu_seqlens must start at 0 and end at T = {T}; got {offsets[0]} … "
                             f"{offsets[-1]}")
        lengths = [b - a for a, b in zip(offsets, offsets[1:])]
        if min(lengths) < 1:
            raise ValueError(f"{SPEC_NAME}: cu_seqlens must increase strictly (no empty sequence); got {offsets}")
        if max(lengths) > T_pad:
            raise ValueError(f"{SPEC_NAME}: max_seqlen = {T_pad} is below the longest sequence ({max(lengths)} tokens)")
    return cu.astype(jnp.int32), cu.shape[0] - 1, T_pad


def _varlen_pack(cu, T_pad, arrays, fills):
    """Scatter the packed tokens into a padded batch: each [1, T, ...] array → [N, T_pad, ...], sequence n in row
    n from position 0, the rest filled with ``fills`` (neutral tokens: q = k = v = 0, a gate of 1, a step size
    or importance of 0). Returns (padded arrays, live [N, T_pad] bool: the real tokens). The impls also zero
    the padding keys after the feature map and neutralise a per-head decay there (``live``), so the state after
    the padding is the state after each sequence's last token."""
    T = arrays[0].shape[1]
    j = jnp.arange(T_pad)
    live = j[None, :] < (cu[1:] - cu[:-1])[:, None]                    # [N, T_pad]
    src = jnp.clip(cu[:-1, None] + j[None, :], 0, T - 1)                # [N, T_pad] packed position of each slot
    out = []
    for x, fill in zip(arrays, fills):
        x = x[0][src]                                                   # [N, T_pad, ...]
        out.append(jnp.where(live.reshape(live.shape + (1,) * (x.ndim - 2)), x, jnp.asarray(fill, x.dtype)))
    return out, live


def _varlen_unpack(cu, o, T):
    """Gather the padded outputs o [N, T_pad, H, V] back to the packed layout [1, T, H, V] (T = cu[N])."""
    t = jnp.arange(T)
    seq = jnp.searchsorted(cu, t, side="right") - 1                    # [T]: the sequence of each packed token
    return o[seq, t - cu[seq]][None]


# ==== section: api_forward ====
def forward(q, k, v, params, *, initial_state=None, output_final_state=False, form="recurrent", scale=None,
            chunk_size=None, cu_seqlens=None, max_seqlen=None, **inputs):
    """Run the layer over a sequence.

    Args:
        q: [B, T, H, K] queries, float32 or float64: q's dtype is the compute dtype.
        k: [B, T, H, K] keys.  v: [B, T, H, V] values.  Real floating, any width; cast to q's dtype.
        params: dict name -> [H] real floating array, constrained space (see PARAMS); cast to q's dtype.
        initial_state: a State ([B, H, ...] real floating fields, cast to q's dtype), or None for the solver's
            default initialisation.
        output_final_state: also return the state after the last token.
        form: one of FORMS; every form computes the same function (to float64 round-off).
        scale: the query scale (fla's meaning: q ← scale · φ(q), φ = FEATURE_MAP, also applied to k); None for
            DEFAULT_SCALE. A Python float or a scalar array.
        chunk_size: tokens per chunk of form "chunked" (a positive Python int, static; None for 64; a chunk
            size above T means one chunk of T tokens). Only form "chunked" takes it: with another form it
            must stay None.
        cu_seqlens: None, or int offsets [N + 1] (fla's convention, 0 = cu[0] < … < cu[N] = T; may be traced)
            of N sequences packed into one row (B = 1). Each sequence starts from its own initial state
            (initial_state then has leading axis N instead of B; None: the default for each) and the final
            state has leading axis N; outputs, final states and gradients equal N separate calls, and no
            sequence sees another (docs/contract.md §10). Computed as a padded batch [N, max_seqlen, ...].
        max_seqlen: with cu_seqlens, a static bound (positive Python int) on every sequence's length, the
            padded length; None for T.
        **inputs: per-token inputs (see INPUTS), each [B, T, H] or per channel [B, T, H, K] / [B, T, H, V],
            real floating; cast to q's dtype. A forget gate is in the space INPUTS states (log: g ≤ 0).

    Returns:
        (o [B, T, H, V], final State or None), both in q's dtype.

    Parameter values are not range-checked (they may be traced): keep them in their domain (PARAMS).
    Causal for any input: o[:, t] and the gradients through it depend on positions ≤ t only, also when a
    later position holds NaN or ±inf.

    Raises:
        ValueError: unknown form; a chunk_size that is not a positive int, or one given with a form other than
            "chunked"; q not float32/float64 (float16, bfloat16, integer, bool, complex: cast with
            q.astype(jnp.float32)); k, v, a parameter, an input or a state field not real floating;
            inconsistent shapes; missing or unknown parameters or inputs; an initial state of the wrong fields
            or shapes (with cu_seqlens: leading axis N); with cu_seqlens: B ≠ 1, offsets not a 1-D integer array
            or (when concrete) not 0 = cu[0] < … < cu[N] = T, a max_seqlen that is not a positive int or is
            below a sequence's length.
    """
    if form not in FORMS:
        raise ValueError(f"{SPEC_NAME}: unknown form {form!r}; this layer offers {FORMS}")
    size = _chunk_size(form, chunk_size)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check(q, k, v, params, inputs, 3)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = q.dtype
    ps = [jnp.asarray(params[n], dtype) for n in _PARAM_NAMES]
    ins = [jnp.asarray(inputs[n], dtype) for n in _INPUT_NAMES]
    impl = (_forward_recurrent if form == "recurrent" else _chunked_impl(size) if form == "chunked"
            else _forward_closed_form)
    if cu_seqlens is None:
        if max_seqlen is not None:
            raise ValueError(f"{SPEC_NAME}: max_seqlen applies with cu_seqlens only; got max_seqlen={max_seqlen!r}")
        state = init_state(B, H, K, V, params, dtype) if initial_state is None else \
            _state_in(initial_state, B, H, K, V, dtype)
        o, final = _causal_forward_jit(impl, q, k.astype(dtype), v.astype(dtype), ps, state, ins,
                                       _query_scale(scale, K, dtype))
        return o, (final if output_final_state else None)
    cu, N, T_pad = _varlen_lengths(cu_seqlens, B, T, max_seqlen)
    state = init_state(N, H, K, V, params, dtype) if initial_state is None else \
        _state_in(initial_state, N, H, K, V, dtype, " (with cu_seqlens the leading axis is N, one per sequence)")
    (q, k, v, *ins), live = _varlen_pack(cu, T_pad, [q, k.astype(dtype), v.astype(dtype)] + ins,
                                         (0.0, 0.0, 0.0) + _INPUT_NEUTRAL)
    o, final = _causal_forward_jit(impl, q, k, v, ps, state, ins, _query_scale(scale, K, dtype), live)
    return _varlen_unpack(cu, o, T), (final if output_final_state else None)


def step(state, q_t, k_t, v_t, params, *, scale=None, **inputs_t):
    """Decode one token.

    Args:
        state: State ([B, H, ...] real floating fields).
        q_t: [B, H, K], float32 or float64 (the compute dtype).  k_t: [B, H, K].  v_t: [B, H, V].
        params: dict name -> [H] array (see PARAMS).  scale: as in forward.
        **inputs_t: per-token inputs, each [B, H] (per channel [B, H, K] / [B, H, V]).
        Everything but q_t: real floating of any width, cast to q_t's dtype.

    Returns:
        (o_t [B, H, V], new State), in q_t's dtype.

    Raises:
        ValueError: q_t not float32/float64 (cast with q_t.astype(jnp.float32)); another argument not real
            floating; inconsistent shapes; missing or unknown parameters or inputs; a state of the wrong
            fields or shapes.
    """
    q_t, k_t, v_t = jnp.asarray(q_t), jnp.asarray(k_t), jnp.asarray(v_t)
    _check(q_t, k_t, v_t, params, inputs_t, 2)
    dtype = q_t.dtype
    ps = [jnp.asarray(params[n], dtype) for n in _PARAM_NAMES]
    ins = [jnp.asarray(inputs_t[n], dtype) for n in _INPUT_NAMES]
    B, H, K = q_t.shape
    state = _state_in(state, B, H, K, v_t.shape[-1], dtype)
    q_t, k_t = _query_scale(scale, K, dtype) * _features(q_t), _features(k_t.astype(dtype))
    return _step_jit(state, q_t, k_t, v_t.astype(dtype), ps, _recurrent_inputs(ins))


_step_jit = jax.jit(_step_batched)

"""Kernel regression (softmax attention): derive and verify the constant model with kernel weights.

The objective (docs/family.md §9, docs/specs.md §2) is, per head and query position t,

    w_t = argmin_w  Σ_{i≤t} κ_{t,i} ½‖v_i − w‖²,   κ_{t,i} = exp(scale · φ(k_i)ᵀ φ(q_t)) · ω_{t,i},

with ω_{t,i} = ∏_{j=i+1}^{t} α_j = exp(Σ_{j=i+1}^{t} g_j) when the weights carry a forget gate (forgetting
attention, Lin et al. 2025), else 1. sympy differentiates one term, collects w (∇ℓ_i = w·(κ_i I) − κ_i v_i) and
solves the stationarity condition Σ_i κ_{t,i} (w − v_i) = 0: w_t = C_t / a_t with a_t = Σ κ_{t,i} and
C_t = Σ κ_{t,i} v_i -- the Nadaraya–Watson estimator (Nadaraya 1964; Watson 1964), i.e. causal softmax attention
(Vaswani et al. 2017) when κ is the exponential kernel.

:func:`verify_kernel` proves, before anything is emitted: the stationarity of the derived minimiser with exact
rationals (κ positive rationals), its uniqueness (the Hessian a_t I is positive definite), the shift invariance
that licenses subtracting the maximum logit, the decay as a sum of log gates, and, in float64, that the derived
form and the blockwise online-softmax recurrence the chunked form runs (running maximum and normaliser; Milakov
& Gimelshein 2018, FlashAttention, Dao et al. 2022) both equal explicitly normalised attention weights computed
with numpy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import sympy as sp
from sympy.matrices.expressions.matexpr import MatrixExpr

from mesagen.errors import DerivationError
from mesagen.spec.schema import Spec
from mesagen.symbolic.algebra import collect_right, gradient, scaled_identity
from mesagen.ir.dims import mat

EXACT_V = 3
EXACT_T = 5
FLOAT_T = 13
FLOAT_DIMS = {"K": 4, "V": 3}
FLOAT_RTOL = 1e-10


@dataclass(frozen=True)
class KernelDerivation:
    """The symbolic result for a constant model with kernel weights (per head; w, v ∈ R^V).

    Attributes:
        spec: the validated spec.
        w, v: the model (V×1) and one value (V×1) as matrix symbols; kappa: the kernel weight κ_{t,i} (> 0).
        loss_term: κ ½ (v − w)ᵀ(v − w), a 1×1 matrix expression.
        grad_term: ∇_w of the loss term, derived by sympy.
        gram_term / cross_term: ∇ℓ = w·gram_term − cross_term (gram_term = κ I).
        a, C: the sums a_t = Σ κ_{t,i} (scalar) and C_t = Σ κ_{t,i} v_i (V×1).
        closed_form: w_t = C_t / a_t, solved from Σ (w·gram − cross) = 0.
        logit: the log kernel weight as an expression of scale, the dot product s = φ(k_i)ᵀφ(q_t) and the
            cumulative log gates G_t, G_i: scale·s (+ G_t − G_i with a forget gate).
        gate: the gate input's name, or None; gate_space: its space (``log`` / ``linear``) or None.
    """

    spec: Spec
    w: sp.MatrixSymbol
    v: sp.MatrixSymbol
    kappa: sp.Symbol
    loss_term: MatrixExpr
    grad_term: MatrixExpr
    gram_term: MatrixExpr
    cross_term: MatrixExpr
    a: sp.Symbol
    C: sp.MatrixSymbol
    closed_form: MatrixExpr
    logit: sp.Expr
    gate: str | None
    gate_space: str | None


#: The symbols of the logit: scale, s = φ(k_i)ᵀφ(q_t), cumulative log gates G_t and G_i.
SCALE, DOT, G_T, G_I = sp.symbols("scale s G_t G_i", real=True)


def derive_kernel(spec: Spec) -> KernelDerivation:
    """Derive w_t for a constant model with kernel weights (see the module docstring).

    Args:
        spec: a validated spec with ``model: {kind: constant}`` and ``weights: {kind: kernel}``.

    Returns:
        The :class:`KernelDerivation`.

    Raises:
        DerivationError: the spec is not kernel regression, or the stationarity condition is not of the form
            w·(κ I) − κ v (names the spec and step).
    """
    if spec.objective.model.kind != "constant" or spec.objective.weights.kind != "kernel":
        raise DerivationError(spec.name, "kernel", "kernel regression needs a constant model with kernel weights")
    w, v = mat("w", "V", 1), mat("v", "V", 1)
    kappa = sp.Symbol("kappa", positive=True)
    loss = kappa * sp.Rational(1, 2) * (v - w).T * (v - w)
    grad = gradient(loss, w)
    try:
        gram, cross = collect_right(grad, w)
    except ValueError as exc:
        raise DerivationError(spec.name, "stationarity", str(exc)) from None
    c = scaled_identity(gram)
    if c is None or sp.simplify(c - kappa) != 0 or (cross - kappa * v).doit() != sp.ZeroMatrix(*cross.shape):
        raise DerivationError(spec.name, "stationarity", f"expected ∇ℓ = w·(κ I) − κ v, got w·({gram}) − {cross}")
    # Σ_i (w κ_i − κ_i v_i) = 0  ⇔  w a_t = C_t  with a_t = Σ κ_i > 0 (the gram sum a_t I is invertible)
    a, C = sp.Symbol("a", positive=True), mat("C", "V", 1)
    closed = C / a
    gate = spec.objective.weights.gate
    logit = SCALE * DOT + (G_T - G_I if gate is not None else 0)
    return KernelDerivation(spec=spec, w=w, v=v, kappa=kappa, loss_term=loss, grad_term=grad, gram_term=gram,
                            cross_term=cross, a=a, C=C, closed_form=closed, logit=logit, gate=gate,
                            gate_space=spec.inputs[gate].space if gate is not None else None)


def _rat(rng: random.Random, lo: int = -5, hi: int = 5, den: int = 4) -> sp.Rational:
    return sp.Rational(rng.randint(lo, hi), rng.randint(1, den))


def _kernel_mean_exact(d: KernelDerivation, kappas: list, vs: list) -> sp.ImmutableMatrix:
    """The derived closed form C/a evaluated exactly for kernel weights ``kappas`` and values ``vs``."""
    a = sum(kappas, sp.Integer(0))
    C = sp.ImmutableMatrix.zeros(EXACT_V, 1)
    for k_, v_ in zip(kappas, vs):
        C = C + k_ * v_
    return sp.ImmutableMatrix(d.closed_form.subs({d.a: a}).subs({d.C: C}).doit())


def _check_failed(d: KernelDerivation, step: str, reason: str) -> DerivationError:
    return DerivationError(d.spec.name, step, reason)


def verify_kernel(d: KernelDerivation, seed: int = 0) -> tuple:
    """Verify the derivation (exact and float64 checks; see the module docstring).

    Args:
        d: the derivation.  seed: seed of the random points (the returned details do not depend on it).

    Returns:
        A tuple of :class:`mesagen.symbolic.verify.Check` (details are facts, never measured numbers).

    Raises:
        DerivationError: a check failed (names the spec and the check).
    """
    from mesagen.symbolic.verify import Check

    rng = random.Random(seed)
    checks = []
    # 1. stationarity, exact: Σ_i ∇ℓ_i(w*) = 0 from the derived per-term gradient, κ_i positive rationals
    for t in range(1, EXACT_T + 1):
        kappas = [sp.Rational(rng.randint(1, 9), rng.randint(1, 5)) for _ in range(t)]
        vs = [sp.ImmutableMatrix(EXACT_V, 1, [_rat(rng) for _ in range(EXACT_V)]) for _ in range(t)]
        ws = _kernel_mean_exact(d, kappas, vs)
        total = sp.ImmutableMatrix.zeros(EXACT_V, 1)
        for k_, v_ in zip(kappas, vs):
            total = total + sp.ImmutableMatrix(d.grad_term.subs({d.kappa: k_}).subs({d.w: ws, d.v: v_}).doit())
        if total != sp.ImmutableMatrix.zeros(EXACT_V, 1):
            raise _check_failed(d, "stationarity", f"Σ ∇ℓ_i(w*) = {total} ≠ 0 at t = {t}")
        # uniqueness: the objective's Hessian is (Σ κ_i) I, positive definite for κ > 0
        if not sum(kappas) > 0:
            raise _check_failed(d, "uniqueness", "Σ κ_i is not positive")
        # shift invariance (what max subtraction relies on): κ_i → c κ_i (c = e^{-m} > 0) leaves w* unchanged
        c = sp.Rational(rng.randint(1, 7), rng.randint(1, 7))
        if _kernel_mean_exact(d, [c * k_ for k_ in kappas], vs) != ws:
            raise _check_failed(d, "shift_invariance", "scaling every κ_i by one positive constant changed w*")
    checks += [Check("stationarity", "exact", f"Σ_i κ_i (w* − v_i) = 0 at w* = C/a for t = 1..{EXACT_T}, V = {EXACT_V}, "
                     "κ_i positive rationals; the Hessian (Σ κ_i) I is positive definite (unique minimiser)"),
               Check("shift_invariance", "exact", "w* is unchanged when every κ_i is scaled by one positive constant "
                     "(subtracting the maximum logit m multiplies κ by e^{-m})")]
    if d.gate is not None:  # ω_{t,i} = ∏_{j=i+1}^{t} α_j = exp(G_t − G_i), G the cumulative sum of log α
        alphas = [sp.Rational(rng.randint(1, 3), 4) for _ in range(EXACT_T + 1)]
        G = [sum((sp.log(a_) for a_ in alphas[1:j + 1]), sp.Integer(0)) for j in range(EXACT_T + 1)]
        for t in range(EXACT_T + 1):
            for i in range(t + 1):
                prod = sp.prod(alphas[i + 1:t + 1]) if t > i else sp.Integer(1)
                if sp.simplify(sp.exp(d.logit.subs({SCALE: 0, G_T: G[t], G_I: G[i]})) - prod) != 0:
                    raise _check_failed(d, "decay", f"exp(G_t − G_i) ≠ ∏ α_j at t = {t}, i = {i}")
        checks.append(Check("decay", "exact", f"exp(logit − scale·s) = exp(G_t − G_i) = ∏_{{j=i+1}}^{{t}} α_j for "
                            f"0 ≤ i ≤ t ≤ {EXACT_T}, α rationals in (0, 1), G the cumulative sum of log α"))
    checks.append(_check_float(d, seed))
    return tuple(checks)


def reference_attention(q, k, v, scale, g=None):
    """Causal (forgetting) softmax attention for one head in float64 numpy, with explicitly normalised weights.

    Args:
        q, k: [T, K]; v: [T, V]; scale: a float; g: [T] log forget gates (≤ 0) or None.

    Returns:
        o [T, V] with o_t = Σ_{i≤t} p_{t,i} v_i, p_{t,i} = exp(l_{t,i} − m_t) / Σ_j exp(l_{t,j} − m_t),
        l_{t,i} = scale·k_iᵀq_t + Σ_{j=i+1}^{t} g_j, m_t = max_{i≤t} l_{t,i}.
    """
    T = q.shape[0]
    out = np.zeros((T, v.shape[1]))
    for t in range(T):
        logits = scale * (k[:t + 1] @ q[t])
        if g is not None:
            logits = logits + np.array([g[i + 1:t + 1].sum() for i in range(t + 1)])
        p = np.exp(logits - logits.max())
        out[t] = (p / p.sum()) @ v[:t + 1]
    return out


def online_softmax(q, k, v, scale, g, block: int):
    """The blockwise online-softmax recurrence of the chunked form for one head, float64 numpy.

    Args:
        q, k: [T, K]; v: [T, V]; scale: a float; g: [T] log gates or None; block: keys per block.

    Returns:
        o [T, V]: per key block, m ← max(m, max_i l_{t,i}), ℓ ← ℓ e^{m_old − m} + Σ_i e^{l_{t,i} − m},
        acc ← acc e^{m_old − m} + Σ_i e^{l_{t,i} − m} v_i over the block's keys i ≤ t; o = acc / ℓ.
    """
    T = q.shape[0]
    G = np.cumsum(g) if g is not None else np.zeros(T)
    m = np.full(T, -np.inf)
    ell = np.zeros(T)
    acc = np.zeros((T, v.shape[1]))
    for s in range(0, T, block):
        idx = np.arange(s, min(s + block, T))
        logits = scale * q @ k[idx].T + (G[:, None] - G[None, idx])
        mask = idx[None, :] <= np.arange(T)[:, None]
        logits = np.where(mask, logits, -np.inf)
        m_new = np.maximum(m, logits.max(axis=1))
        shift = np.where(np.isfinite(m_new), m_new, 0.0)
        p = np.where(mask, np.exp(logits - shift[:, None]), 0.0)
        corr = np.exp(m - shift)
        ell = ell * corr + p.sum(axis=1)
        acc = acc * corr[:, None] + p @ v[idx]
        m = m_new
    return acc / ell[:, None]


def _check_float(d: KernelDerivation, seed: int):
    """float64: the derived C/a (through sympy's lambdify) and the online-softmax recurrence equal
    :func:`reference_attention` at random points with logits up to ~10³ (where exp without max subtraction
    overflows)."""
    from mesagen.symbolic.verify import Check

    rng = np.random.default_rng(seed)
    f_closed = sp.lambdify([d.C, d.a], d.closed_form.subs(d.C, sp.MatrixSymbol("C", FLOAT_DIMS["V"], 1)), "numpy")
    f_logit = sp.lambdify([SCALE, DOT, G_T, G_I], d.logit, "numpy")
    T, K, V = FLOAT_T, FLOAT_DIMS["K"], FLOAT_DIMS["V"]
    worst = 0.0
    for big in (1.0, 300.0):
        q, k, v = (rng.standard_normal((T, n)) for n in (K, K, V))
        q = q * big
        g = np.log(rng.uniform(0.5, 1.0, T)) if d.gate is not None else None
        scale = K ** -0.5
        ref = reference_attention(q, k, v, scale, g)
        G = np.cumsum(g) if g is not None else np.zeros(T)
        derived = np.zeros((T, V))
        for t in range(T):
            logits = np.array([float(f_logit(scale, k[i] @ q[t], G[t], G[i])) for i in range(t + 1)])
            kap = np.exp(logits - logits.max())
            derived[t] = np.asarray(f_closed((kap[:, None] * v[:t + 1]).sum(axis=0)[:, None], kap.sum()),
                                    dtype=float).ravel()
        for out, what in ((derived, "derived C/a"), (online_softmax(q, k, v, scale, g, 4), "online softmax")):
            if not np.all(np.isfinite(out)):
                raise _check_failed(d, "float64", f"{what} is not finite (logit scale {big})")
            err = float(np.max(np.abs(out - ref)) / max(1.0, float(np.max(np.abs(ref)))))
            worst = max(worst, err)
            if err > FLOAT_RTOL:
                raise _check_failed(d, "float64", f"{what} differs from explicitly normalised attention by {err:.3g}")
    return Check("float64", "numeric", f"the derived C/a (sympy lambdify) and the online-softmax recurrence (key blocks "
                 f"of 4) equal explicitly normalised attention weights (numpy) to {FLOAT_RTOL:g} relative, "
                 f"T = {T}, K = {K}, V = {V}, logits of order 1 and 10³", measured=f"{worst:.3g}")

"""Derive a layer's solver from its spec with sympy: objective → gradient → stationarity → closed form →
recursive (solver) form, in the math orientation (W ∈ R^{V×K}).

Each solver is a *rule template* that proposes assignments; :mod:`mesagen.symbolic.verify` proves them
before anything is emitted. Sources: von Oswald et al., arXiv 2309.05858 -- Eq. 10 (mesa layer: ridge
closed form kept by Sherman–Morrison), Prop. 1 (linear attention = one GD step from W = 0); the delta rule
is online GD on the newest term (Widrow–Hoff LMS; Schlag et al. 2021).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
from sympy.matrices.expressions.matexpr import MatrixExpr

from mesagen.errors import DerivationError
from mesagen.ir.records import Assign, KernelForm, Recurrence, StateDecl
from mesagen.spec.schema import Spec
from mesagen.symbolic.algebra import (Tokens, collect_right, gradient, mat, rank_one_factor, scaled_identity)


@dataclass(frozen=True)
class Derivation:
    """The symbolic result for one spec (math orientation, before IR passes).

    Attributes:
        spec: the validated spec.
        tokens: the per-token symbols.
        loss_term: ℓ_i(W), a 1×1 matrix expression.
        regularizer: R(W) as a scalar expression (0 if none).
        grad_term / grad_reg: ∇_W ℓ_i and ∇_W R, derived term by term.
        gram_term / cross_term / gram_reg: the stationarity pieces, ∇ℓ_i = W·gram_term − cross_term and
            ∇R = W·gram_reg; with A = Σ gram_term, C = Σ cross_term the optimum solves W (A + gram_reg) = C.
        closed_form: W* = C (A + gram_reg)⁻¹ when the objective has a unique minimiser, else None.
        recurrence: the solver's recurrent form (math orientation; states W, P, C, A).
        kernel: the parallel form (see :class:`~mesagen.ir.records.KernelForm`), or None.
        transposed_states: states stored transposed (V×K in math → K×V stored), with stored names.
        params: scalar symbols of parameters and inputs by name.
    """

    spec: Spec
    tokens: Tokens
    loss_term: MatrixExpr
    regularizer: sp.Expr
    grad_term: MatrixExpr
    grad_reg: MatrixExpr
    gram_term: MatrixExpr
    cross_term: MatrixExpr
    gram_reg: MatrixExpr
    closed_form: MatrixExpr | None
    recurrence: Recurrence
    kernel: KernelForm | None
    stored_names: dict[str, tuple[str, bool]]
    params: dict[str, sp.Symbol]


def _fail(spec: Spec, step: str, reason: str) -> DerivationError:
    return DerivationError(spec.name, step, reason)


def objective(spec: Spec, tok: Tokens, params: dict[str, sp.Symbol]) -> tuple[MatrixExpr, sp.Expr]:
    """ℓ_i(W) = ½ ‖v_i − W φ(k_i)‖² (a 1×1 matrix) and R(W) (a scalar), from the spec's loss/model/regulariser."""
    W, k, v = tok.W, tok.k, tok.v
    residual = v - W * k  # model: linear, feature map identity
    loss = sp.Rational(1, 2) * residual.T * residual
    reg = spec.objective.regularizer
    R = sp.Integer(0)
    if reg.kind == "ridge":
        R = params[reg.coefficient] / 2 * sp.Trace(W.T * W)
    return loss, R


def derive(spec: Spec) -> Derivation:
    """Run the symbolic stage (no verification; see :func:`mesagen.symbolic.verify.verify`).

    Args:
        spec: a validated spec.

    Returns:
        The :class:`Derivation`.

    Raises:
        DerivationError: a rule's precondition does not hold for this objective (names the spec and step).
    """
    tok = Tokens()
    params = {n: sp.Symbol(n, real=True) for n in list(spec.parameters) + list(spec.inputs)}
    loss, R = objective(spec, tok, params)
    W = tok.W
    g_term = gradient(loss, W)
    g_reg = gradient(R, W) if R != 0 else sp.ZeroMatrix(*W.shape)
    try:
        gram, cross = collect_right(g_term, W)
        gram_reg, cross_reg = collect_right(g_reg, W) if not isinstance(g_reg, sp.ZeroMatrix) else \
            (sp.ZeroMatrix(W.shape[1], W.shape[1]), sp.ZeroMatrix(*W.shape))
    except ValueError as exc:
        raise _fail(spec, "stationarity", str(exc)) from None
    if not isinstance(cross_reg, sp.ZeroMatrix) and cross_reg != sp.ZeroMatrix(*W.shape):
        raise _fail(spec, "stationarity", "the regulariser's gradient has a W-free part; not supported")
    A, C = mat("A", "K", "K"), mat("C", "V", "K")
    lam = scaled_identity(gram_reg)
    closed = C * sp.Inverse(A + gram_reg) if lam is not None and lam != 0 else None

    solver = spec.solver
    u = rank_one_factor(gram)
    if solver.kind == "closed_form":
        if u is None or cross != tok.v * u.T or lam is None or lam == 0:
            raise _fail(spec, "sherman_morrison", "needs ∇ℓ = W u uᵀ − v uᵀ and ∇R = λW with λ > 0")
        rec, kernel = _sherman_morrison(tok, u, lam)
        stored = {"W": ("S", True), "P": ("P", False)}
    elif solver.kind == "gd":
        rec, kernel = _gd(tok, gram, cross, gram_reg, params[solver.step_size], solver.steps)
        stored = {"C": ("kv", True), "A": ("kk", False)}
    else:
        if u is None or cross != tok.v * u.T:
            raise _fail(spec, "online_gd", "needs ∇ℓ = (W u − v) uᵀ (a rank-one error-times-input step)")
        rec, kernel = _online_gd(tok, u, lam, params[solver.step_size])
        stored = {"W": ("S", True)}
    return Derivation(spec=spec, tokens=tok, loss_term=loss, regularizer=R, grad_term=g_term, grad_reg=g_reg,
                      gram_term=gram, cross_term=cross, gram_reg=gram_reg, closed_form=closed, recurrence=rec,
                      kernel=kernel, stored_names=stored, params=params)


# --------------------------------------------------------------------------------------------- rule templates

def _sherman_morrison(tok: Tokens, u: sp.MatrixSymbol, lam: sp.Expr) -> tuple[Recurrence, KernelForm]:
    """Recursive least squares: P_t = (A_t + λI)⁻¹ by Sherman–Morrison, W_t = C_t P_t by the RLS update.

        Pk = P k,   s = 1 + kᵀ P k,   P' = P − Pk s⁻¹ Pkᵀ,   e = v − W k,   W' = W + e s⁻¹ Pkᵀ,   o = W' q.
    """
    W, v, q = tok.W, tok.v, tok.q
    P = mat("P", "K", "K")
    Pk, s, e = mat("Pk", "K", 1), mat("s", 1, 1), mat("e", "V", 1)
    W_new, P_new = mat("W_new", "V", "K"), mat("P_new", "K", "K")
    update = (
        Assign("Pk", P * u, ("K", 1), "P k"),
        Assign("s", sp.Identity(1) + u.T * Pk, (1, 1), "1 + kᵀ P k  (Sherman–Morrison denominator)"),
        Assign("P_new", P - Pk * sp.Inverse(s) * Pk.T, ("K", "K"), "P' = P − P k kᵀ P / s"),
        Assign("e", v - W * u, ("V", 1), "prediction error v − W k"),
        Assign("W_new", W + e * sp.Inverse(s) * Pk.T, ("V", "K"), "W' = W + e (P' k)ᵀ, since P' k = P k / s"),
    )
    readout = (Assign("o", W_new * q, ("V", 1), "o = W' q"),)
    states = (StateDecl("W", ("V", "K"), sp.ZeroMatrix(*W.shape), "W_t = C_t P_t, the ridge solution"),
              StateDecl("P", ("K", "K"), sp.Identity(P.shape[0]) / lam, "P_t = (Σ k kᵀ + λI)⁻¹"))
    A, C = mat("Abar", "K", "K"), mat("Cbar", "V", "K")
    A0 = mat("A0", "K", "K")
    kernel = KernelForm(
        uses_gram=True,
        stats_from_state=(Assign("A0", sp.Inverse(P), ("K", "K"), "Ā₀ = P₀⁻¹ (holds λI)"),
                          Assign("C0", W * A0, ("V", "K"), "C̄₀ = W₀ Ā₀")),
        precondition=(Assign("x", sp.Inverse(A) * q, ("K", 1), "x_t = Ā_t⁻¹ q_t (preconditioned query)"),),
        state_from_stats=(Assign("P_new", sp.Inverse(A), ("K", "K"), "P_T = Ā_T⁻¹"),
                          Assign("W_new", C * P_new, ("V", "K"), "W_T = C̄_T P_T")),
    )
    return Recurrence(states, update, readout, backward="implicit"), kernel


def gd_polynomial(eta: sp.Expr, steps: int) -> list[sp.Expr]:
    """Coefficients d_j of W⁽ⁿ⁾ = C · Σ_j d_j (I − ηĀ)ʲ for n GD steps from W⁰ = 0.

    From W⁽ʲ⁺¹⁾ = W⁽ʲ⁾ − η (W⁽ʲ⁾ Ā − C): p₀ = 0, p_{j+1}(a) = p_j(a)(1 − η a) + η, a polynomial in Ā times C.
    It is expanded in the basis b = 1 − η a of the GD iteration matrix rather than in powers of a: the monomial
    coefficients alternate in sign and grow like binomials (catastrophic cancellation for many steps), while in
    powers of b they are all η and Horner's rule is the (stable) iteration itself.
    """
    a, b = sp.Dummy("a"), sp.Dummy("b")
    p = sp.Integer(0)
    for _ in range(steps):
        p = sp.expand(p * (1 - eta * a) + eta)
    poly = sp.Poly(sp.expand(p.subs(a, (1 - b) / eta)), b)
    return [sp.simplify(poly.coeff_monomial(b**j)) for j in range(steps)]


def _horner(coeffs: list[sp.Expr], eta: sp.Expr, A: MatrixExpr, gram_reg: MatrixExpr, q: sp.MatrixSymbol
            ) -> tuple[Assign, ...]:
    """x = Σ_j d_j (I − ηĀ)ʲ q by Horner's rule with matrix–vector products only (Ā = A + gram_reg)."""
    n = len(coeffs)
    if n == 1:
        return (Assign("x", coeffs[0] * q, ("K", 1), "x = p(Ā) q with p = η (one GD step)"),)
    out = []
    prev = mat(f"x{n - 1}", "K", 1)
    out.append(Assign(prev.name, coeffs[n - 1] * q, ("K", 1), f"Horner: leading coefficient d_{n - 1} q"))
    for j in range(n - 2, -1, -1):
        name = "x" if j == 0 else f"x{j}"
        grad = A * prev + gram_reg * prev if not isinstance(gram_reg, sp.ZeroMatrix) else A * prev
        out.append(Assign(name, prev - eta * grad + coeffs[j] * q, ("K", 1), f"Horner: (I − ηĀ) x + d_{j} q"))
        prev = mat(name, "K", 1)
    return tuple(out)


def _gd(tok: Tokens, gram: MatrixExpr, cross: MatrixExpr, gram_reg: MatrixExpr, eta: sp.Symbol, steps: int
        ) -> tuple[Recurrence, KernelForm]:
    """n steps of full-batch GD from W⁰ = 0, kept as running sums C = Σ cross_term, A = Σ gram_term."""
    q = tok.q
    A, C = mat("A", "K", "K"), mat("C", "V", "K")
    A_new, C_new = mat("A_new", "K", "K"), mat("C_new", "V", "K")
    coeffs = gd_polynomial(eta, steps)
    horner = _horner(coeffs, eta, A_new, gram_reg, q)
    update = (Assign("C_new", C + cross, ("V", "K"), "C' = C + v kᵀ (running sum)"),
              Assign("A_new", A + gram, ("K", "K"), "A' = A + k kᵀ (running sum)"))
    x = mat("x", "K", 1)
    readout = horner + (Assign("o", C_new * x, ("V", 1), f"o = W⁽{steps}⁾ q = C x"),)
    states = (StateDecl("C", ("V", "K"), sp.ZeroMatrix(*C.shape), "C_t = Σ_{i≤t} v_i k_iᵀ"),
              StateDecl("A", ("K", "K"), sp.ZeroMatrix(*A.shape), "A_t = Σ_{i≤t} k_i k_iᵀ"))
    kernel = KernelForm(
        uses_gram=steps > 1,
        stats_from_state=(Assign("C0", C, ("V", "K"), "C̄₀ = C₀"), Assign("A0", A, ("K", "K"), "Ā₀ = A₀")),
        precondition=_horner(coeffs, eta, mat("Abar", "K", "K"), gram_reg, q),
        state_from_stats=(Assign("C_new", mat("Cbar", "V", "K"), ("V", "K"), "C_T = C̄_T"),
                          Assign("A_new", mat("Abar", "K", "K"), ("K", "K"), "A_T = Ā_T")),
    )
    return Recurrence(states, update, readout), kernel


def _online_gd(tok: Tokens, u: sp.MatrixSymbol, lam: sp.Expr | None, beta: sp.Symbol
               ) -> tuple[Recurrence, None]:
    """W' = W − β ∇(ℓ_t + R)(W) = W + β e uᵀ − β λ W with e = v − W u (delta rule when R = 0)."""
    W, v, q = tok.W, tok.v, tok.q
    e = mat("e", "V", 1)
    W_new = mat("W_new", "V", "K")
    step = W + beta * e * u.T
    if lam is not None and lam != 0:
        step = step - beta * lam * W
    update = (Assign("e", v - W * u, ("V", 1), "prediction error v − W k"),
              Assign("W_new", step, ("V", "K"), "W' = W − β ∇ℓ_t(W) = W + β e kᵀ"))
    readout = (Assign("o", W_new * q, ("V", 1), "o = W' q"),)
    states = (StateDecl("W", ("V", "K"), sp.ZeroMatrix(*W.shape), "W_t, the online-GD iterate"),)
    return Recurrence(states, update, readout), None

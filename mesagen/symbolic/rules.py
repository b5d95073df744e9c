"""Solver rules: one :class:`SolverRule` per ``solver.kind`` of the spec language, in the registry :data:`RULES`.

A rule holds everything the compiler knows about one solver:

* ``derive``: the rule template -- from the objective's pieces (gradient split into W·gram − cross, the
  regulariser's coefficient, the forget gate, the step size) to the recurrent form and, where one exists,
  the parallel form (in the math orientation, W ∈ R^{V×K});
* ``exact_target``: what the solver must produce at every t, computed from its *definition* with exact
  rational matrices (the check :mod:`mesagen.symbolic.verify` runs against the derived recurrence);
* ``float_target``: the same in float64 numpy, written out independently of sympy (the float check);
* ``description``: one line for DERIVATION.md and ``mesagen derive``.

An unknown kind is a loud :class:`~mesagen.errors.DerivationError` (:func:`rule_for`), never a silent default.

Sources: von Oswald et al., arXiv 2309.05858 -- Eq. 10 (mesa layer: ridge closed form kept by
Sherman–Morrison), Prop. 1 (linear attention = one GD step from W = 0); online GD on the newest term is the
delta rule (Widrow–Hoff LMS; Schlag et al. 2021), after forgetting the gated delta rule (Yang et al. 2025);
decayed sums are gated linear attention (Yang et al. 2024) and retention (Sun et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import sympy as sp
from sympy.matrices.expressions.matexpr import MatrixExpr

from mesagen.errors import DerivationError
from mesagen.ir.dims import mat
from mesagen.ir.records import Accumulator, Assign, KernelForm, Recurrence, StateDecl
from mesagen.symbolic.algebra import Tokens, evaluate

if TYPE_CHECKING:
    from mesagen.spec.schema import Spec
    from mesagen.symbolic.derive import Derivation


@dataclass(frozen=True)
class Pieces:
    """What the derivation hands a rule template (math orientation).

    Attributes:
        spec: the validated spec.
        tok: the per-token symbols.
        gram, cross, gram_reg: ∇ℓ_i = W·gram − cross and ∇R = W·gram_reg.
        u: the rank-one factor if gram = u uᵀ, else None.
        lam: c if gram_reg = c·I (0 without a regulariser), else None.
        step: the step size's symbol (a scalar Symbol, a V×1 MatrixSymbol for a per-value-channel step size),
            or the number 1.
        gate: the forget gate's symbol (a scalar Symbol, or a K×1 MatrixSymbol per key channel), or None.
    """

    spec: "Spec"
    tok: Tokens
    gram: MatrixExpr
    cross: MatrixExpr
    gram_reg: MatrixExpr
    u: sp.MatrixSymbol | None
    lam: sp.Expr | None
    step: sp.Basic
    gate: sp.Basic | None

    @property
    def channel_gate(self) -> bool:
        """Whether the gate is one per key channel."""
        return isinstance(self.gate, sp.MatrixSymbol)

    def decay(self, M: MatrixExpr) -> MatrixExpr:
        """M after one token's forgetting: α M (scalar gate) or M Diag(α) (per key channel: M's K columns)."""
        if self.gate is None:
            return M
        return M * sp.DiagMatrix(self.gate) if self.channel_gate else self.gate * M


@dataclass(frozen=True)
class SolverRule:
    """Everything the compiler knows about one solver kind (see the module docstring).

    Attributes:
        kind: the spec's ``solver.kind``.
        description: one line, for DERIVATION.md.
        derive: Pieces → (recurrence, parallel form or None, stored names: state → (stored name, transposed)).
        exact_target: (derivation, tokens, values per token) → outputs o_t (rational V×1 matrices).
        float_target: (spec, data) → outputs [T, V] (float64), from numpy only.
    """

    kind: str
    description: str
    derive: Callable[[Pieces], tuple[Recurrence, KernelForm | None, dict[str, tuple[str, bool]]]]
    exact_target: Callable[..., list]
    float_target: Callable[..., np.ndarray]


# --------------------------------------------------------------------------------------- shared target maths

def _weight(d: "Derivation", vals: list[dict], t: int, i: int, rows: int):
    """ω_{t,i} = ∏_{j=i+1}^{t} α_j: a rational (scalar gate, or 1) or a rows × 1 matrix (per key channel)."""
    gate = d.spec.objective.weights.gate if d.spec.objective.weights.kind == "decayed" else None
    if gate is None:
        return sp.Integer(1)
    w = sp.ImmutableMatrix.ones(rows, 1) if isinstance(vals[0][gate], sp.MatrixBase) else sp.Integer(1)
    for j in range(i + 1, t + 1):
        a = vals[j][gate]
        w = sp.ImmutableMatrix(rows, 1, [w[r] * a[r] for r in range(rows)]) if isinstance(a, sp.MatrixBase) else w * a
    return w


def full_gradient(d: "Derivation", W, toks, vals, t: int):
    """∇_W of Σ_{i≤t} ω_{t,i} ℓ_i(W) + R(W), evaluated exactly from the derived per-term gradient (a per-channel ω
    scales k_i). W: a V×K rational matrix; toks / vals: per-token symbols' and inputs' values; t: the last pair.
    Returns a V×K ImmutableMatrix. Raises KeyError for a value missing from ``vals``. Shared by the gd target and
    verify's stationarity check."""
    Kd = toks[0]["k"].shape[0]
    total = evaluate(d.grad_reg, {"W": W, **vals[t]}, _dims(toks))
    for i in range(t + 1):
        w = _weight(d, vals, t, i, Kd)
        tk = dict(toks[i])
        if isinstance(w, sp.MatrixBase):
            tk["k"] = sp.ImmutableMatrix(Kd, 1, [w[r] * tk["k"][r] for r in range(Kd)])
            w = 1
        total = total + w * evaluate(d.grad_term, {"W": W, **tk, **vals[i]}, _dims(toks))
    return total


def _dims(toks) -> dict[str, int]:
    return {"K": toks[0]["k"].shape[0], "V": toks[0]["v"].shape[0]}


def _float_weight(spec: "Spec", data: dict, t: int, i: int):
    """ω_{t,i} in float64: 1.0, a float, or a [K] array."""
    w = spec.objective.weights
    if w.kind != "decayed":
        return 1.0
    g = data[w.gate]
    if np.ndim(g) == 0:  # a parameter: constant decay
        return float(g) ** (t - i)
    return np.prod(g[i + 1: t + 1], axis=0) if t > i else np.ones_like(g[0])


# ---------------------------------------------------------------------------------------- Sherman–Morrison

def _sherman_morrison(pc: Pieces):
    """Recursive least squares: P_t = (A_t + λI)⁻¹ by Sherman–Morrison, W_t = C_t P_t by the RLS update.

        Pk = P k,   s = 1 + kᵀ P k,   P' = P − Pk s⁻¹ Pkᵀ,   e = v − W k,   W' = W + e s⁻¹ Pkᵀ,   o = W' q.
    """
    tok, u, lam = pc.tok, pc.u, pc.lam
    if u is None or pc.cross != tok.v * u.T or lam is None or lam == 0:
        raise DerivationError(pc.spec.name, "sherman_morrison", "needs ∇ℓ = W u uᵀ − v uᵀ and ∇R = λW with λ > 0")
    W, v, q = tok.W, tok.v, tok.q
    P = mat("P", "K", "K")
    Pk, s, e = mat("Pk", "K", 1), mat("s", 1, 1), mat("e", "V", 1)
    update = (
        Assign("Pk", P * u, ("K", 1), "P k"),
        Assign("s", sp.Identity(1) + u.T * Pk, (1, 1), "1 + kᵀ P k  (Sherman–Morrison denominator)"),
        Assign("P_new", P - Pk * sp.Inverse(s) * Pk.T, ("K", "K"), "P' = P − P k kᵀ P / s"),
        Assign("e", v - W * u, ("V", 1), "prediction error v − W k"),
        Assign("W_new", W + e * sp.Inverse(s) * Pk.T, ("V", "K"), "W' = W + e (P' k)ᵀ, since P' k = P k / s"),
    )
    readout = (Assign("o", mat("W_new", "V", "K") * q, ("V", 1), "o = W' q"),)
    states = (StateDecl("W", ("V", "K"), sp.ZeroMatrix(*W.shape), "W_t = C_t P_t, the ridge solution"),
              StateDecl("P", ("K", "K"), sp.Identity(P.shape[0]) / lam, "P_t = (Σ k kᵀ + λI)⁻¹"))
    A, C = mat("Abar", "K", "K"), mat("Cbar", "V", "K")
    A0 = mat("A0", "K", "K")
    kernel = KernelForm(
        accumulators=(Accumulator("Cbar", v * u.T, ("V", "K")), Accumulator("Abar", u * u.T, ("K", "K"))),
        stats_from_state=(Assign("A0", sp.Inverse(P), ("K", "K"), "Ā₀ = P₀⁻¹ (holds λI)"),
                          Assign("C0", W * A0, ("V", "K"), "C̄₀ = W₀ Ā₀")),
        precondition=(Assign("x", sp.Inverse(A) * q, ("K", 1), "x_t = Ā_t⁻¹ q_t (preconditioned query)"),),
        state_from_stats=(Assign("P_new", sp.Inverse(A), ("K", "K"), "P_T = Ā_T⁻¹"),
                          Assign("W_new", C * mat("P_new", "K", "K"), ("V", "K"), "W_T = C̄_T P_T")),
    )
    return Recurrence(states, update, readout), kernel, {"W": ("S", True), "P": ("P", False)}


def _closed_form_exact(d: "Derivation", toks, vals) -> list:
    outs = []
    Kd, Vd = _dims(toks)["K"], _dims(toks)["V"]
    for t in range(len(toks)):
        C = sum((tk["v"] * tk["k"].T for tk in toks[: t + 1]), sp.ImmutableMatrix.zeros(Vd, Kd))
        A = sum((tk["k"] * tk["k"].T for tk in toks[: t + 1]), sp.ImmutableMatrix.zeros(Kd, Kd))
        W = evaluate(d.closed_form, {"A": A, "C": C, **vals[t]}, _dims(toks))
        outs.append(W * toks[t]["q"])
    return outs


def _closed_form_float(spec: "Spec", data: dict) -> np.ndarray:
    ks, vs, qs = data["k"], data["v"], data["q"]
    lam = float(data[spec.objective.regularizer.coefficient])
    out = []
    for t in range(len(ks)):
        A, C = ks[: t + 1].T @ ks[: t + 1], vs[: t + 1].T @ ks[: t + 1]
        out.append(np.linalg.solve(A + lam * np.eye(ks.shape[1]), C.T).T @ qs[t])
    return np.array(out)


# ------------------------------------------------------------------------------------------ full-batch GD

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


def _gd(pc: Pieces):
    """n steps of full-batch GD from W⁰ = 0, kept as (decayed) running sums C = Σ ω cross_i, A = Σ ω gram_i."""
    q = pc.tok.q
    steps = pc.spec.solver.steps
    eta = pc.step
    A, C = mat("A", "K", "K"), mat("C", "V", "K")
    coeffs = gd_polynomial(eta, steps)
    horner = _horner(coeffs, eta, mat("A_new", "K", "K"), pc.gram_reg, q)
    forget = "α " if pc.gate is not None and not pc.channel_gate else ("· Diag(α)" if pc.gate is not None else "")
    c_doc = f"C' = C {forget}+ v kᵀ (running sum)" if pc.channel_gate else f"C' = {forget}C + v kᵀ (running sum)"
    update = (Assign("C_new", pc.decay(C) + pc.cross, ("V", "K"), c_doc),
              Assign("A_new", pc.decay(A) + pc.gram, ("K", "K"),
                     f"A' = {forget}A + k kᵀ (running sum)") if not pc.channel_gate else
              Assign("A_new", A + pc.gram, ("K", "K"), "A' = A + k kᵀ (unused: pruned)"))
    x = mat("x", "K", 1)
    readout = horner + (Assign("o", mat("C_new", "V", "K") * x, ("V", 1), f"o = W⁽{steps}⁾ q = C x"),)
    states = (StateDecl("C", ("V", "K"), sp.ZeroMatrix(*C.shape), "C_t = Σ_{i≤t} ω_{t,i} v_i k_iᵀ"),
              StateDecl("A", ("K", "K"), sp.ZeroMatrix(*A.shape), "A_t = Σ_{i≤t} ω_{t,i} k_i k_iᵀ"))
    decayed = pc.gate is not None
    accs = (Accumulator("Cbar", pc.cross, ("V", "K"), decayed),
            Accumulator("Abar", pc.gram, ("K", "K"), decayed and not pc.channel_gate))
    kernel = KernelForm(
        accumulators=accs,
        stats_from_state=(Assign("C0", C, ("V", "K"), "C̄₀ = C₀"), Assign("A0", A, ("K", "K"), "Ā₀ = A₀")),
        precondition=_horner(coeffs, eta, mat("Abar", "K", "K"), pc.gram_reg, q),
        state_from_stats=(Assign("C_new", mat("Cbar", "V", "K"), ("V", "K"), "C_T = C̄_T"),
                          Assign("A_new", mat("Abar", "K", "K"), ("K", "K"), "A_T = Ā_T")),
    )
    return Recurrence(states, update, readout), kernel, {"C": ("kv", True), "A": ("kk", False)}


def _gd_exact(d: "Derivation", toks, vals) -> list:
    solver = d.spec.solver
    Kd, Vd = _dims(toks)["K"], _dims(toks)["V"]
    outs = []
    for t in range(len(toks)):
        eta = vals[t][solver.step_size] if solver.step_size else 1
        W = sp.ImmutableMatrix.zeros(Vd, Kd)
        for _ in range(solver.steps):
            W = W - eta * full_gradient(d, W, toks, vals, t)
        outs.append(W * toks[t]["q"])
    return outs


def _gd_float(spec: "Spec", data: dict) -> np.ndarray:
    ks, vs, qs = data["k"], data["v"], data["q"]
    solver = spec.solver
    coef = spec.objective.regularizer.coefficient
    lam = float(data[coef]) if coef else 0.0  # R(W) = ½ λ ‖W‖²_F, written out independently of the derivation
    eta = float(data[solver.step_size]) if solver.step_size else 1.0
    imp = spec.objective.weights.importance
    out = []
    for t in range(len(ks)):
        A = np.zeros((ks.shape[1],) * 2)
        C = np.zeros((vs.shape[1], ks.shape[1]))
        for i in range(t + 1):
            w = _float_weight(spec, data, t, i)
            b = float(data[imp][i]) if imp else 1.0
            if np.ndim(w):  # per key channel (one step only): the cross sums with decayed keys
                C += b * np.outer(vs[i], ks[i] * w)
            else:
                A += b * w * np.outer(ks[i], ks[i])
                C += b * w * np.outer(vs[i], ks[i])
        W = np.zeros_like(C)
        for _ in range(solver.steps):
            W = W - eta * (W @ A + lam * W - C)
        out.append(W @ qs[t])
    return np.array(out)


# ---------------------------------------------------------------------------------------------- online GD

def _online_gd(pc: Pieces):
    """Wd = decay(W) (decay first), then W' = Wd − β ∇(ℓ_t + R)(Wd) = Wd + β e kᵀ − β λ Wd, e = v − Wd k.

    A per-value-channel step size multiplies the error: W' = Wd + Diag(β) e kᵀ.
    """
    tok, u, lam = pc.tok, pc.u, pc.lam
    if u is None or pc.cross != tok.v * u.T:
        raise DerivationError(pc.spec.name, "online_gd", "needs ∇ℓ = (W u − v) uᵀ (a rank-one error-times-input step)")
    W, v, q = tok.W, tok.v, tok.q
    e = mat("e", "V", 1)
    update: tuple[Assign, ...] = ()
    Wd = W
    if pc.gate is not None:
        Wd = mat("Wd", "V", "K")
        update += (Assign("Wd", pc.decay(W), ("V", "K"),
                          "decay first: Wd = W Diag(α)" if pc.channel_gate else "decay first: Wd = α W"),)
    beta = pc.step
    scaled_e = sp.DiagMatrix(beta) * e if isinstance(beta, sp.MatrixSymbol) else beta * e
    step = Wd + scaled_e * u.T
    if lam is not None and lam != 0:
        step = step - (sp.DiagMatrix(beta) * Wd * lam if isinstance(beta, sp.MatrixSymbol) else beta * lam * Wd)
    update += (Assign("e", v - Wd * u, ("V", 1), "prediction error v − Wd k"),
               Assign("W_new", step, ("V", "K"), "W' = Wd − β ∇ℓ_t(Wd) = Wd + β e kᵀ"))
    readout = (Assign("o", mat("W_new", "V", "K") * q, ("V", 1), "o = W' q"),)
    states = (StateDecl("W", ("V", "K"), sp.ZeroMatrix(*W.shape), "W_t, the online-GD iterate"),)
    return Recurrence(states, update, readout), None, {"W": ("S", True), "Wd": ("Sd", True)}


def _online_gd_exact(d: "Derivation", toks, vals) -> list:
    solver = d.spec.solver
    gate = d.spec.objective.weights.gate if d.spec.objective.weights.kind == "decayed" else None
    Kd, Vd = _dims(toks)["K"], _dims(toks)["V"]
    W = sp.ImmutableMatrix.zeros(Vd, Kd)
    outs = []
    for t, tk in enumerate(toks):
        if gate is not None:
            a = vals[t][gate]
            W = W * sp.diag(*a) if isinstance(a, sp.MatrixBase) else a * W
        g = evaluate(d.grad_term, {"W": W, **tk, **vals[t]}, _dims(toks)) + \
            evaluate(d.grad_reg, {"W": W, **vals[t]}, _dims(toks))
        beta = vals[t][solver.step_size]
        W = W - (sp.diag(*beta) * g if isinstance(beta, sp.MatrixBase) else beta * g)
        outs.append(W * tk["q"])
    return outs


def _online_gd_float(spec: "Spec", data: dict) -> np.ndarray:
    ks, vs, qs = data["k"], data["v"], data["q"]
    coef = spec.objective.regularizer.coefficient
    lam = float(data[coef]) if coef else 0.0
    w = spec.objective.weights
    W = np.zeros((vs.shape[1], ks.shape[1]))
    out = []
    for t in range(len(ks)):
        if w.kind == "decayed":
            a = data[w.gate]
            W = W * (a[t] if np.ndim(a) else float(a))  # [K] broadcasts over W's columns
        beta = data[spec.solver.step_size]
        beta = beta[t] if spec.solver.step_size in spec.inputs else float(beta)  # per token, or a parameter [H]
        grad = np.outer(W @ ks[t] - vs[t], ks[t]) + lam * W
        W = W - (beta[:, None] * grad if np.ndim(beta) else beta * grad)
        out.append(W @ qs[t])
    return np.array(out)


RULES: dict[str, SolverRule] = {
    "closed_form": SolverRule("closed_form", "the exact ridge minimiser, kept by Sherman–Morrison (RLS) updates",
                              _sherman_morrison, _closed_form_exact, _closed_form_float),
    "gd": SolverRule("gd", "k full-batch GD steps from W = 0: (decayed) running sums and a Horner readout",
                     _gd, _gd_exact, _gd_float),
    "online_gd": SolverRule("online_gd", "one GD step on the newest pair per token (delta rule), after the decay",
                            _online_gd, _online_gd_exact, _online_gd_float),
}
"""The registry: ``solver.kind`` → :class:`SolverRule`."""


def rule_for(spec: "Spec") -> SolverRule:
    """The rule of ``spec.solver.kind``.

    Raises:
        DerivationError: no rule is registered for that kind (names the known kinds).
    """
    kind = spec.solver.kind
    if kind not in RULES:
        raise DerivationError(spec.name, "solver", f"no rule for solver kind {kind!r} (known: {sorted(RULES)})")
    return RULES[kind]

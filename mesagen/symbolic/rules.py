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
from mesagen.symbolic.algebra import Tokens, evaluate, scaled_rank_one
from mesagen.symbolic.delta_chunk import EFFECTIVE_STEPS

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
        reg_decays: the regulariser is forgotten with the data (R_t = ω_{t,0} R; ``decays_with_data``).
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
    reg_decays: bool = False

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
    total = _reg_weight(d, vals, t) * evaluate(d.grad_reg, {"W": W, **vals[t]}, _dims(toks))
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

def _prove_rank_one(pc: Pieces) -> None:
    """Prove that the regularised Gram matrix obeys a rank-one recursion, Ā_t = α_t Ā_{t−1} + c_t u_t u_tᵀ with
    Ā_t = Σ_{i≤t} ω_{t,i} c_i u_i u_iᵀ + R_t, or refuse with the reason and the solvers that do apply.

    The data part obeys it by construction (ω_{t,i} = α_t ω_{t−1,i}); what remains is R_t = α_t R_{t−1}. With
    the regulariser forgotten with the data, R_t = ω_{t,0} R, and ω_{t,0} = α_t ω_{t−1,0}: sympy confirms
    ω_{t,0} R − α_t ω_{t−1,0} R = 0. A regulariser that does not decay (R_t = R) would need R = α_t R, false
    for α_t < 1: Sherman–Morrison cannot keep the exact solution, and the derivation stops.
    """
    if pc.gate is None:
        return
    if pc.channel_gate:
        raise DerivationError(pc.spec.name, "sherman_morrison", "a per-key-channel gate decays Σ k kᵀ on both sides; "
                              "no rank-one recursion keeps its inverse")
    alpha, w_prev = pc.gate, sp.Symbol("omega_prev", positive=True)
    Rm = pc.gram_reg
    R_t, R_prev = (alpha * w_prev * Rm, w_prev * Rm) if pc.reg_decays else (Rm, Rm)
    if sp.simplify((R_t - alpha * R_prev).doit()) != sp.ZeroMatrix(*Rm.shape):
        raise DerivationError(
            pc.spec.name, "sherman_morrison",
            "no rank-one recursion keeps the exact solution: with decayed weights Ā_t = α_t Ā_{t−1} + k_t k_tᵀ needs "
            "the regulariser to decay with the data (R_t = α_t R_{t−1}), but here R_t = R for every t "
            "(objective.regularizer.decays_with_data is false). Solvers that apply: solver {kind: closed_form, "
            "recurrence: cholesky} (running sums and a direct per-position Cholesky solve) or {kind: "
            "conjugate_gradient, max_iterations: N, tolerance: ε}; or set decays_with_data: true (RLS with a "
            "forgetting factor)")


def _sherman_morrison(pc: Pieces):
    """Recursive least squares: P_t = Ā_t⁻¹ by Sherman–Morrison, W_t = C_t P_t by the RLS update, where
    Ā_t = α_t Ā_{t−1} + c k kᵀ (α = 1 without decay; c the importance weight β, or 1) -- see _prove_rank_one:

        Pk = P k,  s = α + c kᵀ P k,  P' = (P − c Pk s⁻¹ Pkᵀ) / α,  e = v − W k,  W' = W + c e s⁻¹ Pkᵀ,  o = W' q.

    (P' k = P k / s, and W' Ā_t = α C_{t−1} + c v kᵀ = C_t.) With α = c = 1 this is the mesa layer's update
    (von Oswald et al. 2023, Eq. 10 and App.); with a forgetting factor it is exponentially weighted RLS.
    """
    tok = pc.tok
    ro = scaled_rank_one(pc.gram)
    reg = pc.gram_reg
    if ro is None or pc.cross != ro[0] * tok.v * ro[1].T or isinstance(reg, sp.ZeroMatrix) or pc.lam == 0:
        raise DerivationError(pc.spec.name, "sherman_morrison",
                              "needs ∇ℓ = c (W u uᵀ − v uᵀ) and ∇R = W Λ with Λ = λI or Diag(λ), λ > 0")
    _prove_rank_one(pc)
    c, u = ro
    alpha = pc.gate if pc.gate is not None else sp.Integer(1)
    W, v, q = tok.W, tok.v, tok.q
    P = mat("P", "K", "K")
    Pk, s, e = mat("Pk", "K", 1), mat("s", 1, 1), mat("e", "V", 1)
    update = (
        Assign("Pk", P * u, ("K", 1), "P k"),
        Assign("s", alpha * sp.Identity(1) + c * u.T * Pk, (1, 1),
               "1 + kᵀ P k  (Sherman–Morrison denominator)" if alpha == 1 and c == 1 else
               "α + c kᵀ P k  (Sherman–Morrison denominator)"),
        Assign("P_new", (P - c * Pk * sp.Inverse(s) * Pk.T) / alpha, ("K", "K"),
               "P' = P − P k kᵀ P / s" if alpha == 1 and c == 1 else "P' = (P − c P k kᵀ P / s) / α"),
        Assign("e", v - W * u, ("V", 1), "prediction error v − W k"),
        Assign("W_new", W + c * e * sp.Inverse(s) * Pk.T, ("V", "K"),
               "W' = W + e (P' k)ᵀ, since P' k = P k / s" if c == 1 else "W' = W + c e (P' k)ᵀ, since P' k = P k / s"),
    )
    readout = (Assign("o", mat("W_new", "V", "K") * q, ("V", 1), "o = W' q"),)
    P0 = sp.Identity(P.shape[0]) / pc.lam if pc.lam is not None else sp.Inverse(reg)
    states = (StateDecl("W", ("V", "K"), sp.ZeroMatrix(*W.shape), "W_t = C_t P_t, the ridge solution"),
              StateDecl("P", ("K", "K"), P0, "P_t = (Σ k kᵀ + λI)⁻¹" if pc.gate is None and c == 1 else
                        "P_t = Ā_t⁻¹, Ā_t = Σ ω_{t,i} c_i k_i k_iᵀ + ω_{t,0} Λ"))
    A, C = mat("Abar", "K", "K"), mat("Cbar", "V", "K")
    A0 = mat("A0", "K", "K")
    decayed = pc.gate is not None
    kernel = KernelForm(
        accumulators=(Accumulator("Cbar", c * v * u.T, ("V", "K"), decayed),
                      Accumulator("Abar", c * u * u.T, ("K", "K"), decayed)),
        stats_from_state=(Assign("A0", sp.Inverse(P), ("K", "K"), "Ā₀ = P₀⁻¹ (holds λI)"),
                          Assign("C0", W * A0, ("V", "K"), "C̄₀ = W₀ Ā₀")),
        precondition=(Assign("x", sp.Inverse(A) * q, ("K", 1), "x_t = Ā_t⁻¹ q_t (preconditioned query)"),),
        state_from_stats=(Assign("P_new", sp.Inverse(A), ("K", "K"), "P_T = Ā_T⁻¹"),
                          Assign("W_new", C * mat("P_new", "K", "K"), ("V", "K"), "W_T = C̄_T P_T")),
    )
    return Recurrence(states, update, readout), kernel, {"W": ("S", True), "P": ("P", False)}


def _running_sums_solve(pc: Pieces):
    """The exact solution from running sums: G_t = α_t G_{t−1} + c v kᵀ, H_t = α_t H_{t−1} + c k kᵀ, and per position
    x_t = (H_t + Λ)⁻¹ q_t, o_t = G_t x_t (W_t = G_t (H_t + Λ)⁻¹). A regulariser that decays with the data lives in
    H (H₀ = Λ, decayed with it) and the solve reads H_t alone. The solve is printed by the backend as a Cholesky
    solve (``closed_form`` / ``cholesky``) or as conjugate gradient (``conjugate_gradient``; MesaNet).
    """
    tok = pc.tok
    ro = scaled_rank_one(pc.gram)
    if ro is None or pc.cross != ro[0] * tok.v * ro[1].T or isinstance(pc.gram_reg, sp.ZeroMatrix):
        raise DerivationError(pc.spec.name, pc.spec.solver.kind,
                              "needs ∇ℓ = c (W u uᵀ − v uᵀ) and ∇R = W Λ with Λ = λI or Diag(λ), λ > 0")
    if pc.channel_gate:
        raise DerivationError(pc.spec.name, pc.spec.solver.kind, "a per-key-channel gate is not supported")
    q = tok.q
    reg = pc.gram_reg
    C, A = mat("C", "V", "K"), mat("A", "K", "K")
    An = mat("A_new", "K", "K")
    system = An if pc.reg_decays else An + reg
    what = "x = H⁻¹ q (H holds the decayed regulariser)" if pc.reg_decays else "x = (H + Λ)⁻¹ q"
    update = (Assign("C_new", pc.decay(C) + pc.cross, ("V", "K"), "G' = α G + c v kᵀ (running sum)"),
              Assign("A_new", pc.decay(A) + pc.gram, ("K", "K"), "H' = α H + c k kᵀ (running sum)"))
    readout = (Assign("x", sp.Inverse(system) * q, ("K", 1), what + ", a linear solve"),
               Assign("o", mat("C_new", "V", "K") * mat("x", "K", 1), ("V", 1), "o = G' x"))
    A0 = reg if pc.reg_decays else sp.ZeroMatrix(*A.shape)
    states = (StateDecl("C", ("V", "K"), sp.ZeroMatrix(*C.shape), "G_t = Σ_{i≤t} ω_{t,i} c_i v_i k_iᵀ"),
              StateDecl("A", ("K", "K"), A0, "H_t = Σ_{i≤t} ω_{t,i} c_i k_i k_iᵀ"
                        + (" + ω_{t,0} Λ" if pc.reg_decays else "")))
    decayed = pc.gate is not None
    Ab = mat("Abar", "K", "K")
    kernel = KernelForm(
        accumulators=(Accumulator("Cbar", pc.cross, ("V", "K"), decayed),
                      Accumulator("Abar", pc.gram, ("K", "K"), decayed)),
        stats_from_state=(Assign("C0", C, ("V", "K"), "C̄₀ = G₀"), Assign("A0", A, ("K", "K"), "Ā₀ = H₀")),
        precondition=(Assign("x", sp.Inverse(Ab if pc.reg_decays else Ab + reg) * q, ("K", 1), what),),
        state_from_stats=(Assign("C_new", mat("Cbar", "V", "K"), ("V", "K"), "G_T = C̄_T"),
                          Assign("A_new", Ab, ("K", "K"), "H_T = Ā_T")),
    )
    return Recurrence(states, update, readout), kernel, {"C": ("kv", True), "A": ("kk", False)}


def _closed_form(pc: Pieces):
    """The closed_form solver: Sherman–Morrison (rank-one) or a direct per-position solve (cholesky)."""
    if pc.spec.solver.recurrence == "cholesky":
        return _running_sums_solve(pc)
    return _sherman_morrison(pc)


def _reg_weight(d: "Derivation", vals: list[dict], t: int):
    """ω_{t,0} = ∏_{j≤t} α_j for a regulariser that decays with the data, else 1."""
    if not d.spec.objective.regularizer.decays_with_data:
        return sp.Integer(1)
    return _weight(d, vals, t, -1, 1)


def _exact_solution(d: "Derivation", toks, vals) -> list:
    """o_t = W_t* q_t with W_t* = C_t (A_t + ω_{t,0}^{[decays]} Λ)⁻¹, C_t = Σ ω_{t,i} β_i v_i k_iᵀ, A_t = Σ ω_{t,i} β_i
    k_i k_iᵀ: the minimiser of the weighted, regularised objective, from its stationarity condition."""
    outs = []
    Kd, Vd = _dims(toks)["K"], _dims(toks)["V"]
    imp = d.spec.objective.weights.importance
    for t in range(len(toks)):
        C, A = sp.ImmutableMatrix.zeros(Vd, Kd), sp.ImmutableMatrix.zeros(Kd, Kd)
        for i in range(t + 1):
            w = _weight(d, vals, t, i, Kd) * (vals[i][imp] if imp else 1)
            C, A = C + w * toks[i]["v"] * toks[i]["k"].T, A + w * toks[i]["k"] * toks[i]["k"].T
        reg = evaluate(d.gram_reg, vals[t], _dims(toks))
        W = C * (A + _reg_weight(d, vals, t) * reg).inv()
        outs.append(W * toks[t]["q"])
    return outs


def _exact_solution_float(spec: "Spec", data: dict) -> np.ndarray:
    ks, vs, qs = data["k"], data["v"], data["q"]
    reg = spec.objective.regularizer
    lam = np.asarray(data[reg.coefficient], dtype=np.float64)
    Lam = np.diag(lam) if lam.ndim else float(lam) * np.eye(ks.shape[1])
    imp = spec.objective.weights.importance
    out = []
    for t in range(len(ks)):
        A, C = np.zeros((ks.shape[1],) * 2), np.zeros((vs.shape[1], ks.shape[1]))
        for i in range(t + 1):
            w = _float_weight(spec, data, t, i) * (float(data[imp][i]) if imp else 1.0)
            A += w * np.outer(ks[i], ks[i])
            C += w * np.outer(vs[i], ks[i])
        r = _float_weight(spec, data, t, -1) if reg.decays_with_data else 1.0
        out.append(np.linalg.solve(A + r * Lam, C.T).T @ qs[t])
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


def _decay_first(W, vals_t: dict, gate: str | None):
    """One token's forgetting of the iterate before its step, exactly: α W, or W Diag(α) per key channel."""
    if gate is None:
        return W
    a = vals_t[gate]
    return W * sp.diag(*a) if isinstance(a, sp.MatrixBase) else a * W


def _online_gd_exact(d: "Derivation", toks, vals) -> list:
    solver = d.spec.solver
    gate = d.spec.objective.weights.gate if d.spec.objective.weights.kind == "decayed" else None
    Kd, Vd = _dims(toks)["K"], _dims(toks)["V"]
    W = sp.ImmutableMatrix.zeros(Vd, Kd)
    outs = []
    for t, tk in enumerate(toks):
        W = _decay_first(W, vals[t], gate)
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


# ------------------------------------------------------------------------------ implicit (proximal) online GD

def proximal_step_size(pc: Pieces) -> sp.Expr:
    """Derive ε(β, kᵀk) of the exact proximal step W = argmin ½‖W − W'‖²_F + β ℓ(W), ℓ(W) = ½‖v − W k‖², with sympy.

    Ansatz W = W' + ε e kᵀ (e = v − W' k; the stationarity condition (W − W') + β ∇ℓ(W) = 0 says W − W' is a
    multiple of (v − W k) kᵀ, a matrix of the form a kᵀ). The condition is written out with explicit symbolic
    entries at d_k = 3, d_v = 2, solved for ε by ``sympy.solve`` (one linear equation), and the solution is
    identified as a function of n = kᵀk alone by substituting k₀² = n − k₁² − k₂². Every entry of the residual is
    then proven zero (``simplify``) with that ε. Returns ε as an expression in the symbols β and n.

    Raises:
        DerivationError: the solve does not give one ε, or ε depends on k other than through kᵀk.
    """
    beta, eps, n = sp.Symbol("beta", positive=True), sp.Symbol("epsilon"), sp.Symbol("n", positive=True)
    k = sp.Matrix(3, 1, sp.symbols("k0:3", real=True))
    v = sp.Matrix(2, 1, sp.symbols("v0:2", real=True))
    Wp = sp.Matrix(2, 3, sp.symbols("w0:6", real=True))
    e = v - Wp * k
    W = Wp + eps * e * k.T
    residual = (W - Wp) + beta * (W * k - v) * k.T             # ∇ of ½‖W − W'‖² + β ½‖v − W k‖²
    sols = sp.solve(residual[0, 0], eps)
    if len(sols) != 1:
        raise DerivationError(pc.spec.name, "implicit_online_gd", f"the proximal condition gives {sols} for ε")
    general = sp.simplify(sols[0].subs(k[0] ** 2, n - k[1] ** 2 - k[2] ** 2))
    if general.free_symbols - {beta, n}:
        raise DerivationError(pc.spec.name, "implicit_online_gd", f"ε = {general} depends on more than β and kᵀk")
    if sp.simplify(residual.subs(eps, general.subs(n, (k.T * k)[0, 0]))) != sp.zeros(2, 3):
        raise DerivationError(pc.spec.name, "implicit_online_gd", "the derived ε does not zero every entry of "
                              "the proximal stationarity condition")
    return general.subs(beta, pc.step) if pc.step is not beta else general


def _proximal_step_matrix(pc: Pieces):
    """(ε as derived, its numerator, its denominator as a 1 × 1 matrix expression in k): ε = num · den⁻¹ with
    den = 1 + β kᵀk affine in n = kᵀk (checked)."""
    eps_expr = proximal_step_size(pc)
    n_sym = sp.Symbol("n", positive=True)
    num, den = sp.fraction(sp.together(eps_expr))
    den_m = den.subs(n_sym, 0) * sp.Identity(1) + sp.diff(den, n_sym) * (pc.tok.k.T * pc.tok.k)
    if sp.simplify(den - den.subs(n_sym, 0) - sp.diff(den, n_sym) * n_sym) != 0:
        raise DerivationError(pc.spec.name, "implicit_online_gd", f"ε = {eps_expr}: denominator not affine in kᵀk")
    return eps_expr, num, den_m


def _implicit_online_gd(pc: Pieces):
    """Wd = decay(W) (decay first), then the exact proximal step W' = Wd + ε e kᵀ, e = v − Wd k, with
    ε = β / (1 + β kᵀk) derived by :func:`proximal_step_size` (the objective of Longhorn, Liu et al. 2024, solved
    exactly; with ε in place of β it is the delta rule, so every 0 < β gives a contraction: 0 < ε kᵀk < 1)."""
    tok, u = pc.tok, pc.u
    if u is None or pc.cross != tok.v * u.T or isinstance(pc.step, sp.MatrixSymbol):
        raise DerivationError(pc.spec.name, "implicit_online_gd", "needs ∇ℓ = (W u − v) uᵀ and a scalar step size")
    eps_expr, num, den_m = _proximal_step_matrix(pc)
    n_sym = sp.Symbol("n", positive=True)
    W, v, q = tok.W, tok.v, tok.q
    e, eps = mat("e", "V", 1), mat("eps", 1, 1)
    update: tuple[Assign, ...] = ()
    Wd = W
    if pc.gate is not None:
        Wd = mat("Wd", "V", "K")
        update += (Assign("Wd", pc.decay(W), ("V", "K"),
                          "decay first: Wd = W Diag(α)" if pc.channel_gate else "decay first: Wd = α W"),)
    update += (Assign("den", den_m, (1, 1), "denominator of ε, affine in kᵀk"),
               Assign("eps", num * sp.Inverse(mat("den", 1, 1)), (1, 1),
                      f"ε = {sp.sstr(eps_expr.subs(n_sym, sp.Symbol('kᵀk')))} (derived from the proximal objective)"),
               Assign("e", v - Wd * u, ("V", 1), "prediction error v − Wd k"),
               Assign("W_new", Wd + e * eps * u.T, ("V", "K"), "W' = Wd + ε e kᵀ (exact proximal step)"))
    readout = (Assign("o", mat("W_new", "V", "K") * q, ("V", 1), "o = W' q"),)
    states = (StateDecl("W", ("V", "K"), sp.ZeroMatrix(*W.shape), "W_t, the proximal online-GD iterate"),)
    return Recurrence(states, update, readout), None, {"W": ("S", True), "Wd": ("Sd", True)}


def _implicit_online_gd_exact(d: "Derivation", toks, vals) -> list:
    """From the definition: W_t = argmin ½‖W − Wd‖² + β ℓ_t(W), i.e. W (I + β k kᵀ) = Wd + β v kᵀ, solved exactly."""
    gate = d.spec.objective.weights.gate if d.spec.objective.weights.kind == "decayed" else None
    Kd, Vd = _dims(toks)["K"], _dims(toks)["V"]
    W = sp.ImmutableMatrix.zeros(Vd, Kd)
    outs = []
    for t, tk in enumerate(toks):
        W = _decay_first(W, vals[t], gate)
        beta = vals[t][d.spec.solver.step_size]
        W = (W + beta * tk["v"] * tk["k"].T) * (sp.eye(Kd) + beta * tk["k"] * tk["k"].T).inv()
        outs.append(W * tk["q"])
    return outs


def _implicit_online_gd_float(spec: "Spec", data: dict) -> np.ndarray:
    ks, vs, qs = data["k"], data["v"], data["q"]
    w = spec.objective.weights
    W = np.zeros((vs.shape[1], ks.shape[1]))
    out = []
    for t in range(len(ks)):
        if w.kind == "decayed":
            a = data[w.gate]
            W = W * (a[t] if np.ndim(a) else float(a))
        beta = data[spec.solver.step_size]
        beta = float(beta[t] if spec.solver.step_size in spec.inputs else beta)
        # the proximal problem's normal equations, solved directly (not through the derived ε)
        W = np.linalg.solve(np.eye(ks.shape[1]) + beta * np.outer(ks[t], ks[t]), (W + beta * np.outer(vs[t], ks[t])).T).T
        out.append(W @ qs[t])
    return np.array(out)


RULES: dict[str, SolverRule] = {
    "closed_form": SolverRule("closed_form", "the exact (weighted) ridge minimiser, kept by Sherman–Morrison (RLS) "
                              "updates or by running sums and a per-position Cholesky solve",
                              _closed_form, _exact_solution, _exact_solution_float),
    "conjugate_gradient": SolverRule("conjugate_gradient", "running sums and, per position, the exact solution's "
                                     "linear system solved by conjugate gradient (checked here as the exact solve "
                                     "it approximates)", _running_sums_solve, _exact_solution, _exact_solution_float),
    "gd": SolverRule("gd", "k full-batch GD steps from W = 0: (decayed) running sums and a Horner readout",
                     _gd, _gd_exact, _gd_float),
    "online_gd": SolverRule("online_gd", "one GD step on the newest pair per token (delta rule), after the decay",
                            _online_gd, _online_gd_exact, _online_gd_float),
    "implicit_online_gd": SolverRule("implicit_online_gd", "the exact proximal step on the newest pair per token "
                                     "(ε = β/(1 + β kᵀk) derived), after the decay", _implicit_online_gd,
                                     _implicit_online_gd_exact, _implicit_online_gd_float),
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


def _implicit_effective_step(pc: Pieces) -> sp.Basic:
    """The effective step of the proximal delta rule for its chunked (WY) form: ε = β (1 + β kᵀk)⁻¹ (1 × 1)."""
    _, num, den_m = _proximal_step_matrix(pc)
    return num * sp.Inverse(den_m)


EFFECTIVE_STEPS["implicit_online_gd"] = _implicit_effective_step

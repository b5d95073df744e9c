"""Derive a layer's solver from its spec with sympy: objective → gradient → stationarity → closed form →
recursive (solver) form, in the math orientation (W ∈ R^{V×K}).

The objective's pieces are computed here; each solver's rule template lives in the registry
:data:`mesagen.symbolic.rules.RULES`, and :mod:`mesagen.symbolic.verify` proves what it proposes before
anything is emitted. Sources: von Oswald et al., arXiv 2309.05858 -- Eq. 10 (mesa layer: ridge closed form kept
by Sherman–Morrison), Prop. 1 (linear attention = one GD step from W = 0); the delta rule is online GD on the
newest term (Widrow–Hoff LMS; Schlag et al. 2021).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
from sympy.matrices.expressions.matexpr import MatrixExpr

from mesagen.errors import DerivationError
from mesagen.ir.records import DeltaChunkForm, KernelForm, Recurrence
from mesagen.spec.schema import Spec
from mesagen.symbolic.algebra import Tokens, collect_right, gradient, mat, rank_one_factor, scaled_identity
from mesagen.symbolic.delta_chunk import delta_chunk_form
from mesagen.symbolic.rules import Pieces, gd_polynomial, rule_for  # noqa: F401 (gd_polynomial re-exported)


@dataclass(frozen=True)
class Derivation:
    """The symbolic result for one spec (math orientation, before IR passes).

    Attributes:
        spec: the validated spec.
        tokens: the per-token symbols.
        loss_term: ℓ_i(W), a 1×1 matrix expression (times the importance weight β_i when the spec has one).
        regularizer: R(W) as a scalar expression (0 if none).
        grad_term / grad_reg: ∇_W ℓ_i and ∇_W R, derived term by term.
        gram_term / cross_term / gram_reg: the stationarity pieces, ∇ℓ_i = W·gram_term − cross_term and
            ∇R = W·gram_reg; with A = Σ gram_term, C = Σ cross_term the optimum solves W (A + gram_reg) = C.
        closed_form: W* = C (A + gram_reg)⁻¹ when the objective has a unique minimiser, else None.
        recurrence: the solver's recurrent form (math orientation; states W, P, C, A).
        kernel: the parallel form (see :class:`~mesagen.ir.records.KernelForm`), or None.
        stored_names: state → (stored name, stored transposed).
        params: the symbols of parameters and inputs by name (a scalar Symbol, or a K×1 / V×1 MatrixSymbol for
            a per-channel input). A forget gate's symbol denotes α (linear space) in every program.
        delta_chunk: the chunked (WY) form of a delta-rule solver, or None
            (:func:`mesagen.symbolic.delta_chunk.delta_chunk_form`).
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
    params: dict[str, sp.Basic]
    delta_chunk: DeltaChunkForm | None = None


def _fail(spec: Spec, step: str, reason: str) -> DerivationError:
    return DerivationError(spec.name, step, reason)


def symbols(spec: Spec) -> dict[str, sp.Basic]:
    """The symbol of every parameter and input: a real Symbol, or a column MatrixSymbol for a per-channel input
    (``[batch, time, heads, d_k]`` → K × 1, ``[..., d_v]`` → V × 1)."""
    out: dict[str, sp.Basic] = {n: mat(n, "K", 1) if tuple(p.shape) == ("heads", "d_k") else sp.Symbol(n, real=True)
                                for n, p in spec.parameters.items()}
    for n, x in spec.inputs.items():
        out[n] = mat(n, {"d_k": "K", "d_v": "V"}[x.shape[3]], 1) if len(x.shape) == 4 else sp.Symbol(n, real=True)
    return out


def objective(spec: Spec, tok: Tokens, params: dict[str, sp.Basic]) -> tuple[MatrixExpr, sp.Expr]:
    """ℓ_i(W) = ½ β_i ‖v_i − W φ(k_i)‖² (a 1×1 matrix; β_i = 1 without importance weights) and R(W) (a scalar).

    φ is applied to q and k by the generated frame, so k here stands for φ(k); the decay ω_{t,i} weights the
    terms in the solver's running sums (see :class:`~mesagen.symbolic.rules.Pieces`).
    """
    W, k, v = tok.W, tok.k, tok.v
    residual = v - W * k
    loss = sp.Rational(1, 2) * residual.T * residual
    imp = spec.objective.weights.importance
    if imp is not None:
        loss = params[imp] * loss
    reg = spec.objective.regularizer
    R = sp.Integer(0)
    if reg.kind == "ridge":
        lam = params[reg.coefficient]
        # per key channel: ½ Σ_d λ_d ‖W_{:,d}‖² = ½ tr(W Λ Wᵀ), Λ = Diag(λ) (sympy's matrix calculus needs Λ as a
        # plain symbol: it is differentiated as _LAMBDA and substituted afterwards, see derive)
        R = sp.Trace(W * _LAMBDA * W.T) / 2 if isinstance(lam, sp.MatrixSymbol) else lam / 2 * sp.Trace(W.T * W)
    return loss, R


#: Stand-in for Diag(λ) of a per-key-channel ridge coefficient while sympy differentiates (see objective).
_LAMBDA = mat("Lambda_", "K", "K")


def _diag_coefficient(expr, spec: Spec, params: dict[str, sp.Basic]):
    """Replace the stand-in Λ by Diag(λ) (a no-op without a per-key-channel ridge coefficient); Λ is diagonal,
    so Λᵀ = Λ and ½(Λ + Λᵀ) = Λ."""
    coef = spec.objective.regularizer.coefficient
    if coef is None or not isinstance(params[coef], sp.MatrixSymbol):
        return expr
    return expr.subs(_LAMBDA.T, _LAMBDA).subs(_LAMBDA, sp.DiagMatrix(params[coef])).doit()


def derive(spec: Spec) -> Derivation:
    """Run the symbolic stage (no verification; see :func:`mesagen.symbolic.verify.verify`).

    Args:
        spec: a validated spec.

    Returns:
        The :class:`Derivation`.

    Raises:
        DerivationError: a rule's precondition does not hold for this objective, or no rule exists for the
            solver kind (names the spec and step).
    """
    tok = Tokens()
    params = symbols(spec)
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
    R, g_reg, gram_reg = (_diag_coefficient(x, spec, params) for x in (R, g_reg, gram_reg))
    A, C = mat("A", "K", "K"), mat("C", "V", "K")
    lam = scaled_identity(gram_reg)
    uniform = spec.objective.weights.kind == "uniform"
    exact = spec.solver.kind in ("closed_form", "conjugate_gradient")
    closed = C * sp.Inverse(A + gram_reg) if exact or (lam is not None and lam != 0 and uniform) else None
    rule = rule_for(spec)
    ss = getattr(spec.solver, "step_size", None)
    gate = spec.objective.weights.gate if not uniform else None
    pieces = Pieces(spec=spec, tok=tok, gram=gram, cross=cross, gram_reg=gram_reg, u=rank_one_factor(gram),
                    lam=lam, step=params[ss] if ss else sp.Integer(1), gate=params[gate] if gate else None,
                    reg_decays=spec.objective.regularizer.decays_with_data)
    rec, kernel, stored = rule.derive(pieces)
    return Derivation(spec=spec, tokens=tok, loss_term=loss, regularizer=R, grad_term=g_term, grad_reg=g_reg,
                      gram_term=gram, cross_term=cross, gram_reg=gram_reg, closed_form=closed, recurrence=rec,
                      kernel=kernel, stored_names=stored, params=params, delta_chunk=delta_chunk_form(pieces))

"""Symbols, matrix-calculus helpers and an exact evaluator for the derivation.

Conventions (one head, one token): fast weights W ∈ R^{V×K}; key k, query q ∈ R^{K×1}; value v ∈ R^{V×1};
scalars that must stay matrices (``kᵀ P k``) are 1 × 1 MatrixSymbols. Dims are the sympy symbols ``K``, ``V``.

sympy 1.14 returns 0 for ``diff`` of a *sum* of trace terms, so :func:`gradient` differentiates one expanded
term at a time and adds the results.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
from sympy.matrices.expressions.matexpr import MatrixExpr

from mesagen.ir.dims import DIMS, K, V, mat  # noqa: F401 (re-exported: the derivation's vocabulary)


@dataclass(frozen=True)
class Tokens:
    """The per-token symbols of one head: W (V×K), k, q (K×1), v (V×1)."""

    W: sp.MatrixSymbol = mat("W", "V", "K")
    k: sp.MatrixSymbol = mat("k", "K", 1)
    q: sp.MatrixSymbol = mat("q", "K", 1)
    v: sp.MatrixSymbol = mat("v", "V", 1)


def gradient(scalar_terms: sp.Expr, W: sp.MatrixSymbol) -> MatrixExpr:
    """∇_W of a scalar objective given as a 1 × 1 matrix expression or a sum of traces, term by term.

    Args:
        scalar_terms: a 1×1 MatrixExpr (e.g. ``½ rᵀ r``) or scalar expression made of ``Trace`` terms.
        W: the matrix to differentiate with respect to.

    Returns:
        The gradient, a matrix expression shaped like W (``ZeroMatrix`` when independent of W).
    """
    expr = scalar_terms
    if isinstance(expr, MatrixExpr):
        expr = sp.expand(expr)
        terms = [sp.Trace(t) for t in sp.Add.make_args(expr)] if not isinstance(expr, sp.MatAdd) else \
            [sp.Trace(t) for t in expr.args]
    else:
        terms = list(sp.Add.make_args(sp.expand(expr)))
    total: MatrixExpr = sp.ZeroMatrix(*W.shape)
    for term in terms:
        if W not in term.free_symbols:
            continue
        g = term.diff(W)
        if not isinstance(g, MatrixExpr):
            raise TypeError(f"sympy returned a non-matrix gradient for term {term}: {type(g).__name__}")
        total = total + g
    return sp.expand(total.doit()) if not isinstance(total, sp.ZeroMatrix) else total


def _factors(term: sp.Basic) -> tuple[sp.Expr, list[sp.Basic]]:
    """Split a product into (scalar coefficient, matrix factors in order)."""
    if isinstance(term, sp.MatMul):
        coeff = sp.Integer(1)
        mats = []
        for a in term.args:
            if isinstance(a, MatrixExpr):
                mats.append(a)
            else:
                coeff *= a
        return coeff, mats
    if isinstance(term, sp.MatrixExpr):
        return sp.Integer(1), [term]
    raise TypeError(f"not a matrix term: {term}")


def collect_right(expr: MatrixExpr, W: sp.MatrixSymbol) -> tuple[MatrixExpr, MatrixExpr]:
    """Write ``expr = W·M − R`` ("collect W, right-invert" rule) and return (M, R).

    Raises:
        ValueError: some term holds W other than as its leftmost factor (the rule does not apply).
    """
    rows, cols = W.shape
    M: MatrixExpr = sp.ZeroMatrix(cols, cols)
    R: MatrixExpr = sp.ZeroMatrix(rows, cols)
    expr = sp.expand(expr)
    terms = expr.args if isinstance(expr, sp.MatAdd) else (expr,)
    for term in terms:
        if isinstance(term, sp.ZeroMatrix):
            continue
        coeff, mats = _factors(term)
        if mats and mats[0] == W and all(W not in m.free_symbols for m in mats[1:]):
            M = M + coeff * (sp.MatMul(*mats[1:]) if len(mats) > 1 else sp.Identity(cols))
        elif W not in term.free_symbols:
            R = R - coeff * sp.MatMul(*mats) if len(mats) > 1 else R - coeff * mats[0]
        else:
            raise ValueError(f"term {term} holds W in a position the right-collect rule cannot solve")
    return M, R


def rank_one_factor(M: MatrixExpr) -> sp.MatrixSymbol | None:
    """Return u if M == u uᵀ for a column MatrixSymbol u (the Sherman–Morrison precondition), else None."""
    coeff, mats = _factors(M) if not isinstance(M, sp.MatAdd) else (None, [])
    if coeff == 1 and len(mats) == 2 and isinstance(mats[0], sp.MatrixSymbol) and mats[1] == mats[0].T:
        return mats[0]
    return None


def scaled_rank_one(M: MatrixExpr) -> tuple[sp.Expr, sp.MatrixSymbol] | None:
    """Return (c, u) if M == c·u uᵀ for a column MatrixSymbol u and a scalar c (an importance weight β, or 1),
    else None (the precondition of a weighted Sherman–Morrison step)."""
    coeff, mats = _factors(M) if not isinstance(M, sp.MatAdd) else (None, [])
    if coeff is not None and len(mats) == 2 and isinstance(mats[0], sp.MatrixSymbol) and mats[1] == mats[0].T:
        return coeff, mats[0]
    return None


def scaled_identity(M: MatrixExpr) -> sp.Expr | None:
    """Return c if M == c·I (c a scalar expression), 0 for a ZeroMatrix, else None."""
    if isinstance(M, sp.ZeroMatrix):
        return sp.Integer(0)
    coeff, mats = _factors(M) if not isinstance(M, sp.MatAdd) else (None, [])
    if len(mats) == 1 and isinstance(mats[0], sp.Identity):
        return coeff
    return None


# --------------------------------------------------------------------------------------------- evaluation

def evaluate(expr: sp.Basic, env: dict[str, object], dims: dict[str, int]) -> sp.ImmutableMatrix | sp.Expr:
    """Exactly evaluate a matrix expression with explicit matrices (rationals stay rationals).

    Args:
        expr: a sympy matrix expression over MatrixSymbols and scalar Symbols.
        env: name → ``ImmutableMatrix`` (for MatrixSymbols) or number (for scalar Symbols).
        dims: concrete values of ``K`` and ``V``.

    Returns:
        An explicit ``ImmutableMatrix`` (or a scalar for scalar expressions).

    Raises:
        KeyError: a symbol has no value in ``env``.
        TypeError: an expression node this evaluator does not know.
    """
    sizes = {K: dims["K"], V: dims["V"]}

    def size(d):
        return int(d.subs(sizes)) if isinstance(d, sp.Basic) else int(d)

    def ev(e):
        if isinstance(e, sp.MatrixSymbol):
            return sp.ImmutableMatrix(env[e.name])
        if isinstance(e, sp.Identity):
            return sp.ImmutableMatrix.eye(size(e.rows))
        if isinstance(e, sp.ZeroMatrix):
            return sp.ImmutableMatrix.zeros(size(e.rows), size(e.cols))
        if isinstance(e, sp.MatAdd):
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out + ev(a)
            return out
        if isinstance(e, sp.MatMul):
            out = None
            scalar = sp.Integer(1)
            for a in e.args:
                if isinstance(a, MatrixExpr):
                    val = ev(a)
                    out = val if out is None else out * val
                else:
                    scalar *= ev(a)
            return scalar * out
        if isinstance(e, sp.DiagMatrix):
            vec = ev(e.args[0])
            return sp.ImmutableMatrix(sp.diag(*[vec[i] for i in range(vec.shape[0])]))
        if isinstance(e, sp.Transpose):
            return ev(e.arg).T
        if isinstance(e, sp.Inverse):
            return ev(e.arg).inv()
        if isinstance(e, sp.MatPow):
            return ev(e.base) ** int(e.exp)
        if isinstance(e, sp.Symbol):
            return sp.nsimplify(env[e.name]) if not isinstance(env[e.name], sp.Basic) else env[e.name]
        if isinstance(e, (sp.Number, sp.NumberSymbol)):
            return e
        if isinstance(e, (sp.Add, sp.Mul, sp.Pow)):
            return e.func(*[ev(a) for a in e.args])
        raise TypeError(f"cannot evaluate node {type(e).__name__}: {e}")

    return ev(expr)


def run_program(assigns, env: dict[str, object], dims: dict[str, int]) -> dict[str, object]:
    """Evaluate a sequence of :class:`~mesagen.ir.records.Assign` exactly, returning the extended env.

    Raises:
        KeyError, TypeError: as :func:`evaluate`.
    """
    env = dict(env)
    for a in assigns:
        env[a.target] = evaluate(a.expr, env, dims)
    return env

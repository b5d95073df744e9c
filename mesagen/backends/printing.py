"""Matrix-expression printing for array targets (JAX), inheriting scalar printing from sympy.

:class:`ArrayPrinter` prints the IR's per-head matrix expressions as array code with ``@``:

* a product is parenthesised in the cheapest order (matrix-chain dynamic programme with d_k = d_v ≫ 1),
  so ``P k kᵀ P`` becomes ``(P @ k) @ (k.T @ P)`` (O(K²)) rather than ``((P @ k) @ k.T) @ P`` (O(K³));
* 1 × 1 factors (Sherman–Morrison denominators) become scalar multiplications / divisions;
* ``Inverse(X) @ rest`` becomes a linear solve, never an explicit inverse;
* ``Identity(1)`` in a sum is the number 1; ``Identity(K)`` is ``eye(K)``; ``ZeroMatrix`` is ``zeros``.

Built with ``strict=True``: an expression node without a printing rule raises instead of printing a comment.
"""

from __future__ import annotations

import sympy as sp
from sympy.matrices.expressions.matexpr import MatrixExpr
from sympy.printing.numpy import JaxPrinter

from mesagen.ir.dims import K, V

_LARGE = {K: 64, V: 64}


def _size(d) -> int:
    return int(sp.sympify(d).subs(_LARGE))


def is_scalar_matrix(e: sp.Basic) -> bool:
    """True for 1 × 1 matrix expressions (treated as scalars by the printers)."""
    return isinstance(e, MatrixExpr) and e.shape == (1, 1)


def chain_order(shapes: list[tuple[int, int]]) -> object:
    """Optimal parenthesisation of a matrix chain: nested tuples of factor indices (classic DP, O(n³))."""
    n = len(shapes)
    cost = [[0] * n for _ in range(n)]
    split = [[0] * n for _ in range(n)]
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            best = None
            for s in range(i, j):
                c = cost[i][s] + cost[s + 1][j] + shapes[i][0] * shapes[s][1] * shapes[j][1]
                if best is None or c < best:
                    best, split[i][j] = c, s
            cost[i][j] = best

    def build(i, j):
        return i if i == j else (build(i, split[i][j]), build(split[i][j] + 1, j))

    return build(0, n - 1)


class ArrayPrinter(JaxPrinter):
    """Prints per-head IR expressions as JAX array code (``jnp`` alias), one expression at a time.

    Args:
        dtype_name: the name of the variable holding the dtype in the generated function (for ``eye``/``zeros``).
        spd: every ``Inverse`` the expressions hold is of a symmetric positive-definite matrix (the ridge family:
            Ā = Σ k kᵀ + λI with λ > 0, and its inverse P). Solves and inverses are then printed as the module's
            Cholesky helpers ``_spd_solve`` / ``_spd_inv`` (backward-stable, and half the work of LU), never as a
            general inverse.
        solve: the name of the function printed for ``Inverse(X) @ rest`` instead (the module's conjugate
            gradient, ``_cg_solve``); explicit inverses stay Cholesky.
    """

    _module = "jax.numpy"
    _alias = "jnp"
    _solve = "jnp.linalg.solve"
    _inv = "jnp.linalg.inv"

    def __init__(self, dtype_name: str = "dtype", spd: bool = False, solve: str | None = None) -> None:
        super().__init__({"strict": True, "fully_qualified_modules": True})
        self.dtype_name = dtype_name
        if spd:
            self._solve, self._inv = "_spd_solve", "_spd_inv"
        if solve is not None:  # a solver of the module's own (conjugate gradient) for Inverse(X) @ rest
            self._solve = solve

    def _module_format(self, fqn, register=True):
        out = super()._module_format(fqn, register)
        return out.replace(self._module + ".", self._alias + ".", 1) if out.startswith(self._module + ".") else out

    # ---- leaves
    def _print_MatrixSymbol(self, e):
        return e.name

    def _print_Identity(self, e):
        if e.shape == (1, 1):
            return "1"
        return f"{self._alias}.eye({self._print(e.rows)}, dtype={self.dtype_name})"

    def _print_ZeroMatrix(self, e):
        return f"{self._alias}.zeros(({self._print(e.rows)}, {self._print(e.cols)}), dtype={self.dtype_name})"

    def _print_Transpose(self, e):
        if is_scalar_matrix(e):
            return self._print(e.arg)
        return f"{self._paren(e.arg)}.T"

    def _print_Inverse(self, e):
        if is_scalar_matrix(e.arg):
            return f"(1 / {self._paren(e.arg)})"
        return f"{self._inv}({self._print(e.arg)})"

    def _paren(self, e) -> str:
        text = self._print(e)
        return text if isinstance(e, (sp.MatrixSymbol, sp.Symbol, sp.Number)) else f"({text})"

    # ---- sums and products
    def _print_MatAdd(self, e):
        parts = []
        for a in e.args:
            text = self._print(a)
            if parts and text.startswith("-"):
                parts.append(f"- {text[1:]}")
            else:
                parts.append(f"+ {text}" if parts else text)
        return " ".join(parts)

    def _print_MatMul(self, e):
        coeff = sp.Integer(1)
        mats, scal_num, scal_den = [], [], []
        for a in e.args:
            if not isinstance(a, MatrixExpr):
                coeff *= a
            elif is_scalar_matrix(a):  # a 1 × 1 factor: a scalar multiplication or division
                inner = a.arg if isinstance(a, sp.Transpose) else a
                if isinstance(inner, sp.Inverse):
                    arg = inner.arg.arg if isinstance(inner.arg, sp.Transpose) else inner.arg
                    scal_den.append(self._paren(arg))
                else:
                    scal_num.append(self._paren(inner))
            else:
                mats.append(a)
        num, den = sp.fraction(sp.together(coeff))
        if den != 1:
            scal_den.insert(0, self._paren(den) if isinstance(den, (sp.Add, sp.Mul)) else self._print(den))
        prefix = ""
        factors = [self._print_chain(mats)] if mats else []
        if num == -1:
            prefix = "-"
        elif num != 1:
            factors.insert(0, self._paren(num) if isinstance(num, sp.Add) else self._print(num))
        factors += scal_num
        text = " * ".join(factors) if factors else "1"
        for d in scal_den:
            text = f"{text} / {d}"
        return prefix + text

    def _print_DiagMatrix(self, e):
        return f"{self._alias}.diag({self._print(e.args[0])}[:, 0])"

    def _print_chain(self, mats: list) -> str:
        diag = next((i for i, m in enumerate(mats) if isinstance(m, sp.DiagMatrix)), None)
        if diag is not None and len(mats) > 1:  # Diag(a) X = a ⊙ X (a column broadcasts); X Diag(a) = X ⊙ aᵀ
            a = self._print(mats[diag].args[0])
            left, right = mats[:diag], mats[diag + 1:]
            if not left:
                return f"{a} * ({self._print_chain(right)})"
            text = f"({self._print_chain(left)}) * {a}.T"
            return f"({text}) @ ({self._print_chain(right)})" if right else text
        if isinstance(mats[0], sp.Inverse) and not is_scalar_matrix(mats[0]) and len(mats) > 1:
            rest = self._print_chain(mats[1:])
            return f"{self._solve}({self._print(mats[0].arg)}, {rest})"
        if len(mats) == 1:
            return self._paren(mats[0]) if isinstance(mats[0], (sp.MatAdd,)) else self._print(mats[0])
        order = chain_order([(_size(m.shape[0]), _size(m.shape[1])) for m in mats])

        def emit(node, top):
            if isinstance(node, int):
                m = mats[node]
                return self._paren(m) if isinstance(m, (sp.MatAdd, sp.MatMul)) else self._print(m)
            text = f"{emit(node[0], False)} @ {emit(node[1], False)}"
            return text if top else f"({text})"

        return emit(order, True)

    def _print_MatPow(self, e):
        return f"{self._alias}.linalg.matrix_power({self._print(e.base)}, {self._print(e.exp)})"


"""Lower per-head matrix assignments to scalar loops, and derive their adjoints (VJPs) term by term.

The Numba backends print every IR :class:`~mesagen.ir.records.Assign` as explicit loops over stored
elements. An expression is split into *terms* (the arguments of a ``MatAdd``); each term is a scalar
coefficient (numbers, parameters, per-token inputs) times a chain of *factors*: a matrix symbol, its
transpose, ``Identity``, the inverse of a 1 × 1 symbol, or ``Diag(x)`` built from a column vector ``x``
(a per-key-channel gate, a per-value-channel step size). Element ``[i, j]`` of a chain is a sum over the
inner indices of the non-1 × 1 factors; 1 × 1 factors are scalars. A diagonal factor equates its two
indices, so ``(Diag(x) S)[i, j] = x[i] S[i, j]``: the summation index is substituted, never looped over.

The adjoint of ``t = c · F₁ ⋯ Fₙ`` with cotangent ``G`` (the same shape as ``t``) is mechanical
(the vector-Jacobian product of a multilinear term, e.g. Giles 2008, "Collected matrix derivative results"):

* for a factor ``F_p = X``:      ``Ḡ_X += c · (F₁⋯F_{p−1})ᵀ G (F_{p+1}⋯Fₙ)ᵀ``;
* for ``F_p = Xᵀ``:               the transpose of that;
* for ``F_p = X⁻¹`` (1 × 1):       ``Ḡ_X += −c · (…)ᵀ G (…)ᵀ · X⁻¹ · X⁻¹``;
* for ``F_p = Diag(x)``:          ``ḡ_x += diag(c · (F₁⋯F_{p−1})ᵀ G (F_{p+1}⋯Fₙ)ᵀ)`` (the diagonal of the chain);
* for ``F_p = Diag(x)⁻¹``:        the same times ``−1/x²`` elementwise;
* for each symbol ``σ`` in ``c``:  ``ḡ_σ += (∂c/∂σ) · ⟨G, F₁⋯Fₙ⟩`` (a full contraction).

Terms are handled one at a time, so the sympy ``diff``-of-a-sum pitfall (docs/family.md §10) cannot arise; the
product rule for repeated factors (``P k kᵀ P``) comes from visiting every position.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp
from sympy.matrices.expressions.matexpr import MatrixExpr
from sympy.printing.pycode import PythonCodePrinter

from mesagen.ir.dims import K, V

_DIM_NAMES = {K: "K", V: "V"}


@dataclass(frozen=True)
class Factor:
    """One factor of a chain: a stored symbol (``sym``), the identity (``eye``) or the diagonal matrix of a
    stored column vector (``diag``), maybe transposed/inverted.

    Attributes:
        kind: ``"sym"``, ``"eye"`` or ``"diag"``.
        name: the symbol's name (``""`` for ``eye``; the vector's name for ``diag``).
        shape: stored (rows, cols) as sympy dims (``K``, ``V`` or 1); (n, n) for the diagonal of an n × 1 vector.
        t: transposed.
        inv: inverted (1 × 1 symbols, and diagonals: Diag(x)⁻¹ = Diag(1/x)).
    """

    kind: str
    name: str
    shape: tuple
    t: bool = False
    inv: bool = False

    @property
    def eshape(self) -> tuple:
        """Effective (rows, cols) after the transpose flag."""
        return (self.shape[1], self.shape[0]) if self.t else self.shape

    @property
    def scalar(self) -> bool:
        """True for 1 × 1 factors (printed as scalars)."""
        return self.shape == (1, 1)

    def T(self) -> "Factor":
        """The transposed factor (a 1 × 1 factor and a diagonal are their own transposes)."""
        return self if self.scalar or self.kind == "diag" else replace(self, t=not self.t)


@dataclass(frozen=True)
class Term:
    """``coef · F₁ ⋯ Fₙ``, optionally contracted with a cotangent: ``coef · ⟨contract, F₁⋯Fₙ⟩`` (1 × 1), or
    (``diag``) the diagonal of a square chain as a column: element ``[i, 0]`` is ``(coef · F₁⋯Fₙ)[i, i]``."""

    coef: sp.Expr
    factors: tuple[Factor, ...]
    contract: Factor | None = None
    diag: bool = False


@dataclass(frozen=True)
class Stmt:
    """``target (=|+=) Σ terms`` over a target of stored shape ``shape``; printed as one loop nest."""

    target: str
    shape: tuple
    op: str
    terms: tuple[Term, ...]
    doc: str = ""


def _atom(e: sp.Basic) -> Factor:
    if isinstance(e, sp.MatrixSymbol):
        return Factor("sym", e.name, tuple(e.shape))
    if isinstance(e, sp.Identity):
        return Factor("eye", "", (e.rows, e.rows))
    if isinstance(e, sp.DiagMatrix):
        x = e.args[0]
        if not isinstance(x, sp.MatrixSymbol) or x.shape[1] != 1:
            raise NotImplementedError(f"unsupported diagonal factor {e} (needs a column vector symbol)")
        return Factor("diag", x.name, (x.shape[0], x.shape[0]))
    if isinstance(e, sp.Transpose):
        return _atom(e.arg).T()
    if isinstance(e, sp.Inverse) and isinstance(e.arg, sp.DiagMatrix):  # Diag(x)⁻¹ = Diag(1/x)
        return replace(_atom(e.arg), inv=True)
    if isinstance(e, sp.Inverse) and e.shape == (1, 1):
        f = _atom(e.arg)
        if f.kind != "sym" or f.inv:
            raise NotImplementedError(f"unsupported inverse factor {e}")
        return replace(f, inv=True, t=False)
    raise NotImplementedError(f"no loop lowering for factor {e} ({type(e).__name__})")


def _expand(e: sp.Basic) -> list[tuple[sp.Expr, list[sp.Basic]]]:
    """Distribute products over sums: ``e`` as a list of (scalar coefficient, [atomic matrix factors]).

    Handles nested ``MatAdd`` / ``MatMul`` (including a scalar times a sum, e.g. ``(λ I + A) x``), and
    ``Transpose`` of any of them (reversed, transposed factors); atoms are left to :func:`_atom`.
    """
    if isinstance(e, sp.ZeroMatrix):
        return []
    if isinstance(e, sp.MatAdd):
        return [t for a in e.args for t in _expand(a)]
    if isinstance(e, sp.MatMul):
        out = [(sp.Integer(1), [])]
        for a in e.args:
            parts = _expand(a) if isinstance(a, MatrixExpr) else [(a, [])]
            out = [(c1 * c2, f1 + f2) for c1, f1 in out for c2, f2 in parts]
        return out
    if isinstance(e, sp.Transpose) and isinstance(e.arg, (sp.MatAdd, sp.MatMul, sp.Transpose)):
        return [(c, [sp.Transpose(f) for f in reversed(fs)]) for c, fs in _expand(e.arg)]
    return [(sp.Integer(1), [e])]


def split_inverse(expr: sp.Basic) -> tuple[MatrixExpr, MatrixExpr] | None:
    """``(M, b)`` when ``expr`` is ``Inverse(M) · b`` (a linear solve x = M⁻¹ b) with M square and larger than
    1 × 1 and b a column (scalar coefficients go to b); None when ``expr`` is not a product led by such an inverse.

    The Numba backends print such an assignment as a solve (Cholesky or conjugate gradient, the layer's
    ``linear_solve``), never as an inverse; an inverse of a larger matrix anywhere else is refused by
    :func:`terms_of`.

    Raises:
        NotImplementedError: the inverse is applied to something that is not a column.
    """
    if not isinstance(expr, sp.MatMul):
        return None
    coef = [a for a in expr.args if not isinstance(a, MatrixExpr)]
    mats = [a for a in expr.args if isinstance(a, MatrixExpr)]
    if not mats or not isinstance(mats[0], sp.Inverse) or mats[0].shape[0] == 1:
        return None
    rest = sp.MatMul(*coef, *mats[1:]) if len(mats) > 1 else None
    if rest is None or rest.shape[1] != 1:
        raise NotImplementedError(f"no loop lowering for {expr}: a linear solve needs a column right-hand side")
    return mats[0].arg, rest


def terms_of(expr: sp.Basic) -> tuple[Term, ...]:
    """Split a matrix expression into :class:`Term` s, products distributed over sums (zero terms dropped).

    Raises:
        NotImplementedError: a node outside MatAdd / MatMul / Transpose / 1 × 1 Inverse / symbols / Identity /
            DiagMatrix of a column vector symbol.
    """
    out = []
    for coef, fs in _expand(expr):
        if coef == 0:
            continue
        out.append(Term(coef, tuple(_atom(f) for f in fs)))
    return tuple(out)


def grad_name(name: str) -> str:
    """Name of the cotangent buffer of ``name``."""
    return f"g_{name}"


def adjoint(assigns, shapes: dict[str, tuple], scalars: tuple[str, ...], given: dict[str, str]) -> list[Stmt]:
    """The reverse sweep of a straight-line program of assignments, one statement per (assign, read).

    Args:
        assigns: the forward :class:`~mesagen.ir.records.Assign` s, in execution order.
        shapes: stored shape (sympy dims) of every matrix symbol read or written, and of every vector whose
            diagonal is a factor (its cotangent is a column of that shape).
        scalars: names of scalar symbols (parameters, inputs) whose gradients are wanted.
        given: target name → name of the buffer holding its incoming cotangent (e.g. ``o`` → ``g_o``).

    Returns:
        Statements ``g_X += …`` in reverse order; every cotangent is complete before it is read.

    Raises:
        NotImplementedError: a coefficient depends on a symbol that is not in ``scalars``.
    """
    stmts = []
    for a in reversed(assigns):
        G = Factor("sym", given.get(a.target, grad_name(a.target)), shapes[a.target])
        groups: dict[str, list[Term]] = {}
        for term in terms_of(a.expr):
            fs = term.factors
            for p, f in enumerate(fs):
                if f.kind == "eye":
                    continue
                chain = [g.T() for g in reversed(fs[:p])] + [G] + [g.T() for g in reversed(fs[p + 1:])]
                coef = term.coef
                if f.kind == "diag":  # ḡ_x = diag of the pulled-back chain (times −1/x² for Diag(x)⁻¹)
                    if f.inv:
                        chain += [f, f]
                        coef = -coef
                    groups.setdefault(f.name, []).append(Term(coef, tuple(chain), diag=True))
                    continue
                if f.inv:
                    chain += [replace(f, t=False), replace(f, t=False)]
                    coef = -coef
                elif f.t:
                    chain = [g.T() for g in reversed(chain)]
                groups.setdefault(f.name, []).append(Term(coef, tuple(chain)))
            for sym in sorted(term.coef.free_symbols, key=lambda s: s.name):
                if sym.name not in scalars:
                    raise NotImplementedError(f"coefficient symbol {sym.name} is neither parameter nor input")
                d = sp.diff(term.coef, sym)
                groups.setdefault(sym.name, []).append(Term(d, fs, contract=G))
        for name, terms in groups.items():
            shape = (1, 1) if name in scalars else shapes[name]
            stmts.append(Stmt(grad_name(name), shape, "+=", tuple(terms), f"pull back {a.target} -> {name}"))
    return stmts


def forward_stmts(assigns, shapes: dict[str, tuple]) -> list[Stmt]:
    """One ``=`` statement per forward assignment."""
    return [Stmt(a.target, shapes[a.target], "=", terms_of(a.expr), a.doc) for a in assigns]


# ---------------------------------------------------------------------------------------------- printing
FTYPE = "ftype"
"""Name of the compute dtype's scalar constructor in generated bodies (``np.float32`` or ``np.float64``)."""


class ScalarPrinter(PythonCodePrinter):
    """Prints one scalar element expression (Indexed, Symbols, KroneckerDelta) as Numba-friendly Python.

    Every number is printed as ``ftype(...)``, the compute dtype's constructor, so float32 data is computed in
    float32: a bare ``1.0`` or ``1`` would promote a float32 expression to float64 under Numba's typing rules.
    Integer powers become products (``s**2`` → ``(s*s)``, ``s**-1`` → ``ftype(1)/s``) for the same reason.
    Array indices stay plain integers.
    """

    def __init__(self) -> None:
        super().__init__({"strict": True, "fully_qualified_modules": False})

    def _num(self, text: str) -> str:
        return f"{FTYPE}({text})"

    def _print_Integer(self, e):
        return self._num(str(int(e)))

    _print_Zero = _print_One = _print_NegativeOne = _print_Integer

    def _print_Rational(self, e):
        return f"({self._num(str(e.p))}/{self._num(str(e.q))})"

    _print_Half = _print_Rational

    def _print_Float(self, e):
        return self._num(repr(float(e)))

    def _print_Pow(self, e, rational=False):
        b, x = e.args
        if x.is_Integer and 1 <= abs(int(x)) <= 4:
            prod = "*".join([self.parenthesize(b, 60)] * abs(int(x)))
            return f"({prod})" if int(x) > 0 else f"({self._num('1')}/({prod}))"
        raise NotImplementedError(f"no float-exact printing for the power {e}")

    def _print_KroneckerDelta(self, e):
        a, b = (PythonCodePrinter._print(self, x) if not x.is_Integer else str(int(x)) for x in e.args)
        return f"({self._num('1')} if {a} == {b} else {self._num('0')})"

    def _print_Indexed(self, e):
        idx = (str(int(i)) if i.is_Integer else PythonCodePrinter._print(self, i) for i in e.indices)
        return f"{e.base.label}[{', '.join(idx)}]"


def _dim(d) -> str:
    return _DIM_NAMES[d] if d in _DIM_NAMES else str(int(d))


def _access(f: Factor, a, b):
    if f.kind == "eye":
        return sp.Integer(1) if f.shape == (1, 1) else sp.KroneckerDelta(a, b)
    r, c = (b, a) if f.t else (a, b)
    rows, cols = f.shape
    if rows == 1 and cols == 1:
        x = sp.Symbol(f.name)
        return x ** -1 if f.inv else x
    base = sp.IndexedBase(f.name)
    if cols == 1:
        return base[r]
    if rows == 1:
        return base[c]
    return base[r, c]


def element(term: Term, ri, ci, fresh) -> tuple[list, sp.Expr]:
    """Element ``[ri, ci]`` of a term: (summation indices [(symbol, dim)], scalar summand).

    A diagonal factor ``Diag(x)`` between indices a and b contributes ``x[a]`` and equates a with b: a summation
    index among them is replaced by its partner (no loop, no Kronecker delta); only when both are output
    indices does a δ(a, b) remain.

    Raises:
        ValueError: the chain's inner dimensions do not match.
    """
    sums = []
    value = term.coef
    if term.contract is not None:  # ⟨G, chain⟩ = Σ_ab G[a, b] · chain[a, b]
        g = term.contract
        a = fresh(g.shape[0], sums)
        b = fresh(g.shape[1], sums)
        value *= _access(g, a, b)
        ri, ci = a, b
    if term.diag:  # element [ri, 0] of the chain's diagonal
        ci = ri
    mats = [f for f in term.factors if not f.scalar]
    for f in term.factors:
        if f.scalar:
            value *= _access(f, 0, 0)
    if not mats:
        return sums, value
    idx = [ri]
    for left, right in zip(mats, mats[1:]):
        if left.eshape[1] != right.eshape[0]:
            raise ValueError(f"inner dimensions differ in {term}")
        idx.append(fresh(left.eshape[1], sums))
    idx.append(ci)
    summed = {s for s, _ in sums}
    sub: dict = {}

    def find(x):
        while x in sub:
            x = sub[x]
        return x

    deltas = []
    for f, a, b in zip(mats, idx, idx[1:]):
        if f.kind != "diag":
            continue
        a, b = find(a), find(b)
        if a == b:
            continue
        if b in summed:
            sub[b] = a
        elif a in summed:
            sub[a] = b
        else:
            deltas.append((a, b))
    for f, a, b in zip(mats, idx, idx[1:]):
        a, b = find(a), find(b)
        if f.kind == "diag":
            value *= sp.IndexedBase(f.name)[a] ** (-1 if f.inv else 1)
        else:
            value *= _access(f, a, b)
    for a, b in deltas:
        value *= sp.KroneckerDelta(a, b)
    value = value.xreplace({x: find(x) for x in sub})  # also in the contracted cotangent's access
    return [(s, d) for s, d in sums if s not in sub], value


def print_stmt(st: Stmt, strided: bool, printer: ScalarPrinter) -> list[str]:
    """Loop text for one statement: rows ``range(r0, R, rstep)`` when ``strided`` (CUDA threads share rows).

    1 × 1 targets are scalar locals computed by every thread; other targets are stored arrays.
    """
    rows, cols = st.shape
    counter = [0]

    def fresh(d, sums):
        if d == 1:
            return sp.Integer(0)
        s = sp.Symbol(f"m{counter[0]}", integer=True)
        counter[0] += 1
        sums.append((s, d))
        return s

    i = sp.Symbol("i", integer=True) if rows != 1 else sp.Integer(0)
    j = sp.Symbol("j", integer=True) if cols != 1 else sp.Integer(0)
    out = [f"# {st.doc}" if st.doc else f"# {st.target}"]
    if rows == 1 and cols == 1:
        acc, pad, lines = st.target, "", []
        if st.op == "=":
            lines.append(f"{st.target} = {FTYPE}(0)")
    else:
        cell = f"{st.target}[i]" if cols == 1 else (f"{st.target}[j]" if rows == 1 else f"{st.target}[i, j]")
        acc, pad, lines = "acc", "    ", []
        head = [f"for i in range(r0, {_dim(rows)}, rstep):" if strided else f"for i in range({_dim(rows)}):"]
        if rows == 1:
            head = ["for i in range(1):"]
        if cols != 1:
            head.append(f"    for j in range({_dim(cols)}):")
            pad = "        "
        lines += head + [pad + (f"acc = {FTYPE}(0)" if st.op == "=" else f"acc = {cell}")]
    for term in st.terms:
        sums, value = element(term, i, j, fresh)
        inner = pad
        for s, d in sums:
            lines.append(f"{inner}for {s} in range({_dim(d)}):")
            inner += "    "
        lines.append(f"{inner}{acc} += {printer.doprint(value)}")
    if acc == "acc":
        lines.append(f"{pad}{cell} = acc")
    return out + lines

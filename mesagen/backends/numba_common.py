"""Pieces shared by the Numba CPU and CUDA emitters: the layer's buffers, the plain per-head bodies, the API.

Both generated modules contain the same *plain body* text, ``_make_bodies(K, V, ftype, jit)``: per-head functions
over stored elements (printed by :mod:`mesagen.backends.loops`) that take a row range ``range(r0, R, rstep)``
and call ``_sync()`` between statements. The CPU module passes ``r0 = 0, rstep = 1`` and a no-op ``_sync``;
the CUDA module passes ``threadIdx.x, blockDim.x`` and ``cuda.syncthreads``. ``K`` and ``V`` are closure
constants, so sizes are baked per (spec, shape) without module globals.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from mesagen.backends.common import CODEGEN_FORMAT, indent
from mesagen.backends.loops import (Factor, ScalarPrinter, Stmt, Term, adjoint, forward_stmts, grad_name, print_stmt,
                                    split_inverse, terms_of)
from mesagen.ir.records import Assign, LayerIR
from mesagen.ir.dims import DIMS


@dataclass(frozen=True)
class Solve:
    """``target = matrix⁻¹ rhs`` for a symmetric positive-definite ``matrix`` [K, K] and a column ``rhs`` [K, 1]
    (both buffers assigned just before), printed as a call of ``_chol_solve`` or ``_cg_solve``.

    Attributes:
        target, matrix, rhs: buffer names.
        method: ``cholesky`` (the factor overwrites ``matrix``'s lower triangle) or ``conjugate_gradient``.
        work: the conjugate-gradient vectors (r, p, A p) [K, 1]; () for Cholesky.
        doc: the original assignment's comment.
    """

    target: str
    matrix: str
    rhs: str
    method: str
    work: tuple[str, ...]
    doc: str = ""


@dataclass(frozen=True)
class Block:
    """Raw lines of a body that write the buffers ``writes`` (and end with a barrier)."""

    lines: tuple[str, ...]
    writes: frozenset


def program(ir: LayerIR) -> tuple:
    """The per-token program (update, then readout) with every linear solve ``x = M⁻¹ b`` split into
    ``x_M = M``, ``x_b = b`` and a :class:`Solve` (so M and b are ordinary assignments with ordinary adjoints).

    Raises:
        NotImplementedError: a solve without the layer's ``linear_solve``, of a shape other than
            [K, K] · [K, 1], or whose helper names are already used.
    """
    rec = ir.recurrence
    items: list = []
    for a in rec.update + rec.readout:
        split = split_inverse(a.expr)
        if split is None:
            items.append(a)
            continue
        M, rhs = split
        n = a.target
        if ir.linear_solve is None or tuple(a.shape) != ("K", 1) or M.shape != (DIMS["K"], DIMS["K"]):
            raise NotImplementedError(f"{n}: a linear solve needs linear_solve and shapes [K, K] · [K, 1]")
        work = (f"{n}_r", f"{n}_p", f"{n}_Ap") if ir.linear_solve == "conjugate_gradient" else ()
        used = {b.target for b in rec.update + rec.readout} | {s.name for s in rec.states}
        if used & {f"{n}_M", f"{n}_b", *work}:
            raise NotImplementedError(f"{n}: the solve's buffer names clash with {sorted(used)}")
        items += [Assign(f"{n}_M", M, ("K", "K"), f"the system matrix of {n} (symmetric positive-definite)"),
                  Assign(f"{n}_b", rhs, ("K", 1), f"the right-hand side of {n}"),
                  Solve(n, f"{n}_M", f"{n}_b", ir.linear_solve, work, a.doc)]
    return tuple(items)


@dataclass(frozen=True)
class Layout:
    """Names and stored shapes of one layer's per-head buffers, in a fixed order.

    Attributes:
        states / new_states: state names and ``<name>_new``.
        temps: non-1 × 1 temporaries (arrays), excluding ``o``, then the solves' workspace vectors;
            ``scalar_temps``: 1 × 1 temporaries (locals).
        params / inputs: parameter and input symbol names (inputs in spec order, scalar and per-channel).
        vec_inputs: the per-channel inputs among ``inputs`` (a column K × 1 or V × 1 per token and head; the
            bodies read their elements and write their cotangents into a buffer argument ``g_<name>``).
        shapes: name → stored shape in sympy dims.
        dims: name → ("K"|"V"|"1", ...) text dims.
        vec_params: the per-key-channel parameters among ``params`` ([H, K]: a column K × 1 per head; the
            adjoint body accumulates their cotangents over the tokens into a buffer argument ``g_<name>``).
        program: the per-token program of :func:`program` (assignments and solves).
    """

    states: tuple[str, ...]
    new_states: tuple[str, ...]
    temps: tuple[str, ...]
    scalar_temps: tuple[str, ...]
    params: tuple[str, ...]
    inputs: tuple[str, ...]
    vec_inputs: tuple[str, ...]
    shapes: dict
    dims: dict
    vec_params: tuple[str, ...] = ()
    program: tuple = ()

    @property
    def scalar_inputs(self) -> tuple[str, ...]:
        """The inputs that are one scalar per token and head."""
        return tuple(n for n in self.inputs if n not in self.vec_inputs)

    @property
    def scalar_params(self) -> tuple[str, ...]:
        """The parameters that are one scalar per head."""
        return tuple(n for n in self.params if n not in self.vec_params)

    @property
    def scalars(self) -> tuple[str, ...]:
        """Scalar parameters and scalar inputs: the 1 × 1 symbols whose gradients the adjoint body returns."""
        return self.scalar_params + self.scalar_inputs

    @property
    def fwd_args(self) -> tuple[str, ...]:
        """Arguments of ``_step_body``."""
        return self.states + ("q", "k", "v") + self.params + self.inputs + self.new_states + self.temps + ("o",)

    @property
    def grad_args(self) -> tuple[str, ...]:
        """Cotangent arguments of ``_adjoint_body`` after the forward ones."""
        g = grad_name
        return (("g_o",) + tuple(g(s) for s in self.new_states) + tuple(g(s) for s in self.states)
                + tuple(g(s) for s in self.temps) + ("g_q", "g_k", "g_v") + tuple(g(s) for s in self.vec_inputs)
                + tuple(g(s) for s in self.vec_params))

    def alloc_shape(self, name: str) -> str:
        """``(K, V)`` / ``(K,)`` text for the stored shape of ``name`` (``g_<x>`` is shaped like ``x``)."""
        d = [x for x in self.dims[name[2:] if name.startswith("g_") else name] if x != "1"]
        return "(" + ", ".join(d) + ("," if len(d) == 1 else "") + ")"


def layout(ir: LayerIR) -> Layout:
    """Collect buffers and shapes from the IR.

    Raises:
        NotImplementedError: a state is not a stored matrix (both dims K or V).
    """
    rec = ir.recurrence
    text = {"K": "K", "V": "V", 1: "1"}
    dims = {"q": ("K", "1"), "k": ("K", "1"), "v": ("V", "1")}
    for st in rec.states:
        if 1 in st.shape:
            raise NotImplementedError(f"state {st.name}: the Numba backends store matrix states only")
        dims[st.name] = dims[f"{st.name}_new"] = tuple(text[d] for d in st.shape)
    vec = tuple(i.symbol for i in ir.inputs if i.channel is not None)
    for i in ir.inputs:
        if i.channel is not None:
            dims[i.symbol] = (i.channel, "1")
    vec_params = tuple(p.symbol for p in ir.params if p.channel)
    for p in vec_params:
        dims[p] = ("K", "1")
    prog = program(ir)
    written = []
    for a in prog:
        if isinstance(a, Solve):
            dims[a.target] = ("K", "1")
            written.append(a.target)
            for w in a.work:
                dims[w] = ("K", "1")
        else:
            dims[a.target] = tuple(text[d] for d in a.shape)
            written.append(a.target)
    work = [w for a in prog if isinstance(a, Solve) for w in a.work]
    new = tuple(f"{s.name}_new" for s in rec.states)
    written = [n for n in written if n not in new and n != "o"]
    temps = tuple(n for n in written if dims[n] != ("1", "1")) + tuple(work)
    scalars = tuple(n for n in written if dims[n] == ("1", "1"))
    shapes = {n: tuple(DIMS[int(x)] if x == "1" else DIMS[x] for x in d) for n, d in dims.items()}
    for n in ("g_o",) + tuple(grad_name(x) for x in new + vec + vec_params):
        shapes[n] = shapes[n[2:]]
    return Layout(tuple(s.name for s in rec.states), new, temps, scalars,
                  tuple(p.symbol for p in ir.params), tuple(i.symbol for i in ir.inputs), vec, shapes, dims,
                  vec_params, prog)


def _reads(st: Stmt) -> set[str]:
    """Names of the buffers a statement reads (its factors, its contracted cotangent, and ``+=`` its target)."""
    names = {f.name for t in st.terms for f in t.factors + ((t.contract,) if t.contract else ()) if f.kind != "eye"}
    return names | ({st.target} if st.op == "+=" else set())


def _body(name: str, args, items: list, printer, ret: str | None = None) -> list[str]:
    """A jitted body: each item is a :class:`Stmt` or raw lines; barriers placed for the CUDA block's threads.

    Threads split the rows of every array statement, so ``_sync()`` follows each one (its rows are read by
    other threads next). A 1 × 1 statement is computed by every thread into a local and reads arrays other
    threads wrote: a ``_sync()`` precedes the first later array write to any buffer it read (otherwise a fast
    thread could overwrite an element a slow thread is still reading), and ends the body when such reads are
    still pending (the caller may overwrite them next). Raw lines (the zeroing block) end with their own sync.
    """
    L = ["@jit", f"def {name}({', '.join(args)}):"]
    inner: list[str] = []
    pending: set[str] = set()  # buffers read by 1 × 1 statements since the last barrier
    for st in items:
        if isinstance(st, Block):  # a solve: its helper ends with a barrier
            if pending & st.writes:
                inner.append("_sync()  # a 1 × 1 statement above read a buffer this solve writes")
            inner += st.lines
            pending = set()
            continue
        if not isinstance(st, Stmt):
            inner += st
            pending = set() if st and st[-1] == "_sync()" else pending
            continue
        if st.shape != (1, 1) and st.target in pending:
            inner.append("_sync()  # a 1 × 1 statement above read this buffer")
            pending = set()
        inner += print_stmt(st, True, printer)
        if st.shape != (1, 1):
            inner.append("_sync()")
            pending = set()
        else:
            pending |= _reads(st) - {st.target}
    if pending:
        inner.append("_sync()  # 1 × 1 statements above read shared buffers the caller may overwrite next")
    if ret is not None:
        inner.append(f"return {ret}")
    return L + indent(inner or ["pass"]) + [""]


def _solve_call(s: Solve, rhs: str, out: str) -> str:
    """The helper call of a solve ``out = s.matrix⁻¹ rhs`` (the Cholesky factor is already in s.matrix)."""
    if s.method == "cholesky":
        return f"_chol_solve({s.matrix}, {rhs}, {out}, r0, rstep)"
    return f"_cg_solve({s.matrix}, {rhs}, {out}, {', '.join(s.work)}, r0, rstep)"


def _solve_forward(s: Solve) -> Block:
    """``x = M⁻¹ b``: factorise M in place and substitute (Cholesky), or conjugate gradient."""
    lines = [f"# {s.doc}" if s.doc else f"# {s.target}"]
    if s.method == "cholesky":
        lines.append(f"_chol_factor({s.matrix}, r0, rstep)")
    lines.append(_solve_call(s, s.rhs, s.target))
    return Block(tuple(lines), frozenset({s.target, s.matrix, *s.work}))


def _solve_adjoint(s: Solve, shapes: dict) -> list:
    """The pullback of ``x = M⁻¹ b`` by implicit differentiation: b̄ = M⁻¹ x̄ (one more solve with the cotangent,
    M symmetric; zero when x̄ is zero, never 0/0), M̄ += −b̄ xᵀ (the adjoint of a linear solve, e.g. Giles 2008,
    "Collected matrix derivative results": for C = A⁻¹B, B̄ = A⁻ᵀC̄ and Ā = −A⁻ᵀC̄Cᵀ)."""
    gx, gb, gm = grad_name(s.target), grad_name(s.rhs), grad_name(s.matrix)
    block = Block((f"# pull back {s.target} -> {s.rhs}: b̄ = M⁻¹ x̄ (implicit differentiation)",
                   _solve_call(s, gx, gb)), frozenset({gb, *s.work}))
    term = Term(sp.Integer(-1), (Factor("sym", gb, shapes[s.rhs]), Factor("sym", s.target, shapes[s.target], t=True)))
    return [block, Stmt(gm, shapes[s.matrix], "+=", (term,), f"pull back {s.target} -> {s.matrix}: −b̄ xᵀ")]


def _solve_helpers(ir: LayerIR, methods: set) -> list[str]:
    """The text of the solve helpers the program calls (inside ``_make_bodies``; rows ``range(r0, K, rstep)``)."""
    L: list[str] = []
    if "cholesky" in methods:
        L += _CHOLESKY.splitlines()
    if "conjugate_gradient" in methods:
        maxit, tol = ir.cg
        L += _CG.replace("__MAXIT__", str(int(maxit))).replace("__TOL__", repr(float(tol))).splitlines()
    return L


_CHOLESKY = '''@jit
def _chol_factor(A, r0, rstep):
    """In place: the lower triangle of A [K, K] becomes the Cholesky factor L of sym(A) = (A + Aᵀ)/2 = L Lᵀ (the
    upper triangle is kept). Thread r0 = 0 factorises (K is small), then the block meets. A non-positive pivot
    (A not numerically positive-definite, or non-finite) makes the factor NaN, never an exception."""
    if r0 == 0:
        for j in range(K):
            for i in range(j, K):
                acc = A[i, j] if i == j else ftype(0.5) * (A[i, j] + A[j, i])
                for m in range(j):
                    acc -= A[i, m] * A[j, m]
                if i == j:
                    A[j, j] = math.sqrt(acc) if acc > ftype(0) else math.sqrt(-abs(acc) - ftype(1))  # NaN
                else:
                    A[i, j] = acc / A[j, j]
    _sync()

@jit
def _chol_solve(L, b, x, r0, rstep):
    """x = (L Lᵀ)⁻¹ b [K] by forward and back substitution with the factor in L's lower triangle (thread r0 = 0);
    b = 0 gives x = 0 exactly (never 0/0 or 0 · NaN: a zero cotangent pulls back to zero)."""
    if r0 == 0:
        zero = True
        for i in range(K):
            if b[i] != ftype(0):
                zero = False
        for i in range(K):
            acc = b[i]
            for m in range(i):
                acc -= L[i, m] * x[m]
            x[i] = ftype(0) if zero else acc / L[i, i]
        for i in range(K - 1, -1, -1):
            acc = x[i]
            for m in range(i + 1, K):
                acc -= L[m, i] * x[m]
            x[i] = ftype(0) if zero else acc / L[i, i]
    _sync()
'''

_CG = '''@jit
def _cg_solve(A, b, x, r, p, Ap, r0, rstep):
    """x ≈ A⁻¹ b [K] by conjugate gradient (Hestenes & Stiefel 1952) for a symmetric positive-definite A [K, K],
    as layer_jax.py's _cg_iterate: from the Jacobi guess x⁰ = b / diag(A), at most __MAXIT__ iterations, stopped
    once ‖r‖₂ ≤ __TOL__ · ‖b‖₂; a zero curvature pᵀAp divides by 1. b = 0 gives x = 0 exactly (no iteration,
    never 0/0). r, p, Ap [K] are workspace. Threads split the rows of every vector update; every thread
    computes the dot products (the same sums in the same order, so all take the same branches)."""
    bb = ftype(0)
    for m in range(K):
        bb += b[m] * b[m]
    if bb == ftype(0):
        for i in range(r0, K, rstep):
            x[i] = ftype(0)
        _sync()
        return
    for i in range(r0, K, rstep):
        x[i] = b[i] / A[i, i]
    _sync()
    for i in range(r0, K, rstep):
        acc = b[i]
        for m in range(K):
            acc -= A[i, m] * x[m]
        r[i] = acc
        p[i] = acc
    _sync()
    rs = ftype(0)
    for m in range(K):
        rs += r[m] * r[m]
    stop = ftype(__TOL__) * ftype(__TOL__) * bb
    it = 0
    while it < __MAXIT__ and rs > stop:
        for i in range(r0, K, rstep):
            acc = ftype(0)
            for m in range(K):
                acc += A[i, m] * p[m]
            Ap[i] = acc
        _sync()
        pAp = ftype(0)
        for m in range(K):
            pAp += p[m] * Ap[m]
        a = rs / (pAp if pAp > ftype(0) else ftype(1))
        for i in range(r0, K, rstep):
            x[i] += a * p[i]
            r[i] -= a * Ap[i]
        _sync()
        rs_new = ftype(0)
        for m in range(K):
            rs_new += r[m] * r[m]
        c = rs_new / (rs if rs > ftype(0) else ftype(1))
        for i in range(r0, K, rstep):
            p[i] = r[i] + c * p[i]
        _sync()
        rs = rs_new
        it += 1
'''


def plain_bodies(ir: LayerIR) -> list[str]:
    """The text of ``_make_bodies(K, V, ftype, jit)``, identical in the CPU and CUDA modules."""
    lay = layout(ir)
    rec = ir.recurrence
    p = ScalarPrinter()
    scal = lay.scalars
    fwd: list = []
    for a in lay.program:
        fwd += [_solve_forward(a)] if isinstance(a, Solve) else forward_stmts([a], lay.shapes)
    adj: list = []
    for a in reversed(lay.program):
        adj += _solve_adjoint(a, lay.shapes) if isinstance(a, Solve) else adjoint([a], lay.shapes, scal, {"o": "g_o"})
    init = [Stmt(st.name, lay.shapes[st.name], "=", terms_of(st.init), f"default {st.name}") for st in rec.states]
    init_adj = adjoint(tuple(Assign(st.name, st.init, st.shape) for st in rec.states), lay.shapes,
                       lay.scalar_params, {})
    zero = ["# zero the cotangents of this step's reads"]
    for n in lay.states + lay.temps + ("q", "k", "v") + lay.vec_inputs:
        d = lay.dims[n]
        cell = f"{grad_name(n)}[i, j] = ftype(0)" if d[1] != "1" else f"{grad_name(n)}[i] = ftype(0)"
        zero += [f"for i in range(r0, {d[0]}, rstep):"]
        zero += [f"    for j in range({d[1]}):", f"        {cell}"] if d[1] != "1" else [f"    {cell}"]
    zero += [f"{grad_name(n)} = ftype(0)" for n in lay.scalar_temps + scal]
    zero += ["_sync()"]
    gs = tuple(grad_name(n) for n in scal)
    ret = ("(" + ", ".join(gs) + ",)") if gs else None
    L = ["def _make_bodies(K, V, ftype, jit):",
         '    """Per-head bodies for d_k = K, d_v = V, compute dtype ``ftype`` (closure constants), jitted by ``jit``.',
         "",
         "    Every number is ``ftype(...)``, so float32 arrays are computed in float32 (no float64 promotion).",
         "    Every body handles rows range(r0, R, rstep) of each array it writes and calls _sync() after each",
         "    array statement; 1 × 1 temporaries are locals that every caller computes. Per-channel inputs are",
         "    vectors [K] or [V] (their cotangents are written into g_<name> buffers by _adjoint_body, which returns",
         "    the gradients of the parameters and scalar inputs). Returns",
         "    (_init_body, _step_body, _adjoint_body, _init_adjoint_body, _copy2, _copy1).",
         '    """']
    B = _solve_helpers(ir, {a.method for a in lay.program if isinstance(a, Solve)})
    B += _body("_init_body", lay.states + lay.params + ("r0", "rstep"), init, p)
    B += _body("_step_body", lay.fwd_args + ("r0", "rstep"), fwd, p)
    # the adjoint body recomputes the step's forward statements, zeroes the cotangents, then pulls back
    B += _body("_adjoint_body", lay.fwd_args + lay.grad_args + ("r0", "rstep"), fwd + [zero] + adj, p, ret)
    # per-key-channel parameters: their cotangents are accumulated into buffers g_<name> [K] (zeroed by the caller)
    sps = lay.scalar_params
    init_ret = ("(" + ", ".join(grad_name(n) for n in sps) + ",)") if sps else None
    B += _body("_init_adjoint_body", tuple(grad_name(s) for s in lay.states) + lay.params
               + tuple(grad_name(n) for n in lay.vec_params) + ("r0", "rstep"),
               [[f"{grad_name(n)} = ftype(0)" for n in sps]] + init_adj, p, init_ret)
    B += ["@jit", "def _copy2(dst, src, r0, rstep):",
          "    for i in range(r0, dst.shape[0], rstep):",
          "        for j in range(dst.shape[1]):",
          "            dst[i, j] = src[i, j]", "",
          "@jit", "def _copy1(dst, src, r0, rstep):",
          "    for i in range(r0, dst.shape[0], rstep):",
          "        dst[i] = src[i]", ""]
    B += ["return _init_body, _step_body, _adjoint_body, _init_adjoint_body, _copy2, _copy1"]
    return L + indent(B) + ["", ""]


def constants(ir: LayerIR) -> list[str]:
    """SPEC_NAME ... _LOG_GATE lines (the module constants of docs/contract.md §6, as in the JAX module)."""
    L = [f'SPEC_NAME = "{ir.name}"', f'SPEC_SHA256 = "{ir.spec_sha256}"', f"CODEGEN_FORMAT = {CODEGEN_FORMAT}",
         "PARAMS = {"]
    shape = lambda x: "(" + ", ".join(f'"{d}"' for d in x.shape) + ("," if len(x.shape) == 1 else "") + ")"  # noqa: E731
    L += [f'    "{x.name}": {{"shape": {shape(x)}, "init": {x.init!r}, "domain": "{x.domain}"}},' for x in ir.params]
    L += ["}", "INPUTS = {"]
    L += [f'    "{x.name}": {{"shape": {x.shape!r}, "space": "{x.space}", "domain": "{x.domain}", "role": "{x.role}"}},'
          for x in ir.inputs]
    gi = next((n for n, x in enumerate(ir.inputs) if x.role == "gate"), None)
    log_gate = gi if gi is not None and ir.inputs[gi].space == "log" else None
    L += ["}", 'FORMS = ("recurrent",)', f"FEATURE_MAP = {ir.feature_map!r}",
          f"DEFAULT_SCALE = {ir.default_scale!r}  # None in forward/step means this; 'inverse_sqrt_dk' = K ** -0.5",
          f"_PARAM_NAMES = {tuple(x.name for x in ir.params)!r}",
          f"_INPUT_NAMES = {tuple(x.name for x in ir.inputs)!r}",
          f"_INPUT_CHANNELS = {tuple(x.channel for x in ir.inputs)!r}  # None (one per token and head), 'K' or 'V'",
          f"_LOG_GATE = {log_gate!r}  # index of a log-space gate input: the per-head programs receive α = exp(g)",
          "_STATE_DIMS = {" + ", ".join(f'"{st.name}": {tuple(map(str, st.shape))!r}' for st in ir.recurrence.states)
          + "}", "", ""]
    L += ["class State(NamedTuple):", '    """Recurrent state of every (batch, head); fla layout, d_k leading.', ""]
    L += [f"    {st.name}: [B, H, {', '.join(map(str, st.shape))}] -- {st.doc}." for st in ir.recurrence.states]
    L += ['    """', ""] + [f"    {st.name}: object" for st in ir.recurrence.states] + ["", ""]
    items = ", ".join(f'"{x.name}": np.full({"(num_heads, d_k)" if x.channel else "(num_heads,)"}, {x.init!r}, '
                      'dtype=dtype)' for x in ir.params)
    if any(x.channel for x in ir.params):
        L += ["def init_params(num_heads, d_k, d_v, dtype=np.float32):",
              '    """Initial parameters in their constrained space: dict name -> numpy array of ``dtype``, [H] or',
              '    [H, K] as PARAMS states."""', "    del d_v", f"    return {{{items}}}", "", ""]
        return L
    L += ["def init_params(num_heads, d_k, d_v, dtype=np.float32):",
          '    """Initial parameters in their constrained space: dict name -> [H] numpy array of ``dtype``."""',
          "    del d_k, d_v", f"    return {{{items}}}", "", ""]
    return L


def causal_start(lay: Layout, r0: str, rs: str) -> list[str]:
    """Driver lines (inside the (b, h) loop of a backward) that find ``tl``, where the reverse sweep starts.

    ``tl`` is the last position whose output cotangent ``do[b, t, h]`` is nonzero (NaN counts as nonzero), or
    T − 1 when any final-state cotangent is nonzero; −1 when there is none. Gradients of positions after ``tl``
    are written as exact zeros and those steps are neither recomputed nor pulled back, so a non-finite value
    there never meets a zero cotangent (0 · NaN = NaN would otherwise reach every earlier position): the
    gradients at t depend only on positions ≤ t and on nonzero cotangents. Rows ``range(r0, R, rs)`` per thread.
    """
    L = ["# causality: the reverse sweep starts at the last position with a nonzero output cotangent (T − 1",
         "# if the final state's is nonzero); later positions get exact zeros and are never pulled back, so a",
         "# non-finite input there never meets a zero cotangent (0 · NaN = NaN)",
         "tl = -1", "for t in range(T):", "    for j in range(do.shape[3]):", "        if do[b, t, h, j] != 0:",
         "            tl = t"]
    for st in lay.states:
        L += [f"for i in range({grad_name(st)}_T.shape[2]):", f"    for j in range({grad_name(st)}_T.shape[3]):",
              f"        if {grad_name(st)}_T[b, h, i, j] != 0:", "            tl = T - 1"]
    L += ["for t in range(tl + 1, T):"]
    for d in ("dq", "dk", "dv"):
        L += [f"    for i in range({r0}, {d}.shape[3], {rs}):", f"        {d}[b, t, h, i] = ftype(0)"]
    for i in lay.vec_inputs:
        L += [f"    for i in range({r0}, d{i}.shape[3], {rs}):", f"        d{i}[b, t, h, i] = ftype(0)"]
    sc = lay.scalar_inputs
    if sc and r0 == "0":
        L += [f"    d{i}[b, t, h] = ftype(0)" for i in sc]
    elif sc:
        L += [f"    if {r0} == 0:"] + [f"        d{i}[b, t, h] = ftype(0)" for i in sc]
    return L


_PHI_NUMPY = {
    "identity": ['def _phi(x):', '    """φ(x) = x (FEATURE_MAP "identity")."""', "    return x", "", "",
                 'def _phi_vjp(x, dy):', '    """The cotangent of x from that of φ(x): dy itself (the identity)."""',
                 "    return dy", ""],
    "l2_normalize": [
        'def _phi(x):',
        '    """φ(x) = r x with r = (Σ x² + 1e-6)^(-1/2) over the last axis (fla\'s l2norm), in x\'s dtype."""',
        "    with np.errstate(over=\"ignore\", invalid=\"ignore\"):",
        "        return x * (x.dtype.type(1) / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + x.dtype.type(1e-6)))",
        "", "",
        'def _phi_vjp(x, dy):',
        '    """dx = r (dy − y ⟨y, dy⟩) with y = φ(x) = r x; an exact zero row where dy is a zero row (causality)."""',
        "    with np.errstate(over=\"ignore\", invalid=\"ignore\"):",
        "        r = x.dtype.type(1) / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + x.dtype.type(1e-6))",
        "        y = x * r",
        "        dx = r * (dy - y * np.sum(y * dy, axis=-1, keepdims=True))",
        "    return np.where(np.all(dy == 0, axis=-1, keepdims=True), dx.dtype.type(0), dx)", ""],
    "elu_plus_one": [
        'def _phi(x):',
        '    """φ(x) = elu(x) + 1 elementwise: x + 1 for x > 0, exp(x) otherwise (Katharopoulos et al. 2020)."""',
        "    with np.errstate(over=\"ignore\", invalid=\"ignore\"):",
        "        return np.where(x > 0, x + x.dtype.type(1), np.exp(np.minimum(x, x.dtype.type(0))))",
        "", "",
        'def _phi_vjp(x, dy):',
        '    """dx = φ\'(x) dy (1 for x > 0, exp(x) otherwise); an exact zero where dy is zero (causality)."""',
        "    with np.errstate(over=\"ignore\", invalid=\"ignore\"):",
        "        dx = dy * np.where(x > 0, x.dtype.type(1), np.exp(np.minimum(x, x.dtype.type(0))))",
        "    return np.where(dy == 0, dx.dtype.type(0), dx)", ""],
}


def features_numpy(feature_map: str) -> list[str]:
    """numpy text of ``_phi(x)`` and ``_phi_vjp(x, dy)`` for the spec's feature map (over the last axis).

    Raises:
        KeyError: an unknown feature map.
    """
    return list(_PHI_NUMPY[feature_map])


def channel_params(api: str, replacements) -> str:
    """``api`` with each (old, new) of ``replacements`` applied: the [H, K]-parameter variant of a module's API text.

    Raises:
        ValueError: an ``old`` text does not occur exactly once (the API template changed under it).
    """
    for old, new in replacements:
        if api.count(old) != 1:
            raise ValueError(f"channel_params: {old[:60]!r} occurs {api.count(old)} times in the API text")
        api = api.replace(old, new)
    return api


def divides_by_input(ir: LayerIR, lay: Layout) -> bool:
    """Whether a coefficient of the per-token program has a negative power of a per-token input (e.g. 1/α in
    RLS with forgetting), which Numba's default (Python) error model would turn into a ZeroDivisionError at 0."""
    names = set(lay.inputs)
    for a in lay.program:
        if isinstance(a, Solve):
            continue
        for t in terms_of(a.expr):
            for pw in t.coef.atoms(sp.Pow):
                if pw.exp.is_negative and {s.name for s in pw.base.free_symbols} & names:
                    return True
    return False


# Variable-length batches (cu_seqlens) of the Numba modules: the same text in layer_numba_cpu.py and
# layer_numba_cuda.py, appended after the public API. Each module defines _varlen_host(x) (any array → numpy)
# and _varlen_out(x, device) (numpy → the caller's kind of array); forward / backward hand a call with
# cu_seqlens to _varlen_forward / _varlen_backward, which run the kernels once per sequence.
VARLEN_API = '''

# ----------------------------------------------------------------------------------------------------
# Variable-length batches (cu_seqlens, fla's convention; docs/contract.md §11): the kernels run once per sequence.


def _varlen_spans(cu_seqlens, q, initial_state):
    """The (start, end) token range of each of the N sequences packed into q [1, T, H, K].

    Raises:
        ValueError: B ≠ 1; cu_seqlens not a 1-D integer array [N + 1] (N ≥ 1) with 0 = cu[0] < … < cu[N] = T;
            an initial_state field whose leading axis is not N.
    """
    shape = tuple(q.shape) if hasattr(q, "shape") else np.shape(q)
    if len(shape) != 4 or shape[0] != 1:
        raise ValueError(f"{SPEC_NAME}: with cu_seqlens the batch must hold one packed row (B = 1, q [1, T, H, K]); "
                         f"got q of shape {shape}")
    cu = _varlen_host(cu_seqlens)
    if cu.ndim != 1 or cu.shape[0] < 2 or cu.dtype.kind not in "iu":
        raise ValueError(f"{SPEC_NAME}: cu_seqlens must be a 1-D integer array [N + 1] of sequence offsets (N ≥ 1), "
                         f"got shape {cu.shape} and dtype {cu.dtype}")
    offsets = [int(x) for x in cu]
    T = shape[1]
    if offsets[0] != 0 or offsets[-1] != T:
        raise ValueError(f"{SPEC_NAME}: cu_seqlens must start at 0 and end at T = {T}; got {offsets[0]} … {offsets[-1]}")
    if any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{SPEC_NAME}: cu_seqlens must increase strictly (no empty sequence); got {offsets}")
    N = len(offsets) - 1
    if initial_state is not None:
        for n, x in zip(State._fields, initial_state):
            lead = (tuple(x.shape) if hasattr(x, "shape") else np.shape(x))[:1]
            if lead != (N,):
                raise ValueError(f"{SPEC_NAME}: with cu_seqlens the leading axis of initial_state.{n} is N = {N} "
                                 f"(one state per sequence), got shape {np.shape(x) if not hasattr(x, 'shape') else tuple(x.shape)}")
    return list(zip(offsets, offsets[1:]))


def _varlen_split(spans, arrays, states):
    """Per sequence n: the arrays [1, T, ...] cut to its tokens, and row n of each state (or None)."""
    arrays = [_varlen_host(x) for x in arrays]
    states = [None if st is None else State(*(_varlen_host(x) for x in st)) for st in states]
    for n, (s, e) in enumerate(spans):
        yield ([x[:, s:e] for x in arrays],
               [None if st is None else State(*(x[n:n + 1] for x in st)) for st in states])


def _varlen_forward(q, k, v, params, initial_state, output_final_state, form, scale, cu_seqlens, inputs):
    """forward over N packed sequences: one call per sequence, outputs concatenated along T, final states
    along the leading axis N."""
    spans = _varlen_spans(cu_seqlens, q, initial_state)
    device = hasattr(q, "copy_to_host") or hasattr(q, "__cuda_array_interface__")
    names = list(inputs)
    os, finals = [], []
    for (qs, ks, vs, *ins), (st,) in _varlen_split(spans, [q, k, v] + [inputs[n] for n in names], [initial_state]):
        o, final = forward(qs, ks, vs, params, initial_state=st, output_final_state=True, form=form, scale=scale,
                           **dict(zip(names, ins)))
        os.append(o)
        finals.append(final)
    o = _varlen_out(np.concatenate(os, axis=1), device)
    final = State(*(_varlen_out(np.concatenate(f, axis=0), device) for f in zip(*finals)))
    return o, (final if output_final_state else None)


def _varlen_backward(q, k, v, params, do, initial_state, dfinal_state, scale, cu_seqlens, inputs):
    """backward over N packed sequences: one call per sequence; token gradients concatenated along T, the
    initial states' along N, the parameters' summed."""
    spans = _varlen_spans(cu_seqlens, q, initial_state)
    if dfinal_state is not None:
        _varlen_spans(cu_seqlens, q, dfinal_state)
    device = hasattr(q, "copy_to_host") or hasattr(q, "__cuda_array_interface__")
    names = list(inputs)
    parts = []
    for (qs, ks, vs, dos, *ins), (st, dst) in _varlen_split(spans, [q, k, v, do] + [inputs[n] for n in names],
                                                            [initial_state, dfinal_state]):
        parts.append(backward(qs, ks, vs, params, dos, initial_state=st, dfinal_state=dst, scale=scale,
                              **dict(zip(names, ins))))
    out = {}
    for key in parts[0]:
        if key == "dinitial_state":
            out[key] = State(*(_varlen_out(np.concatenate(f, axis=0), device)
                               for f in zip(*(p[key] for p in parts))))
        elif key[1:] in _PARAM_NAMES:
            out[key] = _varlen_out(sum(_varlen_host(p[key]) for p in parts), device)
        else:
            out[key] = _varlen_out(np.concatenate([_varlen_host(p[key]) for p in parts], axis=1), device)
    return out
'''

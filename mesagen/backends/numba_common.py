"""Pieces shared by the Numba CPU and CUDA emitters: the layer's buffers, the plain per-head bodies, the API.

Both generated modules contain the same *plain body* text, ``_make_bodies(K, V, ftype, jit)``: per-head functions
over stored elements (printed by :mod:`mesagen.backends.loops`) that take a row range ``range(r0, R, rstep)``
and call ``_sync()`` between statements. The CPU module passes ``r0 = 0, rstep = 1`` and a no-op ``_sync``;
the CUDA module passes ``threadIdx.x, blockDim.x`` and ``cuda.syncthreads``. ``K`` and ``V`` are closure
constants, so sizes are baked per (spec, shape) without module globals.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesagen.backends.common import CODEGEN_FORMAT, indent
from mesagen.backends.loops import ScalarPrinter, Stmt, adjoint, forward_stmts, grad_name, print_stmt, terms_of
from mesagen.ir.records import Assign, LayerIR
from mesagen.ir.dims import DIMS


@dataclass(frozen=True)
class Layout:
    """Names and stored shapes of one layer's per-head buffers, in a fixed order.

    Attributes:
        states / new_states: state names and ``<name>_new``.
        temps: non-1 × 1 temporaries (arrays), excluding ``o``; ``scalar_temps``: 1 × 1 temporaries (locals).
        params / inputs: parameter and input symbol names (inputs in spec order, scalar and per-channel).
        vec_inputs: the per-channel inputs among ``inputs`` (a column K × 1 or V × 1 per token and head; the
            bodies read their elements and write their cotangents into a buffer argument ``g_<name>``).
        shapes: name → stored shape in sympy dims.
        dims: name → ("K"|"V"|"1", ...) text dims.
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

    @property
    def scalar_inputs(self) -> tuple[str, ...]:
        """The inputs that are one scalar per token and head."""
        return tuple(n for n in self.inputs if n not in self.vec_inputs)

    @property
    def scalars(self) -> tuple[str, ...]:
        """Parameters and scalar inputs: the 1 × 1 symbols whose gradients the adjoint body returns."""
        return self.params + self.scalar_inputs

    @property
    def fwd_args(self) -> tuple[str, ...]:
        """Arguments of ``_step_body``."""
        return self.states + ("q", "k", "v") + self.params + self.inputs + self.new_states + self.temps + ("o",)

    @property
    def grad_args(self) -> tuple[str, ...]:
        """Cotangent arguments of ``_adjoint_body`` after the forward ones."""
        g = grad_name
        return (("g_o",) + tuple(g(s) for s in self.new_states) + tuple(g(s) for s in self.states)
                + tuple(g(s) for s in self.temps) + ("g_q", "g_k", "g_v") + tuple(g(s) for s in self.vec_inputs))

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
    for a in rec.update + rec.readout:
        dims[a.target] = tuple(text[d] for d in a.shape)
    new = tuple(f"{s.name}_new" for s in rec.states)
    written = [a.target for a in rec.update + rec.readout if a.target not in new and a.target != "o"]
    temps = tuple(n for n in written if dims[n] != ("1", "1"))
    scalars = tuple(n for n in written if dims[n] == ("1", "1"))
    shapes = {n: tuple(DIMS[int(x)] if x == "1" else DIMS[x] for x in d) for n, d in dims.items()}
    for n in ("g_o",) + tuple(grad_name(x) for x in new + vec):
        shapes[n] = shapes[n[2:]]
    return Layout(tuple(s.name for s in rec.states), new, temps, scalars,
                  tuple(p.symbol for p in ir.params), tuple(i.symbol for i in ir.inputs), vec, shapes, dims)


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


def plain_bodies(ir: LayerIR) -> list[str]:
    """The text of ``_make_bodies(K, V, ftype, jit)``, identical in the CPU and CUDA modules."""
    lay = layout(ir)
    rec = ir.recurrence
    p = ScalarPrinter()
    scal = lay.scalars
    fwd = forward_stmts(rec.update + rec.readout, lay.shapes)
    adj = adjoint(rec.update + rec.readout, lay.shapes, scal, {"o": "g_o"})
    init = [Stmt(st.name, lay.shapes[st.name], "=", terms_of(st.init), f"default {st.name}") for st in rec.states]
    init_adj = adjoint(tuple(Assign(st.name, st.init, st.shape) for st in rec.states), lay.shapes, lay.params, {})
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
    B = []
    B += _body("_init_body", lay.states + lay.params + ("r0", "rstep"), init, p)
    B += _body("_step_body", lay.fwd_args + ("r0", "rstep"), fwd, p)
    # the adjoint body recomputes the step's forward statements, zeroes the cotangents, then pulls back
    B += _body("_adjoint_body", lay.fwd_args + lay.grad_args + ("r0", "rstep"), fwd + [zero] + adj, p, ret)
    init_ret = ("(" + ", ".join(grad_name(n) for n in lay.params) + ",)") if lay.params else None
    B += _body("_init_adjoint_body", tuple(grad_name(s) for s in lay.states) + lay.params + ("r0", "rstep"),
               [[f"{grad_name(n)} = ftype(0)" for n in lay.params]] + init_adj, p, init_ret)
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
    L += [f'    "{x.name}": {{"shape": ("H",), "init": {x.init!r}, "domain": "{x.domain}"}},' for x in ir.params]
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
    items = ", ".join(f'"{x.name}": np.full((num_heads,), {x.init!r}, dtype=dtype)' for x in ir.params)
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

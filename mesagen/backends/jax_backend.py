"""JAX backend: prints ``generated/NAME/layer_jax.py`` (the contract of docs/contract.md §10) from a :class:`LayerIR`.

The per-head programs (initial state, token step, closed-form pieces) are printed from the IR's sympy
expressions by :class:`~mesagen.backends.printing.ArrayPrinter`; the surrounding module (vmaps over batch
and heads, ``lax.scan``, the checkpointed custom VJP, the parallel form) is a fixed frame.
"""

from __future__ import annotations

import re
import textwrap

from mesagen.backends.common import CODEGEN_FORMAT, assign_comment, header, indent, shape_text
from mesagen.backends.printing import ArrayPrinter
from mesagen.ir.records import Assign, LayerIR


def _program(printer: ArrayPrinter, assigns: tuple[Assign, ...]) -> list[str]:
    out = []
    for a in assigns:
        out.append(assign_comment(a))
        out.append(f"{a.target} = {printer.doprint(a.expr)}")
    return out


def _tuple(names: list[str]) -> str:
    """Python tuple display: ``(a,)`` or ``(a, b)``."""
    return f"({names[0]},)" if len(names) == 1 else f"({', '.join(names)})"


def _dict_literal(name: str, items: list[str]) -> list[str]:
    """``NAME = {}`` or one item a line."""
    return [f"{name} = {{}}"] if not items else [f"{name} = {{"] + [f"    {i}," for i in items] + ["}"]


def _uses(body: list[str], name: str) -> bool:
    """Whether ``name`` appears as a word in the printed statements (comments excluded)."""
    pattern = re.compile(rf"\b{re.escape(name)}\b")
    return any(pattern.search(line) for line in body if not line.lstrip().startswith("#"))


def _prelude(body: list[str], lines: dict[str, str]) -> list[str]:
    """Only the setup lines (``dtype = ...``, ``K = ...``) that the body reads."""
    return [text for name, text in lines.items() if any(_uses(body, n) for n in name.split(","))]


def _neutral(x) -> float:
    """The finite stand-in for a non-finite per-token input ``x`` (an :class:`InputDecl`) in the gradient path.

    Any finite value keeps the backward finite; a neutral one also keeps the stand-in computation well scaled:
    a forget gate of 1 (0 in log space, 1 in linear space), 1 for another positive value, otherwise 0 (a step
    size or importance weight of 0: no update).
    """
    if x.role == "gate":
        return 0.0 if x.space == "log" else 1.0
    return 1.0 if x.domain == "positive" else 0.0


_FEATURE_MAPS = {
    "identity": ["def _features(x):", '    """φ(x) = x (feature map of the spec)."""', "    return x"],
    "l2_normalize": ["def _features(x):",
                     '    """φ(x) = x / √(Σ x² + 1e-6) over the last axis (fla\'s l2norm, eps 1e-6)."""',
                     "    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)"],
    "elu_plus_one": ["def _features(x):", '    """φ(x) = elu(x) + 1 (Katharopoulos et al. 2020), elementwise."""',
                     "    return jax.nn.elu(x) + 1"],
}


class JaxBackend:
    """Emits ``layer_jax.py``."""

    name = "jax"
    filename = "layer_jax.py"

    def emit(self, ir: LayerIR, derivation=None, checks=()) -> str:
        """Return the module text (see the module docstring); deterministic."""
        rec = ir.recurrence
        spd = rec.backward == "implicit"  # the ridge family: every inverse is of Σ k kᵀ + λI (λ > 0) or its inverse
        p = ArrayPrinter(spd=spd)
        states = [st.name for st in rec.states]
        pnames = [x.symbol for x in ir.params]
        inames = [x.symbol for x in ir.inputs]
        L: list[str] = []
        L += header(ir, "jax").splitlines()
        L += self._docstring(ir)
        L += ["", "from __future__ import annotations", "", "import math", "from typing import NamedTuple", "",
              "import jax", "import jax.numpy as jnp", "from jax import lax", ""]
        L += [f'SPEC_NAME = "{ir.name}"', f'SPEC_SHA256 = "{ir.spec_sha256}"', f"CODEGEN_FORMAT = {CODEGEN_FORMAT}"]
        L += _dict_literal("PARAMS", [f'"{x.name}": {{"shape": ("H",), "init": {x.init!r}, "domain": "{x.domain}"}}'
                                      for x in ir.params])
        L += _dict_literal("INPUTS", [f'"{x.name}": {{"shape": {x.shape!r}, "space": "{x.space}", '
                                      f'"domain": "{x.domain}", "role": "{x.role}"}}' for x in ir.inputs])
        L += [f"FORMS = {tuple(ir.forms)!r}", f"FEATURE_MAP = {ir.feature_map!r}",
              f"DEFAULT_SCALE = {ir.default_scale!r}  # None in forward/step means this; 'inverse_sqrt_dk' = K ** -0.5",
              f"_PARAM_NAMES = {tuple(x.name for x in ir.params)!r}",
              f"_INPUT_NAMES = {tuple(x.name for x in ir.inputs)!r}",
              f"_INPUT_NEUTRAL = {tuple(_neutral(x) for x in ir.inputs)!r}  # finite stand-ins, see _causal_forward",
              f"_STATE_DIMS = {tuple(tuple(str(d) for d in st.shape) for st in rec.states)!r}  # per-head state shapes",
              ]
        gi = next((i for i, x in enumerate(ir.inputs) if x.role == "gate"), None)
        L += [f"_LOG_GATE = {gi if gi is not None and ir.inputs[gi].space == 'log' else None!r}"
              "  # index of a log-space gate input (the per-head programs receive α = exp(g))", "", ""]
        # ---- State
        L += ["class State(NamedTuple):", '    """Recurrent state of every (batch, head); fla layout, d_k leading.', ""]
        L += [f"    {st.name}: [B, H, {', '.join(str(d) for d in st.shape)}] -- {st.doc}." for st in rec.states]
        L += ['    """', ""]
        L += [f"    {st.name}: jax.Array" for st in rec.states]
        L += ["", ""]
        L += self._init_params(ir)
        if spd:
            L += _SPD_HELPERS.splitlines()
        L += _FEATURE_MAPS[ir.feature_map] + ["", ""]
        # ---- per-head programs
        L += ["# " + "-" * 100, "# Per-head programs, printed from the verified IR (see DERIVATION.md).", ""]
        sig_p = ", ".join(pnames)
        L += [f"def _init_head(K, V, dtype{', ' + sig_p if pnames else ''}):",
              '    """Default initial state of one head (dims K, V; dtype)."""']
        for st in rec.states:
            L += [f"    {st.name} = {p.doprint(st.init)}"]
        L += [f"    return {_tuple(states)}", "", ""]
        args = ", ".join(states + ["q", "k", "v"] + pnames + inames)
        L += [f"def _step_head({args}):",
              f'    """One token for one head: states {", ".join(f"{s.name} {shape_text(s.shape)}" for s in rec.states)};'
              ' q, k [K]; v [V].',
              "",
              "    Returns:",
              "        (o [V], new states).",
              '    """']
        body = _program(p, rec.update + rec.readout)
        L += indent(_prelude(body, {"dtype": "dtype = q.dtype", "K,V": "K, V = k.shape[0], v.shape[0]"}))
        L += ["    q, k, v = q[:, None], k[:, None], v[:, None]  # columns"]
        L += [f"    {x.symbol} = {x.symbol}[:, None]  # a per-channel input, as a column" for x in ir.inputs if x.channel]
        L += indent(body)
        L += [f"    return o[:, 0], {_tuple([s + '_new' for s in states])}", "", ""]
        if ir.kernel is not None:
            L += self._kernel_heads(ir, p)
        L += self._frame(ir)
        return "\n".join(L).rstrip("\n") + "\n"

    # ------------------------------------------------------------------------------------------------ pieces
    def _docstring(self, ir: LayerIR) -> list[str]:
        rec = ir.recurrence
        backward = {
            "checkpointed": "reverse-mode autodiff through a two-level scan whose max(⌈√T⌉, 64)-token segments are "
                            "rematerialised (jax.checkpoint): only the state entering each segment is stored, so "
                            "activation memory is O(√T · B·H·(K² + K·V)) instead of O(T · ...)",
            "implicit": "implicit differentiation of the exact solution o_t = C̄_t Ā_t⁻¹ q_t (a custom VJP: per token "
                        "x_t = P_t q_t and y_t = W_tᵀ ḡ_t, and reverse running sums of ḡ_t x_tᵀ and y_t x_tᵀ; no adjoint "
                        "through the Sherman–Morrison steps, whose rounding the reverse sweep would amplify by up to "
                        "1/λ²). States are recomputed one max(⌈√T⌉, 64)-token segment at a time from stored checkpoints: "
                        "activation memory O(√T · B·H·(K² + K·V)). The forward refactorises the state from its exact "
                        "statistics (Σ v kᵀ, Σ k kᵀ + λI; Cholesky) at every segment boundary, so rank-one rounding "
                        "never accumulates over more than one segment. Transformations: jit, vmap, grad, vjp, "
                        "checkpoint and scan compose; forward mode (jvp) is not available through the custom VJP",
            "autodiff": "reverse-mode autodiff through lax.scan",
        }[rec.backward]
        lines = ['"""' + f"{ir.name} sequence layer -- JAX backend (generated by mesagen).", ""]
        lines += textwrap.wrap(ir.description, 110) + [""]
        lines += ["Layouts (fla-compatible): q, k [B, T, H, K]; v, o [B, T, H, V]; per-token inputs [B, T, H];",
                  "parameters [H], in their constrained space. Position t answers after absorbing token t.", ""]
        lines += ["Forms:", "    recurrent   -- lax.scan over T of the per-head step; O(T·(K² + K·V)) per head."]
        if ir.kernel is not None:
            lines += ["    closed_form -- parallel: o_t = C̄_t x_t with x_t = M(Ā_t) q_t, quadratic in T",
                      "                   (von Oswald et al. 2023, Sec. 3)."]
        lines += [""] + textwrap.wrap(f"Backward of the recurrent form: {backward}.", 110) + [""]
        if rec.backward == "implicit":
            lines += ["Transformations: jit, vmap (batched or unbatched parameters), grad, vjp, jax.checkpoint and lax.scan",
                      "compose in any nesting; jvp (forward mode) works for closed_form only (the recurrent form's backward",
                      "is a custom VJP)."]
        else:
            lines += ["Transformations: forward and step are plain JAX (no custom derivative rule), so jit, vmap (batched or",
                      "unbatched parameters), grad, vjp, jvp, jax.checkpoint and lax.scan compose in any nesting."]
        lines += ["Dtypes: q's dtype (float32 or float64) is the compute dtype; k, v, parameters, inputs and state may be",
                  "any real floating dtype and are cast to it; outputs and state come back in it; anything else is a",
                  "ValueError. Non-finite inputs: outputs and gradients at t depend only on positions <= t, also when a",
                  "later position holds NaN or inf (see _causal_forward). Details: docs/layers.md in the mesagen repository.",
                  ""]
        lines += ["Derivation and its verification: DERIVATION.md beside this file.", '"""']
        return lines

    def _init_params(self, ir: LayerIR) -> list[str]:
        L = ["def init_params(num_heads, d_k, d_v, dtype=jnp.float32):",
             '    """Initial parameters in their constrained space.', "",
             "    Args:", "        num_heads: H.  d_k, d_v: K and V (unused by per-head scalar parameters).",
             "        dtype: array dtype.", "", "    Returns:", "        dict name -> [H] array.", '    """',
             "    del d_k, d_v"]
        items = ", ".join(f'"{x.name}": jnp.full((num_heads,), {x.init!r}, dtype=dtype)' for x in ir.params)
        L += [f"    return {{{items}}}", "", ""]
        st = ir.recurrence.states
        pn = [x.symbol for x in ir.params]
        L += ["def init_state(batch, num_heads, d_k, d_v, params, dtype=jnp.float32):",
              '    """Default initial state (the spec\'s solver initialisation) for every (batch, head).', "",
              "    Args:", "        batch, num_heads, d_k, d_v: B, H, K, V.",
              "        params: dict name -> [H] (constrained space).  dtype: array dtype.", "",
              "    Returns:", "        State with fields " + ", ".join(f"{s.name} [B, H, "
                                                                      f"{', '.join(map(str, s.shape))}]" for s in st)
              + ".", '    """',
              "    ps = [jnp.asarray(params[n], dtype) for n in _PARAM_NAMES]",
              "    heads = jax.vmap(lambda *p: _init_head(d_k, d_v, dtype, *p), in_axes=(0,) * len(ps),"
              " axis_size=num_heads)(*ps)" if pn else
              "    heads = jax.vmap(lambda _: _init_head(d_k, d_v, dtype), axis_size=num_heads)(jnp.zeros(num_heads))",
              "    return State(*(jnp.broadcast_to(x, (batch,) + x.shape) for x in heads))", "", ""]
        return L

    def _kernel_heads(self, ir: LayerIR, p: ArrayPrinter) -> list[str]:
        kf = ir.kernel
        states = [st.name for st in ir.recurrence.states]
        pn = [x.symbol for x in ir.params]
        L = [f"def _stats_head({', '.join(states + pn)}):",
             '    """Closed form: the statistics (C̄₀ [V, K], Ā₀ [K, K]) that the old state stands for."""']
        body = _program(p, kf.stats_from_state)
        L += indent(_prelude(body, {"dtype": f"dtype = {states[0]}.dtype", "K": f"K = {states[0]}.shape[0]"}))
        L += indent(body)
        L += [f"    return C0, {'A0' if kf.uses_gram else 'None'}", "", ""]
        L += [f"def _precondition_head(q, Abar{', ' + ', '.join(pn) if pn else ''}):",
              '    """Closed form: the preconditioned query x_t = M(Ā_t) q_t [K] for one head and position."""']
        body = _program(p, kf.precondition)
        L += indent(_prelude(body, {"dtype": "dtype = q.dtype", "K": "K = q.shape[0]"}))
        L += ["    q = q[:, None]"] + indent(body)
        L += ["    return x[:, 0]", "", ""]
        L += [f"def _final_head(Cbar, Abar{', ' + ', '.join(pn) if pn else ''}):",
              '    """Closed form: the final state from C̄_T [V, K] and Ā_T [K, K]."""']
        body = _program(p, kf.state_from_stats)
        L += indent(_prelude(body, {"dtype": "dtype = Cbar.dtype", "K": "K = Cbar.shape[1]"}))
        L += indent(body)
        L += [f"    return {_tuple([s + '_new' for s in states])}", "", ""]
        return L

    def _frame(self, ir: LayerIR) -> list[str]:
        n_st, n_p, n_i = len(ir.recurrence.states), len(ir.params), len(ir.inputs)
        text = _FRAME.format(
            step_head_axes=repr((0,) * (n_st + 3 + n_p + n_i)),
            step_batch_axes=repr((0,) * (n_st + 3) + (None,) * n_p + (0,) * n_i),
        )
        if ir.kernel is not None:
            names = [x.name for x in ir.inputs]
            imp = names.index(ir.importance) if ir.importance else None
            dec = ir.decay
            text += _CLOSED_FORM.format(uses_gram=ir.kernel.uses_gram, stats_head_axes=repr((0,) * (n_st + n_p)),
                                        stats_batch_axes=repr((0,) * n_st + (None,) * n_p), importance=imp,
                                        gate_input=names.index(dec.gate) if dec and dec.source == "input" else None,
                                        gate_param=[x.name for x in ir.params].index(dec.gate)
                                        if dec and dec.source == "parameter" else None,
                                        per_channel=bool(dec and dec.per_channel))
        if ir.recurrence.backward == "checkpointed":
            text += _CHECKPOINTED
        elif ir.recurrence.backward == "implicit":
            text += _CHECKPOINTED.split("\n\ndef _scan_recurrent")[0] + _IMPLICIT
        else:
            text += "\n_scan_recurrent = _scan\n"
        text += _FORWARD_RECURRENT
        if ir.kernel is not None:
            text += _FORWARD_CLOSED_FORM_DECAYED if ir.kernel.decayed else _FORWARD_CLOSED_FORM
        text += _NONFINITE + _API
        return text.splitlines()


_SPD_HELPERS = '''def _spd_solve(A, b):
    """A⁻¹ b for a symmetric positive-definite A [K, K] and b [K, N]: Cholesky A = L Lᵀ, then forward and back
    substitution, one row at a time (XLA-CPU's batched triangular solve is orders of magnitude slower at these
    sizes). Never a general inverse."""
    L = jnp.linalg.cholesky(A)
    n = A.shape[-1]

    def forward_row(i, y):
        return y.at[i].set((b[i] - L[i] @ y) / L[i, i])

    def back_row(j, x):
        i = n - 1 - j
        return x.at[i].set((y[i] - L[:, i] @ x) / L[i, i])

    y = lax.fori_loop(0, n, forward_row, jnp.zeros_like(b))
    return lax.fori_loop(0, n, back_row, jnp.zeros_like(b))


def _spd_inv(A):
    """A⁻¹ for a symmetric positive-definite A [K, K], by Cholesky (see _spd_solve)."""
    return _spd_solve(A, jnp.eye(A.shape[-1], dtype=A.dtype))


'''

_FRAME = '''# ----------------------------------------------------------------------------------------------------
# Batched frame: vmaps over heads and batch, lax.scan over time.

_step_heads = jax.vmap(_step_head, in_axes={step_head_axes})
_step_all = jax.vmap(_step_heads, in_axes={step_batch_axes})


def _step_batched(state, q_t, k_t, v_t, ps, inputs_t):
    """One token for every (batch, head): q_t, k_t [B, H, K]; v_t [B, H, V]; ps: [H] arrays; inputs_t: [B, H]."""
    o_t, new = _step_all(*state, q_t, k_t, v_t, *ps, *inputs_t)
    return o_t, State(*new)


def _scan(ps, state, xs):
    """Scan the step over time-major xs = (q, k, v, *inputs), each [T, B, H, ...]; returns (final, o [T, B, H, V])."""

    def body(carry, x):
        q_t, k_t, v_t = x[0], x[1], x[2]
        o_t, new = _step_batched(carry, q_t, k_t, v_t, ps, x[3:])
        return new, o_t

    return lax.scan(body, state, xs)
'''

_CHECKPOINTED = '''

def _segment_length(T):
    """Segment length max(⌈√T⌉, 64): the checkpoint interval of the backward (O(√T) stored states for long T)
    and, for the ridge family, the refactorisation interval. Below 64 tokens per segment, the fixed cost of each
    boundary outweighs what it saves (and 64 rank-one steps lose little accuracy, docs/numerics.md)."""
    return max(64, math.isqrt(max(T - 1, 0)) + 1)


def _split_segments(xs, T):
    L = _segment_length(T)
    n = T // L
    head = jax.tree.map(lambda x: x[: n * L].reshape((n, L) + x.shape[1:]), xs)
    tail = jax.tree.map(lambda x: x[n * L:], xs)
    return head, tail, n, L


def _scan_recurrent(ps, state, xs):
    """lax.scan of the step in two levels: an outer scan over max(⌈√T⌉, 64)-token segments whose body is rematerialised
    (``jax.checkpoint``), so reverse mode keeps only the state entering each segment and recomputes one segment
    at a time. Plain JAX transformations throughout (no custom VJP), so jit, vmap (batched or unbatched
    parameters), grad, vjp, jvp, checkpoint and scan all compose. No inverse is ever reconstructed backwards.
    """
    T = xs[0].shape[0]
    head, tail, n, L = _split_segments(xs, T)
    segment = jax.checkpoint(lambda carry, seg: _scan(ps, carry, seg))
    mid, o_head = lax.scan(segment, state, head)
    final, o_tail = _scan(ps, mid, tail)
    o = jnp.concatenate([o_head.reshape((n * L,) + o_head.shape[2:]), o_tail], axis=0)
    return final, o
'''

_IMPLICIT = '''


def _gram_sums(seg):
    \"\"\"Σ v kᵀ [B, H, V, K] and Σ k kᵀ [B, H, K, K] over the tokens of time-major seg = (q, k, v, ...).\"\"\"
    k, v = seg[1], seg[2]
    return jnp.einsum("tbhv,tbhk->bhvk", v, k), jnp.einsum("tbhk,tbhj->bhkj", k, k)


def _scan_refactorised(ps, state, xs):
    \"\"\"Forward of the recurrent form: the rank-one (Sherman–Morrison) step inside each max(⌈√T⌉, 64)-token segment, and
    at every segment boundary a fresh state from the exact statistics C̄ = C̄₀ + Σ v kᵀ, Ā = Ā₀ + Σ k kᵀ
    (a Cholesky-based inverse), so rank-one rounding errors never accumulate over more than one segment.

    Returns:
        (final State, o [T, B, H, V], checkpoints: the State entering each full segment [n, B, H, ...],
        the State entering the tail, (C̄₀, Ā₀), (C̄_T, Ā_T)).
    \"\"\"
    T = xs[0].shape[0]
    head, tail, n, L = _split_segments(xs, T)
    stats0 = _stats_all(*state, *ps)

    def segment(carry, seg):
        st, C, A = carry
        _, o = _scan(ps, st, seg)
        dC, dA = _gram_sums(seg)
        C, A = C + dC, A + dA
        return (State(*_final_all(C, A, *ps)), C, A), (o, st)

    (mid, C, A), (o_head, checkpoints) = lax.scan(segment, (state,) + tuple(stats0), head)
    _, o_tail = _scan(ps, mid, tail)
    dC, dA = _gram_sums(tail)
    statsT = (C + dC, A + dA)
    final = State(*_final_all(*statsT, *ps))
    o = jnp.concatenate([o_head.reshape((n * L,) + o_head.shape[2:]), o_tail], axis=0)
    return final, o, checkpoints, mid, stats0, statsT


@jax.custom_vjp
def _scan_recurrent(ps, state, xs):
    \"\"\"The recurrent form, differentiated implicitly (see _scan_recurrent_bwd).\"\"\"
    final, o = _scan_refactorised(ps, state, xs)[:2]
    return final, o


def _scan_recurrent_fwd(ps, state, xs):
    final, o, checkpoints, mid, stats0, statsT = _scan_refactorised(ps, state, xs)
    return (final, o), (ps, state, xs, checkpoints, mid, statsT)


def _segment_states(ps, state, seg):
    \"\"\"The states after every token of a segment (recomputed from the state entering it): [L, B, H, ...].\"\"\"

    def body(carry, x):
        _, new = _step_batched(carry, x[0], x[1], x[2], ps, x[3:])
        return new, new

    return lax.scan(body, state, seg)[1]


def _segment_pullback(ps, state, seg, g_o, acc):
    \"\"\"Reverse sweep over one segment of L tokens. With W_t = C̄_t Ā_t⁻¹, x_t = Ā_t⁻¹ q_t = P_t q_t and
    y_t = W_tᵀ ḡ_t (ḡ_t the cotangent of o_t), the exact derivatives of o_t = C̄_t Ā_t⁻¹ q_t are
        ∂q_t = y_t,   ∂C̄_t = ḡ_t x_tᵀ,   ∂Ā_t = −y_t x_tᵀ,
    and since C̄_t, Ā_t are running sums, token i receives the reverse sums Ĉ_i = Σ_{t≥i} ḡ_t x_tᵀ and
    Â_i = −Σ_{t≥i} y_t x_tᵀ:  ∂v_i = Ĉ_i k_i,  ∂k_i = Ĉ_iᵀ v_i + (Â_i + Â_iᵀ) k_i. Inside the segment these
    are causal-masked products of [L, L] score matrices (matmuls, no loop); acc = (Ĉ, Â, seen) carries the sums
    of later segments. Positions whose own and later cotangents are all zero get exactly zero (never 0 times
    a non-finite value).
    \"\"\"
    S, P = _segment_states(ps, state, seg)                          # [L, B, H, K, V], [L, B, H, K, K]
    q, k, v = seg[0], seg[1], seg[2]
    Ch, Ah, seen = acc
    live = jnp.any(g_o != 0, axis=-1)                               # [L, B, H]
    x = jnp.where(live[..., None], jnp.einsum("tbhkj,tbhj->tbhk", P, q), 0)
    y = jnp.where(live[..., None], jnp.einsum("tbhkv,tbhv->tbhk", S, g_o), 0)
    g = jnp.where(live[..., None], g_o, 0)
    Ls = q.shape[0]
    later = jnp.arange(Ls)[:, None] >= jnp.arange(Ls)[None, :]     # [t, i]: t ≥ i
    mask = lambda a: jnp.where(later[:, :, None, None], a, 0)       # noqa: E731  [t, i, B, H]
    xk = mask(jnp.einsum("tbhk,ibhk->tibh", x, k))                  # x_tᵀ k_i
    gv = mask(jnp.einsum("tbhv,ibhv->tibh", g, v))                  # ḡ_tᵀ v_i
    yk = mask(jnp.einsum("tbhk,ibhk->tibh", y, k))                  # y_tᵀ k_i
    dv = jnp.einsum("tibh,tbhv->ibhv", xk, g) + jnp.einsum("bhvk,ibhk->ibhv", Ch, k)
    dk = (jnp.einsum("tibh,tbhk->ibhk", gv - yk, x) - jnp.einsum("tibh,tbhk->ibhk", xk, y)
          + jnp.einsum("bhvk,ibhv->ibhk", Ch, v) + jnp.einsum("bhkj,ibhj->ibhk", Ah + jnp.swapaxes(Ah, -1, -2), k))
    seen_i = seen | (jnp.cumsum(live[::-1], axis=0)[::-1] > 0)       # [L, B, H]: a live cotangent at t ≥ i
    dv = jnp.where(seen_i[..., None], dv, 0)
    dk = jnp.where(seen_i[..., None], dk, 0)
    Ch = Ch + jnp.einsum("tbhv,tbhk->bhvk", g, x)
    Ah = Ah - jnp.einsum("tbhk,tbhj->bhkj", y, x)
    seen = seen | jnp.any(live, axis=0)
    return (Ch, Ah, seen), (y, dk, dv) + tuple(jnp.zeros_like(a) for a in seg[3:])


def _scan_recurrent_bwd(res, cotangents):
    \"\"\"Implicit differentiation of the exact ridge solution (no adjoint through Sherman–Morrison steps, whose
    rounding errors the reverse sweep would amplify by up to 1/λ²): the final state's cotangent is pulled back
    through state_from_stats, every output's through the formulas of _segment_pullback, and the statistics'
    reverse sums Ĉ₀, Â₀ through stats_from_state to the initial state. Recomputes one segment at a time from
    the stored checkpoints: activation memory O(√T · B·H·(K² + K·V)).
    \"\"\"
    ps, state, xs, checkpoints, mid, statsT = res
    g_final, g_o = cotangents
    T = g_o.shape[0]
    head, tail, n, L = _split_segments(xs, T)
    live_final = jnp.any(jnp.stack([jnp.any(g != 0, axis=(-2, -1)) for g in g_final]), axis=0)   # [B, H]
    _, pull_final = jax.vjp(lambda C, A, *p: State(*_final_all(C, A, *p)), *statsT, *ps)
    gC, gA, *g_ps = pull_final(State(*(jnp.where(live_final[..., None, None], g, 0) for g in g_final)))
    gC = jnp.where(live_final[..., None, None], gC, 0)
    gA = jnp.where(live_final[..., None, None], gA, 0)
    acc = (gC, gA, live_final)
    acc, g_tail = _segment_pullback(ps, mid, tail, g_o[n * L:], acc)
    g_o_head = g_o[: n * L].reshape((n, L) + g_o.shape[1:])

    def back(acc, seg):
        checkpoint, xs_seg, g_o_seg = seg
        return _segment_pullback(ps, checkpoint, xs_seg, g_o_seg, acc)

    (gC0, gA0, _), g_head = lax.scan(back, acc, (checkpoints, head, g_o_head), reverse=True)
    _, pull_stats = jax.vjp(lambda st, *p: _stats_all(*st, *p), state, *ps)
    g_state, *g_ps0 = pull_stats((gC0, gA0))
    g_xs = jax.tree.map(lambda a, b: jnp.concatenate([a.reshape((n * L,) + a.shape[2:]), b], axis=0),
                        g_head, g_tail)
    return tuple(a + b for a, b in zip(g_ps, g_ps0)), g_state, g_xs


_scan_recurrent.defvjp(_scan_recurrent_fwd, _scan_recurrent_bwd)
'''

_FORWARD_RECURRENT = '''

def _recurrent_inputs(inputs):
    """Per-token inputs as the per-head programs read them: a log-space forget gate g becomes α = exp(g)."""
    inputs = tuple(inputs)
    if _LOG_GATE is None:
        return inputs
    return inputs[:_LOG_GATE] + (jnp.exp(inputs[_LOG_GATE]),) + inputs[_LOG_GATE + 1:]


@jax.jit
def _forward_recurrent(q, k, v, ps, state, inputs):
    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v) + _recurrent_inputs(inputs))
    final, o = _scan_recurrent(tuple(ps), state, xs)
    return jnp.swapaxes(o, 0, 1), final
'''

_CLOSED_FORM = '''
_stats_all = jax.vmap(jax.vmap(_stats_head, in_axes={stats_head_axes}), in_axes={stats_batch_axes})
_precondition_all = jax.vmap(jax.vmap(jax.vmap(_precondition_head, in_axes=(0, 0) + (0,) * len(_PARAM_NAMES)),
                                      in_axes=(0, 0) + (None,) * len(_PARAM_NAMES)),
                             in_axes=(0, 0) + (None,) * len(_PARAM_NAMES))
_final_all = jax.vmap(jax.vmap(_final_head, in_axes=(0, 0) + (0,) * len(_PARAM_NAMES)),
                      in_axes=(0, 0) + (None,) * len(_PARAM_NAMES))
_USES_GRAM = {uses_gram}
_IMPORTANCE = {importance}  # index of the importance-weight input, or None
_GATE_INPUT = {gate_input}  # index of the forget-gate input, or None
_GATE_PARAM = {gate_param}  # index of the forget-gate parameter (a constant decay per head), or None
_PER_CHANNEL = {per_channel}  # one gate per key channel


'''

_FORWARD_CLOSED_FORM = '''

@jax.jit
def _forward_closed_form(q, k, v, ps, state, inputs):
    """Parallel form: Ā_t by a cumulative sum over time, x_t = M(Ā_t) q_t, o = C̄₀ x + tril(X Kᵀ) V."""
    B, T, H, K = q.shape
    C0, A0 = _stats_all(*state, *ps)                                  # [B, H, V, K], [B, H, K, K]
    if _IMPORTANCE is not None:                                         # β_i weights pair i: scale v_i (and k_i k_iᵀ)
        v = v * inputs[_IMPORTANCE][..., None]
    if _USES_GRAM:
        kw = k if _IMPORTANCE is None else k * inputs[_IMPORTANCE][..., None]
        Abar = A0[:, None] + jnp.cumsum(jnp.einsum("bthk,bthj->bthkj", kw, k), axis=1)   # [B, T, H, K, K]
    else:
        Abar = jnp.zeros((B, T, H, 0, 0), q.dtype)
    x = _precondition_all(q, Abar, *ps)                                # [B, T, H, K]
    scores = jnp.einsum("bthk,bshk->bhts", x, k)                       # [B, H, T, T]
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))
    # Multiply the masked scores only with finite values (0·NaN would reach every position); the non-finite
    # entries of v reach positions t ≥ s through a cumulative sum, where the recurrence has them too.
    finite_v = jnp.isfinite(v)
    o = (jnp.einsum("bhts,bshv->bthv", jnp.where(causal, scores, 0), jnp.where(finite_v, v, 0))
         + jnp.einsum("bhvk,bthk->bthv", C0, x) + jnp.cumsum(jnp.where(finite_v, 0, v), axis=1))
    Cbar = C0 + jnp.einsum("bthv,bthk->bhvk", v, k)
    Abar_T = Abar[:, -1] if _USES_GRAM else jnp.zeros((B, H, 0, 0), q.dtype)
    return o, State(*_final_all(Cbar, Abar_T, *ps))
'''

_FORWARD_CLOSED_FORM_DECAYED = '''

def _log_decay(ps, inputs, B, T, H):
    """G_t = Σ_{j≤t} log α_j, [B, T, H] (or [B, T, H, K] per key channel): the decay ω_{t,i} = exp(G_t − G_i)."""
    if _GATE_PARAM is not None:                                          # a constant decay γ per head
        return jnp.broadcast_to(jnp.arange(1, T + 1, dtype=ps[_GATE_PARAM].dtype)[:, None]
                                * jnp.log(ps[_GATE_PARAM]), (B, T, H))
    g = inputs[_GATE_INPUT]
    return jnp.cumsum(g if _LOG_GATE is not None else jnp.log(g), axis=1)


@jax.jit
def _forward_closed_form(q, k, v, ps, state, inputs):
    """Parallel form with decayed weights: o_t = C̄_t x_t with
        C̄_t = ω_{t,0} C̄₀ + Σ_{i≤t} ω_{t,i} v_i k_iᵀ,  ω_{t,i} = exp(G_t − G_i)  (per key channel: on k's channels),
    x_t = M(Ā_t) q_t. Decays come from differences of cumulative log gates masked to i ≤ t before the exp (never
    a product of α's, which underflows, and never exp of a positive number); quadratic in T."""
    B, T, H, K = q.shape
    if T == 0:                                                          # nothing to absorb
        return jnp.zeros((B, 0, H, v.shape[-1]), q.dtype), state
    C0, A0 = _stats_all(*state, *ps)                                  # [B, H, V, K], [B, H, K, K]
    if _IMPORTANCE is not None:                                         # β_i weights pair i
        v = v * inputs[_IMPORTANCE][..., None]
    G = _log_decay(ps, inputs, B, T, H)                                 # [B, T, H] or [B, T, H, K]
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))                     # [t, i]: i ≤ t
    diff = G[:, :, None] - G[:, None, :]                                # [B, t, i, H(, K)]: G_t − G_i
    mask = causal.reshape((1, T, T) + (1,) * (diff.ndim - 3))
    decay = jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0)), 0)       # ω_{t,i}, exactly 0 for i > t
    last = jnp.exp(G[:, -1:] - G)                                       # ω_{T,i}
    if _PER_CHANNEL:
        x = _x_plain(q, ps)                                             # [B, T, H, K]
        scores = jnp.einsum("bthk,bihk,btihk->bhti", x, k, decay)
        o0 = jnp.einsum("bhvk,bthk->bthv", C0, x * jnp.exp(G))
        Cbar = C0 * jnp.exp(G[:, -1])[:, :, None, :] + jnp.einsum("bthv,bthk->bhvk", v, k * last)
        Abar_T = jnp.zeros((B, H, 0, 0), q.dtype)
    else:
        if _USES_GRAM:
            kw = k if _IMPORTANCE is None else k * inputs[_IMPORTANCE][..., None]
            Abar = (jnp.exp(G)[..., None, None] * A0[:, None]
                    + jnp.einsum("btih,bihk,bihj->bthkj", decay, kw, k))     # [B, T, H, K, K]
            Abar_T = Abar[:, -1]
        else:
            Abar = jnp.zeros((B, T, H, 0, 0), q.dtype)
            Abar_T = jnp.zeros((B, H, 0, 0), q.dtype)
        x = _precondition_all(q, Abar, *ps)                            # [B, T, H, K]
        scores = jnp.einsum("bthk,bihk->bhti", x, k) * jnp.moveaxis(decay, 3, 1)
        o0 = jnp.exp(G)[..., None] * jnp.einsum("bhvk,bthk->bthv", C0, x)
        Cbar = C0 * jnp.exp(G[:, -1])[:, :, None, None] + jnp.einsum("bthv,bthk->bhvk", v * last[..., None], k)
    finite_v = jnp.isfinite(v)
    o = (jnp.einsum("bhti,bihv->bthv", jnp.where(causal, scores, 0), jnp.where(finite_v, v, 0)) + o0
         + jnp.cumsum(jnp.where(finite_v, 0, v), axis=1))
    return o, State(*_final_all(Cbar, Abar_T, *ps))


def _x_plain(q, ps):
    """x_t = M q_t for a preconditioner that does not read Ā (one GD step), [B, T, H, K]."""
    B, T, H, _ = q.shape
    return _precondition_all(q, jnp.zeros((B, T, H, 0, 0), q.dtype), *ps)
'''

_NONFINITE = '''

def _causal_forward(impl, q, k, v, ps, state, inputs):
    """``impl(q, k, v, ps, state, inputs)`` whose outputs and gradients stay causal for non-finite inputs.

    Plain autodiff multiplies the zero cotangents of positions after the loss by the primal values there, so
    one NaN or inf at position s made every gradient NaN (0·NaN). Here the gradient path runs ``impl`` on the
    inputs with their non-finite entries replaced by finite stand-ins (0 for q, k, v; _INPUT_NEUTRAL for
    per-token inputs), and wherever the recurrence on the inputs as given (``_values``) is non-finite, the
    value is taken from it. Finite inputs skip ``_values`` (lax.cond; under vmap both branches run).

    Result: o[:, t] and every gradient through it depend only on positions ≤ t; gradients of a loss on finite
    outputs are exact; non-finite outputs carry no gradient. Plain JAX (no custom derivative rule), so jit,
    vmap, grad, vjp, jvp, checkpoint and scan compose.
    """
    xs = (q, k, v) + tuple(inputs)
    stand_in = (0.0, 0.0, 0.0) + _INPUT_NEUTRAL
    clean = [jnp.where(jnp.isfinite(x), x, jnp.asarray(c, x.dtype)) for x, c in zip(xs, stand_in)]
    o_c, final_c = impl(clean[0], clean[1], clean[2], ps, state, tuple(clean[3:]))
    all_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))
    given = lax.stop_gradient((q, k, v, tuple(ps), state, tuple(inputs)))
    o_a, final_a = lax.cond(all_finite, lambda: lax.stop_gradient((o_c, final_c)), lambda: _values(*given))
    pick = lambda a, c: jnp.where(jnp.isfinite(a), c, a)  # noqa: E731
    return pick(o_a, o_c), jax.tree.map(pick, final_a, final_c)


_causal_forward_jit = jax.jit(_causal_forward, static_argnums=0)


def _values(q, k, v, ps, state, inputs):
    """The plain token-by-token recurrence (values only): (o [B, T, H, V], final State)."""
    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v) + _recurrent_inputs(inputs))
    final, o = _scan(tuple(ps), state, xs)
    return jnp.swapaxes(o, 0, 1), final
'''

_API = '''

# ----------------------------------------------------------------------------------------------------
# Public API (docs/contract.md §10).

_COMPUTE_DTYPES = (jnp.float32, jnp.float64)


def _real_floating(name, x):
    """Refuse a non-real-floating array ``x`` (integer, bool, complex) named ``name``; any float width passes."""
    dtype = jnp.asarray(x).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{SPEC_NAME}: {name} must be a real floating-point array (it is cast to q's dtype), "
                         f"got {dtype}")


def _check_domain(what, x, domain):
    """Refuse concrete finite values outside the declared domain ("positive": > 0, "unit_interval": [0, 1],
    "nonpositive": ≤ 0 (a log-space gate), "positive_unit_interval": (0, 1] (a linear-space gate)).
    Traced values (under jit, grad, vmap) cannot be inspected and pass; non-finite values are left to the
    causality rule (see _causal_forward)."""
    if domain == "real":
        return
    x = jnp.asarray(x)
    inside = {"positive": lambda: x > 0, "unit_interval": lambda: (x >= 0) & (x <= 1), "nonpositive": lambda: x <= 0,
              "positive_unit_interval": lambda: (x > 0) & (x <= 1)}[domain]()
    try:
        ok = bool(jnp.all(inside | ~jnp.isfinite(x)))
    except jax.errors.ConcretizationTypeError:
        return
    if not ok:
        raise ValueError(f"{SPEC_NAME}: {what} has values outside its domain {domain!r} "
                         f"(e.g. {float(x[~(inside | ~jnp.isfinite(x))].ravel()[0])!r})")


def _check(q, k, v, params, inputs, lead):
    """Validate dtypes (the dtype policy: q float32 or float64 sets the compute dtype; k, v, parameters, inputs
    real floating of any width) and shapes of forward's / step's arguments; raise ValueError naming the argument."""
    if not any(q.dtype == d for d in _COMPUTE_DTYPES):
        raise ValueError(f"{SPEC_NAME}: q has dtype {q.dtype}, but q's dtype is the compute dtype and must be float32 "
                         f"or float64; cast with q.astype(jnp.float32)")
    _real_floating("k", k)
    _real_floating("v", v)
    if q.ndim != lead + 1:
        want = "forward expects q, k [B, T, H, K]" if lead == 3 else "step expects q_t, k_t [B, H, K]"
        raise ValueError(f"{SPEC_NAME}: {want} ({lead + 1} axes); got q with {q.ndim} axes, shape {q.shape}")
    if not isinstance(params, dict):
        raise ValueError(f"{SPEC_NAME}: params must be a dict name -> [H] array, got {type(params).__name__}")
    if q.ndim != lead + 1 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1] or v.ndim != q.ndim:
        raise ValueError(f"{SPEC_NAME}: expected q, k [..., H, K] and v [..., H, V] with equal leading axes; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    H = q.shape[-2]
    for n in _PARAM_NAMES:
        if n not in params:
            raise ValueError(f"{SPEC_NAME}: missing parameter {n!r} (expected {list(_PARAM_NAMES)})")
        if jnp.shape(params[n]) != (H,):
            raise ValueError(f"{SPEC_NAME}: parameter {n!r} must have shape [H] = ({H},), got {jnp.shape(params[n])}")
        _real_floating(f"parameter {n!r}", params[n])
        _check_domain(f"parameter {n!r}", params[n], PARAMS[n]["domain"])
    unknown = sorted(set(inputs) - set(_INPUT_NAMES))
    missing = sorted(set(_INPUT_NAMES) - set(inputs))
    if unknown or missing:
        raise ValueError(f"{SPEC_NAME}: per-token inputs must be exactly {list(_INPUT_NAMES)}; "
                         f"missing {missing}, unknown {unknown}")
    for n in _INPUT_NAMES:
        channel = {"K": q.shape[-1:], "V": v.shape[-1:]}.get(INPUTS[n]["shape"][-1], ())
        want = q.shape[:-1] + channel
        if jnp.shape(inputs[n]) != want:
            raise ValueError(f"{SPEC_NAME}: input {n!r} must have shape {INPUTS[n]['shape'][3 - lead:]} = {want}, "
                             f"got {jnp.shape(inputs[n])}")
        _real_floating(f"input {n!r}", inputs[n])
        _check_domain(f"input {n!r}", inputs[n], INPUTS[n]["domain"])


def _state_in(state, B, H, K, V, dtype):
    """The caller's initial state as a State of ``dtype`` arrays, after checking its fields and shapes."""
    if not isinstance(state, (tuple, list)):
        raise ValueError(f"{SPEC_NAME}: initial_state must be a State{State._fields} (a NamedTuple of arrays, e.g. "
                         f"the final state of forward or step), got {type(state).__name__}")
    if len(state) != len(State._fields):
        raise ValueError(f"{SPEC_NAME}: initial_state must have fields {State._fields}, got {len(state)} arrays")
    size = {"K": K, "V": V}
    out = []
    for name, x, dims in zip(State._fields, state, _STATE_DIMS):
        x = jnp.asarray(x)
        want = (B, H) + tuple(size[d] for d in dims)
        if x.shape != want:
            raise ValueError(f"{SPEC_NAME}: initial_state.{name} must have shape {want}, got {x.shape}")
        _real_floating(f"initial_state.{name}", x)
        out.append(x.astype(dtype))
    return State(*out)


def _query_scale(scale, K, dtype):
    """The query scale as a dtype scalar: ``scale``, or DEFAULT_SCALE when None ('inverse_sqrt_dk': K ** -0.5)."""
    if scale is None:
        scale = K ** -0.5 if DEFAULT_SCALE == "inverse_sqrt_dk" else DEFAULT_SCALE
    return jnp.asarray(scale, dtype)


def forward(q, k, v, params, *, initial_state=None, output_final_state=False, form="recurrent", scale=None,
            **inputs):
    """Run the layer over a sequence.

    Args:
        q: [B, T, H, K] queries, float32 or float64: q's dtype is the compute dtype.
        k: [B, T, H, K] keys.  v: [B, T, H, V] values.  Real floating, any width; cast to q's dtype.
        params: dict name -> [H] real floating array, constrained space (see PARAMS); cast to q's dtype.
        initial_state: a State ([B, H, ...] real floating fields, cast to q's dtype), or None for the solver's
            default initialisation.
        output_final_state: also return the state after the last token.
        form: one of FORMS; every form computes the same function (to float64 round-off).
        scale: the query scale (fla's meaning: q ← scale · φ(q), φ = FEATURE_MAP, also applied to k); None for
            DEFAULT_SCALE. A Python float or a scalar array.
        **inputs: per-token inputs (see INPUTS), each [B, T, H] or per channel [B, T, H, K] / [B, T, H, V],
            real floating; cast to q's dtype. A forget gate is in the space INPUTS states (log: g ≤ 0).

    Returns:
        (o [B, T, H, V], final State or None), both in q's dtype.

    Parameter values are not range-checked (they may be traced): keep them in their domain (PARAMS).
    Causal for any input: o[:, t] and the gradients through it depend on positions ≤ t only, also when a
    later position holds NaN or ±inf.

    Raises:
        ValueError: unknown form; q not float32/float64 (float16, bfloat16, integer, bool, complex: cast with
            q.astype(jnp.float32)); k, v, a parameter, an input or a state field not real floating;
            inconsistent shapes; missing or unknown parameters or inputs; an initial state of the wrong fields
            or shapes.
    """
    if form not in FORMS:
        raise ValueError(f"{SPEC_NAME}: unknown form {form!r}; this layer offers {FORMS}")
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check(q, k, v, params, inputs, 3)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = q.dtype
    ps = [jnp.asarray(params[n], dtype) for n in _PARAM_NAMES]
    ins = [jnp.asarray(inputs[n], dtype) for n in _INPUT_NAMES]
    state = init_state(B, H, K, V, params, dtype) if initial_state is None else \
        _state_in(initial_state, B, H, K, V, dtype)
    impl = _forward_recurrent if form == "recurrent" else _forward_closed_form
    q, k = _query_scale(scale, K, dtype) * _features(q), _features(k.astype(dtype))
    o, final = _causal_forward_jit(impl, q, k, v.astype(dtype), ps, state, ins)
    return o, (final if output_final_state else None)


def step(state, q_t, k_t, v_t, params, *, scale=None, **inputs_t):
    """Decode one token.

    Args:
        state: State ([B, H, ...] real floating fields).
        q_t: [B, H, K], float32 or float64 (the compute dtype).  k_t: [B, H, K].  v_t: [B, H, V].
        params: dict name -> [H] array (see PARAMS).  scale: as in forward.
        **inputs_t: per-token inputs, each [B, H] (per channel [B, H, K] / [B, H, V]).
        Everything but q_t: real floating of any width, cast to q_t's dtype.

    Returns:
        (o_t [B, H, V], new State), in q_t's dtype.

    Raises:
        ValueError: q_t not float32/float64 (cast with q_t.astype(jnp.float32)); another argument not real
            floating; inconsistent shapes; missing or unknown parameters or inputs; a state of the wrong
            fields or shapes.
    """
    q_t, k_t, v_t = jnp.asarray(q_t), jnp.asarray(k_t), jnp.asarray(v_t)
    _check(q_t, k_t, v_t, params, inputs_t, 2)
    dtype = q_t.dtype
    ps = [jnp.asarray(params[n], dtype) for n in _PARAM_NAMES]
    ins = [jnp.asarray(inputs_t[n], dtype) for n in _INPUT_NAMES]
    B, H, K = q_t.shape
    state = _state_in(state, B, H, K, v_t.shape[-1], dtype)
    q_t, k_t = _query_scale(scale, K, dtype) * _features(q_t), _features(k_t.astype(dtype))
    return _step_jit(state, q_t, k_t, v_t.astype(dtype), ps, _recurrent_inputs(ins))


_step_jit = jax.jit(_step_batched)
'''

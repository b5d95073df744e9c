"""JAX backend: prints ``generated/NAME/layer_jax.py`` (the contract of docs/contract.md §10) from a :class:`LayerIR`.

The per-head programs (initial state, token step, closed-form pieces) are printed from the IR's sympy
expressions by :class:`~mesagen.backends.printing.ArrayPrinter`; the surrounding module (vmaps over batch
and heads, ``lax.scan``, the custom VJP of the ridge family, the parallel forms, the public API) is a fixed frame,
kept as the lintable template module :mod:`mesagen.backends.templates.jax_layer` and filled with checked
placeholders (:func:`mesagen.backends.templates.fill`).
"""

from __future__ import annotations

import re
import textwrap

from mesagen.backends.common import CODEGEN_FORMAT, assign_comment, header, indent, shape_text
from mesagen.backends.printing import ArrayPrinter
from mesagen.backends.templates import fill
from mesagen.backends.jax_kernel import emit_kernel_jax
from mesagen.ir.records import Assign, KernelLayerIR, LayerIR


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


def _param_columns(ir: LayerIR) -> list[str]:
    """Lines turning every per-key-channel parameter ([K] for one head) into the column the printed programs read."""
    return [f"    {x.symbol} = {x.symbol}[:, None]  # a per-key-channel parameter, as a column" for x in ir.params
            if x.channel]


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
        if isinstance(ir, KernelLayerIR):  # softmax / forgetting attention: a KV-cache frame of its own
            return emit_kernel_jax(ir)
        rec = ir.recurrence
        spd = ir.linear_solve is not None  # exact solvers: every inverse is of Σ ω β k kᵀ + Λ (Λ > 0) or its inverse
        p = ArrayPrinter(spd=spd, solve="_cg_solve" if ir.cg else None)
        states = [st.name for st in rec.states]
        pnames = [x.symbol for x in ir.params]
        inames = [x.symbol for x in ir.inputs]
        L: list[str] = []
        L += header(ir, "jax").splitlines()
        L += self._docstring(ir)
        L += ["", "from __future__ import annotations", "", "import math", "from typing import NamedTuple", "",
              "import jax", "import jax.numpy as jnp", "from jax import lax", ""]
        L += [f'SPEC_NAME = "{ir.name}"', f'SPEC_SHA256 = "{ir.spec_sha256}"', f"CODEGEN_FORMAT = {CODEGEN_FORMAT}"]
        L += _dict_literal("PARAMS", [f'"{x.name}": {{"shape": {_tuple([chr(34) + d + chr(34) for d in x.shape])}, "init": {x.init!r}, '
                                      f'"domain": "{x.domain}"}}'
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
            L += fill("jax_layer", "spd_helpers").splitlines()
        if ir.cg:
            L += fill("jax_layer", "cg_helpers", max_iterations=repr(ir.cg[0]), tolerance=repr(ir.cg[1])).splitlines()
        L += _FEATURE_MAPS[ir.feature_map] + ["", ""]
        # ---- per-head programs
        L += ["# " + "-" * 100, "# Per-head programs, printed from the verified IR (see DERIVATION.md).", ""]
        sig_p = ", ".join(pnames)
        L += [f"def _init_head(K, V, dtype{', ' + sig_p if pnames else ''}):",
              '    """Default initial state of one head (dims K, V; dtype)."""']
        L += _param_columns(ir)
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
        L += ["    q, k, v = q[:, None], k[:, None], v[:, None]  # columns"] + _param_columns(ir)
        L += [f"    {x.symbol} = {x.symbol}[:, None]  # a per-channel input, as a column" for x in ir.inputs if x.channel]
        L += indent(body)
        L += [f"    return {rec.output}[:, 0], {_tuple(list(rec.new_names))}", "", ""]
        if ir.kernel is not None:
            L += self._kernel_heads(ir, p)
        if ir.delta_chunk is not None:
            L += self._delta_step_head(ir, p)
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
        }[rec.backward]
        lines = ['"""' + f"{ir.name} sequence layer -- JAX backend (generated by mesagen).", ""]
        lines += textwrap.wrap(ir.description, 110) + [""]
        lines += ["Layouts (fla-compatible): q, k [B, T, H, K]; v, o [B, T, H, V]; per-token inputs [B, T, H];",
                  "parameters [H], in their constrained space. Position t answers after absorbing token t.", ""]
        lines += ["Forms:", "    recurrent   -- lax.scan over T of the per-head step; O(T·(K² + K·V)) per head."]
        if ir.kernel is not None:
            lines += ["    closed_form -- parallel: o_t = C̄_t x_t with x_t = M(Ā_t) q_t, quadratic in T",
                      "                   (von Oswald et al. 2023, Sec. 3)."]
        ridge_chunked = "chunked" in ir.forms and ir.kernel is not None and ir.kernel.gram_chunkable
        stats_chunked = "chunked" in ir.forms and ir.kernel is not None and ir.kernel.stats_chunkable
        if ir.delta_chunk is not None:
            lines += ["    chunked     -- chunkwise parallel, the WY / UT form of the delta rule (Yang et al. 2024, Sec. 3;",
                      "                   gated: Yang et al. 2025): per chunk of C tokens (chunk_size, default 64) one",
                      "                   unit lower-triangular solve (I + tril(diag(ε) K Kᵀ ⊙ Γ, −1)) U = diag(ε)(V − …)",
                      "                   for the pseudo-values U, then masked matmuls; the state carried from chunk to",
                      "                   chunk by lax.scan; O(T·C·(C + K + V) + T·K·V) per head. ε_t is the effective",
                      "                   step of the delta update (_delta_step_head). Decays Γ are exp(G_t − G_i) of",
                      "                   cumulative log gates within one chunk, masked to i ≤ t before the exp (see",
                      "                   _delta_chunk_step)."]
        elif ridge_chunked:
            lines += ["    chunked     -- exact chunkwise-parallel ridge form: chunks of C tokens (chunk_size, default 64);",
                      "                   per chunk one Cholesky factorisation of the Gram sums entering it (K × K) and",
                      "                   one of I + K P Kᵀ (C × C) solve every position's system by prefix Woodbury;",
                      "                   O(T·(C·K + K² + K·V) + T/C·K³) per head, no sequential loop (see",
                      "                   _forward_chunked)."]
        elif stats_chunked:
            lines += ["    chunked     -- chunkwise over the running statistics: chunks of C tokens (chunk_size, default",
                      "                   64); every position's Ā_t, C̄_t is the decayed sum entering the chunk plus the",
                      "                   chunk's masked, decayed sums (batched matmuls), x_t = M(Ā_t) q_t by the layer's",
                      "                   own preconditioner for all positions at once; the exact sums carried from chunk",
                      "                   to chunk by lax.scan; O(T·(C·K² + K·V) + T·solve) per head (see",
                      "                   _forward_chunked)."]
        elif "chunked" in ir.forms:
            per_channel = bool(ir.decay and ir.decay.per_channel)
            lines += ["    chunked     -- chunkwise parallel: chunks of C tokens (chunk_size, default 64) as masked matmuls,",
                      "                   the state carried from chunk to chunk by lax.scan; O(T·C·K + T·K·V) per head.",
                      "                   Decays are exp(G_t − G_i) of cumulative log gates within one chunk, masked",
                      "                   to i ≤ t before the exp (see _forward_chunked)."]
            if per_channel:
                lines += ["                   Per key channel the in-chunk scores are Σ_d q_td k_id exp(G_td − G_id)",
                          "                   with the mask applied first (one [C, C, K] product per chunk), not the",
                          "                   factorised q ⊙ exp(G_t) against k ⊙ exp(−G_i), whose exp(−G_i) overflows",
                          "                   in float32 once a chunk's log gates sum below about −88: exact for any C."]
        lines += [""] + textwrap.wrap(f"Backward of the recurrent form: {backward}.", 110) + [""]
        if ridge_chunked:
            lines += textwrap.wrap(
                "Backward of the chunked form: implicit differentiation as for the recurrent form (a custom VJP; y_t "
                "= Ā_t⁻¹ C̄_tᵀ ḡ_t is one more prefix solve with the chunk's recomputed factorisations, never a reverse "
                "downdate). Activation memory: the inputs and the statistics entering every chunk, ⌈T/C⌉ · "
                "B·H·(K² + K·V) numbers, are all that is stored between forward and backward (no per-token state); "
                "the backward's transient work arrays are O(B·H·T·(C + K + V)).", 110) + [""]
        elif stats_chunked:
            lines += textwrap.wrap(
                "Backward of the chunked form: reverse-mode autodiff through the scan over chunks, whose body is "
                "rematerialised (jax.checkpoint): only the statistics entering each chunk are stored, ⌈T/C⌉ · "
                "B·H·(K² + K·V) numbers besides the inputs, and one chunk's work arrays (its C systems, "
                "O(B·H·C·K²), and [C, C] masks) are recomputed at a time" + (
                    "; the solves are differentiated implicitly, never through a factorisation or the iterations."
                    if ir.linear_solve else "."), 110) + [""]
        elif "chunked" in ir.forms:
            lines += textwrap.wrap(
                "Backward of the chunked form: reverse-mode autodiff through the scan over chunks, whose body is "
                "rematerialised (jax.checkpoint): only the state entering each chunk is stored, ⌈T/C⌉ · B·H·K·V "
                "numbers besides the inputs, and one chunk's work arrays (O(B·H·C·(C·K + K + V)) with a per-channel "
                "gate, O(B·H·C·(C + K + V)) otherwise) are recomputed at a time; no per-token state is stored.",
                110) + [""]
        if rec.backward == "implicit":
            custom = ("the recurrent and chunked forms' backwards are custom VJPs" if ridge_chunked else
                      "the recurrent form's backward is a custom VJP")
            lines += textwrap.wrap("Transformations: jit, vmap (batched or unbatched parameters), grad, vjp, "
                                   "jax.checkpoint and lax.scan compose in any nesting; jvp (forward mode) works for "
                                   f"closed_form only ({custom}).", 110)
        elif ir.cg:
            lines += ["Transformations: jit, vmap (batched or unbatched parameters), grad, vjp, jvp, jax.checkpoint and",
                      "lax.scan compose in any nesting; the conjugate-gradient solve (_cg_solve) is differentiated",
                      "implicitly (lax.custom_linear_solve), never through its iterations."]
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
             "        dtype: array dtype.", "", "    Returns:",
             "        dict name -> [H] array" + (" ([H, K] for a per-key-channel parameter)." if any(
                 x.channel for x in ir.params) else "."), '    """',
             "    del d_v" if any(x.channel for x in ir.params) else "    del d_k, d_v"]
        items = ", ".join(f'"{x.name}": jnp.full({"(num_heads, d_k)" if x.channel else "(num_heads,)"}, {x.init!r}, '
                          'dtype=dtype)' for x in ir.params)
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
        L += _param_columns(ir)
        body = _program(p, kf.stats_from_state)
        L += indent(_prelude(body, {"dtype": f"dtype = {states[0]}.dtype", "K": f"K = {states[0]}.shape[0]"}))
        L += indent(body)
        L += [f"    return C0, {'A0' if kf.uses_gram else 'None'}", "", ""]
        L += [f"def _precondition_head(q, Abar{', ' + ', '.join(pn) if pn else ''}):",
              '    """Closed form: the preconditioned query x_t = M(Ā_t) q_t [K] for one head and position."""']
        body = _program(p, kf.precondition)
        L += indent(_prelude(body, {"dtype": "dtype = q.dtype", "K": "K = q.shape[0]"}))
        L += ["    q = q[:, None]"] + _param_columns(ir) + indent(body)
        L += ["    return x[:, 0]", "", ""]
        L += [f"def _final_head(Cbar, Abar{', ' + ', '.join(pn) if pn else ''}):",
              '    """Closed form: the final state from C̄_T [V, K] and Ā_T [K, K]."""']
        L += _param_columns(ir)
        body = _program(p, kf.state_from_stats)
        L += indent(_prelude(body, {"dtype": "dtype = Cbar.dtype", "K": "K = Cbar.shape[1]"}))
        L += indent(body)
        L += [f"    return {_tuple(list(ir.recurrence.new_names))}", "", ""]
        return L

    def _delta_step_head(self, ir: LayerIR, p: ArrayPrinter) -> list[str]:
        """The per-head program of the chunked delta form: the effective step ε of one token (a scalar)."""
        args = ", ".join(["k"] + [x.symbol for x in ir.params] + [x.symbol for x in ir.inputs])
        L = [f"def _delta_step_head({args}):",
             '    """Chunked form: the effective step ε (a scalar) of the delta update S\' + ε k (v − S\'ᵀk)ᵀ for one head',
             '    and token; k [K] after the feature map, per-token inputs in linear space."""']
        body = _program(p, ir.delta_chunk.step)
        L += indent(_prelude(body, {"dtype": "dtype = k.dtype", "K": "K = k.shape[0]"}))
        L += ["    k = k[:, None]  # a column"]
        L += [f"    {x.symbol} = {x.symbol}[:, None]  # a per-channel input, as a column" for x in ir.inputs
              if x.channel and _uses(body, x.symbol)]
        L += indent(body)
        L += ["    return jnp.reshape(eps, ())", "", ""]
        return L

    def _frame(self, ir: LayerIR) -> list[str]:
        n_st, n_p, n_i = len(ir.recurrence.states), len(ir.params), len(ir.inputs)
        text = fill("jax_layer", "frame",
                    step_head_axes=repr((0,) * (n_st + 3 + n_p + n_i)),
                    step_batch_axes=repr((0,) * (n_st + 3) + (None,) * n_p + (0,) * n_i))
        if ir.kernel is not None:
            names = [x.name for x in ir.inputs]
            imp = names.index(ir.importance) if ir.importance else None
            dec = ir.decay
            text += fill("jax_layer", "closed_form_vmaps", uses_gram=ir.kernel.uses_gram,
                         stats_head_axes=repr((0,) * (n_st + n_p)), stats_batch_axes=repr((0,) * n_st + (None,) * n_p),
                         importance=imp, gate_input=names.index(dec.gate) if dec and dec.source == "input" else None,
                         gate_param=[x.name for x in ir.params].index(dec.gate)
                         if dec and dec.source == "parameter" else None,
                         per_channel=bool(dec and dec.per_channel))
        scan = {"checkpointed": ("segments", "checkpointed_scan"),
                "implicit": ("segments", "implicit_scan")}[ir.recurrence.backward]
        text += "".join(fill("jax_layer", part) for part in scan)
        text += fill("jax_layer", "forward_recurrent")
        if ir.kernel is not None:
            text += fill("jax_layer", "forward_closed_form_decayed" if ir.kernel.decayed else "forward_closed_form")
        if "chunked" in ir.forms and ir.delta_chunk is not None:
            names = [x.name for x in ir.inputs]
            dec = ir.decay
            text += fill("jax_layer", "chunk_log_gates") + fill("jax_layer", "forward_chunked_delta",
                         gate_input=names.index(dec.gate) if dec and dec.source == "input" else None,
                         gate_param=[x.name for x in ir.params].index(dec.gate)
                         if dec and dec.source == "parameter" else None,
                         per_channel=bool(dec and dec.per_channel),
                         delta_head_axes=repr((0,) * (1 + n_p + n_i)),
                         delta_batch_axes=repr((0,) + (None,) * n_p + (0,) * n_i))
        elif "chunked" in ir.forms and ir.kernel.chunkable:
            text += fill("jax_layer", "chunk_log_gates") + fill("jax_layer", "forward_chunked")
        elif "chunked" in ir.forms and ir.kernel.stats_chunkable:
            text += fill("jax_layer", "chunk_log_gates") + fill("jax_layer", "forward_chunked_stats")
        elif "chunked" in ir.forms:
            text += fill("jax_layer", "forward_chunked_ridge")
        text += "".join(fill("jax_layer", part) for part in ("nonfinite", "api", "varlen", "api_forward"))
        return text.splitlines()

"""Markdown backend: ``DERIVATION.md`` -- the derivation in LaTeX and the checks that verified it."""

from __future__ import annotations

import sympy as sp

from mesagen.backends.common import header
from mesagen.ir.records import USER_PREFIX, Assign, KernelLayerIR, LayerIR


def _tex(e: sp.Basic) -> str:
    """LaTeX of an IR expression, with parameters under their spec names and 1 × 1 identities as 1."""
    plain = {s: sp.Symbol(s.name[len(USER_PREFIX):]) for s in e.free_symbols
             if isinstance(s, sp.Symbol) and s.name.startswith(USER_PREFIX)}
    e = e.xreplace(plain)
    text = sp.latex(e)
    return text.replace(r"\mathbb{I}", "1") if getattr(e, "shape", None) == (1, 1) else text


def _program(assigns: tuple[Assign, ...]) -> list[str]:
    return [f"$$ {_tex(sp.Symbol(a.target))} \\leftarrow {_tex(a.expr)} \\qquad \\text{{({a.doc})}} $$"
            if a.doc else f"$$ {_tex(sp.Symbol(a.target))} \\leftarrow {_tex(a.expr)} $$" for a in assigns]


class MarkdownBackend:
    """Emits ``DERIVATION.md``."""

    name = "md"
    filename = "DERIVATION.md"

    def emit(self, ir: LayerIR, derivation, checks) -> str:
        """Return the Markdown text; deterministic."""
        if isinstance(ir, KernelLayerIR):
            return _kernel_markdown(ir, derivation, checks)
        d = derivation
        s = d.spec
        L = [header(ir, "md", "<!--"), f"# Derivation of `{ir.name}`", "", ir.description, ""]
        L += ["Source: von Oswald et al., *Uncovering mesa-optimization algorithms in Transformers* "
              "(arXiv 2309.05858); conventions of mesagen docs/family.md §1. Per head, "
              "$W \\in \\mathbb{R}^{V \\times K}$, $k, q \\in \\mathbb{R}^{K}$, $v \\in \\mathbb{R}^{V}$.", ""]
        L += ["## 1. Objective", "",
              f"Loss `{s.objective.loss}`, weights `{s.objective.weights.kind}`, regulariser "
              f"`{s.objective.regularizer.kind}`, model `{s.objective.model.kind}` "
              f"(feature map `{s.objective.model.feature_map}`), solver `{s.solver.kind}`.", "",
              f"$$ \\ell_i(W) = {_tex(d.loss_term)}, \\qquad R(W) = {_tex(d.regularizer)} $$", ""]
        w = s.objective.weights
        if w.kind == "decayed":
            src = s.inputs.get(w.gate)
            where = ("per key channel, " if src is not None and len(src.shape) == 4 else "") + (
                f"an input in {src.space} space" if src is not None else "a parameter per head")
            L += [f"Decayed weights $\\omega_{{t,i}} = \\prod_{{j=i+1}}^{{t}} \\alpha_j$ with the forget gate "
                  f"`{w.gate}` ({where}; the programs below read $\\alpha$ in linear space, a log-space gate "
                  "$g$ enters as $\\alpha = e^{g}$). Decay first: a token's forgetting acts on the state before its "
                  "own update.", ""]
        if s.objective.model.feature_map != "identity" or s.readout.scale != 1.0:
            L += [f"Feature map $\\varphi$ = `{s.objective.model.feature_map}` on $q$ and $k$, query scale "
                  f"`{s.readout.scale}`: the programs read $k \\leftarrow \\varphi(k)$ and "
                  "$q \\leftarrow \\mathrm{scale} \\cdot \\varphi(q)$.", ""]
        L += ["## 2. Gradient (term by term)", "",
              f"$$ \\nabla_W \\ell_i = {_tex(d.grad_term)}, \\qquad \\nabla_W R = {_tex(d.grad_reg)} $$", "",
              "## 3. Stationarity (collect $W$, right-invert)", "",
              f"$$ \\nabla_W \\ell_i = W \\, ({_tex(d.gram_term)}) - {_tex(d.cross_term)}, \\qquad "
              f"\\nabla_W R = W \\, ({_tex(d.gram_reg)}) $$", "",
              "With $A_t = \\sum_{i \\le t} k_i k_i^\\top$ and $C_t = \\sum_{i \\le t} v_i k_i^\\top$:", ""]
        if d.closed_form is not None:
            L += [f"$$ W_t^* = {_tex(d.closed_form)} $$", ""]
        else:
            L += ["The objective has no unique minimiser for $t < K$; the solver defines the layer.", ""]
        L += ["## 4. Recurrent form (stored layout: $V\\times K$ states kept transposed, $d_k$ leading)", ""]
        for st in ir.recurrence.states:
            L += [f"- state ${_tex(sp.Symbol(st.name))}$ ({st.shape[0]}×{st.shape[1]}): {st.doc}; "
                  f"initially ${_tex(st.init)}$"]
        L += ["", "Per token:", ""] + _program(ir.recurrence.update) + ["", "Readout:", ""]
        L += _program(ir.recurrence.readout) + [""]
        if ir.recurrence.backward == "checkpointed":
            L += ["Backward: reverse-mode differentiation of this recurrence, recomputing "
                  "$\\max(\\lceil\\sqrt{T}\\rceil, 64)$-token segments from stored states (JAX: autodiff through "
                  "rematerialised segments; Numba: the adjoint recurrence derived per assignment).", ""]
        elif ir.recurrence.backward == "implicit":
            L += ["Backward: implicit differentiation of $o_t = \\bar C_t \\bar A_t^{-1} q_t$. With "
                  "$x_t = P_t q_t$ and $y_t = W_t^\\top \\bar g_t$: $\\partial q_t = y_t$, "
                  "$\\partial \\bar C_t = \\bar g_t x_t^\\top$, $\\partial \\bar A_t = -y_t x_t^\\top$, accumulated "
                  "in reverse running sums; states recomputed from $\\lceil\\sqrt{T}\\rceil$ checkpoints, never "
                  "by reverse Sherman–Morrison downdates. The forward refactorises $P$, $W$ from the exact "
                  "statistics at every checkpoint.", ""]
        if ir.kernel is not None:
            kf = ir.kernel
            L += ["## 5. Parallel (closed) form", "",
                  "$o_t = \\bar C_t x_t$ with $\\bar C_t = \\bar C_0 + \\sum_{i\\le t} v_i k_i^\\top$, "
                  "$\\bar A_t = \\bar A_0 + \\sum_{i\\le t} k_i k_i^\\top$, computed for all $t$ at once.", ""]
            if kf.decayed:
                L += ["With decayed weights every term is weighted: $\\bar C_t = \\omega_{t,0} \\bar C_0 + "
                      "\\sum_{i \\le t} \\omega_{t,i} v_i k_i^\\top$ (per key channel: $\\omega$ scales $k_i$'s "
                      "channels), with $\\omega_{t,i} = \\exp(G_t - G_i)$ from cumulative sums $G$ of $\\log \\alpha$, "
                      "masked to $i \\le t$ before the exponential.", ""]
            L += ["From the initial state:", ""] + _program(kf.stats_from_state)
            L += ["", "Preconditioned query:", ""] + _program(kf.precondition)
            L += ["", "Final state:", ""] + _program(kf.state_from_stats) + [""]
        L += ["## Verification", "", "Every identity below was checked before any code was emitted.", "",
              "| check | method | what holds |", "|---|---|---|"]
        L += [f"| {c.name} | {c.method} | {c.detail.replace('|', '/')} |" for c in checks]
        return "\n".join(L).rstrip("\n") + "\n"


def _kernel_markdown(ir: KernelLayerIR, d, checks) -> str:
    """DERIVATION.md of a kernel-regression layer (a :class:`~mesagen.symbolic.kernel.KernelDerivation`)."""
    s = d.spec
    L = [header(ir, "md", "<!--"), f"# Derivation of `{ir.name}`", "", ir.description, ""]
    L += ["Kernel regression (Nadaraya–Watson; causal softmax attention): conventions of mesagen docs/family.md §1 "
          "and §9. Per head and query position $t$, the model is a constant $w \\in \\mathbb{R}^{V}$; "
          "$k, q \\in \\mathbb{R}^{K}$, $v \\in \\mathbb{R}^{V}$.", ""]
    L += ["## 1. Objective", "",
          f"Loss `{s.objective.loss}`, weights `kernel`" + (f" with the forget gate `{d.gate}` ({d.gate_space} space)"
                                                            if d.gate else "")
          + f", regulariser `none`, model `constant` (feature map `{s.objective.model.feature_map}`), solver "
          "`closed_form` with recurrence `kv_cache`.", "",
          "$$ w_t = \\arg\\min_w \\sum_{i \\le t} \\kappa_{t,i} \\, \\ell_i(w), \\qquad "
          f"\\kappa \\, \\ell_i(w) = {_tex(d.loss_term)}, \\qquad "
          f"\\log \\kappa_{{t,i}} = {sp.latex(d.logit)} $$", "",
          "with $s = \\varphi(k_i)^\\top \\varphi(q_t)$, the query scale `" + str(s.readout.scale) + "`"
          + (" and $G_t = \\sum_{j \\le t} \\log \\alpha_j$ the cumulative log gate, so that "
             "$e^{G_t - G_i} = \\prod_{j=i+1}^{t} \\alpha_j = \\omega_{t,i}$." if d.gate else "."), "",
          "## 2. Gradient (one term)", "",
          f"$$ \\nabla_w \\left({_tex(d.loss_term)}\\right) = {_tex(d.grad_term)} = w \\, ({_tex(d.gram_term)}) - "
          f"{_tex(d.cross_term)} $$", "",
          "## 3. Stationarity and closed form", "",
          "$\\sum_{i \\le t} \\kappa_{t,i} (w - v_i) = 0$, i.e. $w \\, a_t = C_t$ with "
          "$a_t = \\sum_{i \\le t} \\kappa_{t,i} > 0$ and $C_t = \\sum_{i \\le t} \\kappa_{t,i} v_i$ "
          "(the Hessian $a_t I$ is positive definite: the minimiser is unique):", "",
          f"$$ w_t^* = {_tex(d.closed_form)} = \\frac{{\\sum_{{i \\le t}} \\kappa_{{t,i}} v_i}}"
          "{\\sum_{i \\le t} \\kappa_{t,i}}, \\qquad o_t = w_t^* $$", "",
          "## 4. Forms", "",
          "The state is a KV cache (keys, values and each cached token's log decay relative to the newest token). "
          "Both forms compute $C_t / a_t$ with the maximum logit $m_t$ subtracted ($\\kappa \\to \\kappa e^{-m_t}$ "
          "leaves $w_t^*$ unchanged):", "",
          "- `recurrent`: exact masked attention, all logits of a call at once, explicitly normalised;",
          "- `chunked`: blockwise online softmax over key blocks: $m \\leftarrow \\max(m, \\max_i l_{t,i})$, "
          "$a \\leftarrow a \\, e^{m_{old} - m} + \\sum_i e^{l_{t,i} - m}$, "
          "$C \\leftarrow C \\, e^{m_{old} - m} + \\sum_i e^{l_{t,i} - m} v_i$, $o_t = C / a$;",
          "- `step` (decoding): the token is written into the cache's next slot, every cached log decay gets "
          "$\\log \\alpha_t$ added, and the query attends over the cache.", "",
          "Backward: reverse-mode autodiff of these forms (the chunked form's block body rematerialised).", ""]
    L += ["## Verification", "", "Every identity below was checked before any code was emitted.", "",
          "| check | method | what holds |", "|---|---|---|"]
    L += [f"| {c.name} | {c.method} | {c.detail.replace('|', '/')} |" for c in checks]
    return "\n".join(L).rstrip("\n") + "\n"

"""IR passes: small named pure functions from records to records, listed in :data:`PASSES`.

Each pass keeps results unchanged (tests run every spec with and without each pass).
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from mesagen.ir import graph
from mesagen.ir.records import Accumulator, Assign, KernelForm, Recurrence, StateDecl
from mesagen.ir.dims import mat

TOKEN_NAMES = {"q", "k", "v"}


def _param_names(ir_params: tuple, ir_inputs: tuple) -> set[str]:
    return {p.name for p in ir_params} | {i.name for i in ir_inputs}


def to_stored_layout(rec: Recurrence, kernel: KernelForm | None, stored: dict[str, tuple[str, bool]]
                     ) -> tuple[Recurrence, KernelForm | None]:
    """Rename states to their stored names and store V×K states transposed (fla layout, d_k leading).

    ``W`` (V×K) becomes ``S`` with S = Wᵀ (K×V): every read of W becomes Sᵀ and the update of S is the
    transpose of the update of W, pushed inward by ``Transpose(...).doit()``. A name of ``stored`` that is not a
    state is a temporary of the update (``Wd``, the decayed iterate): renamed and transposed the same way.
    """
    sub: dict[sp.Basic, sp.Basic] = {}
    new_targets: dict[str, tuple[str, bool]] = {}
    states = []
    state_names = {st.name for st in rec.states}
    for a in rec.update:
        if a.target in stored and a.target not in state_names:
            name, transposed = stored[a.target]
            shape = (a.shape[1], a.shape[0]) if transposed else a.shape
            new = mat(name, *shape)
            sub[mat(a.target, *a.shape)] = new.T if transposed else new
            new_targets[a.target] = (name, transposed)
    for st in rec.states:
        name, transposed = stored[st.name]
        shape = (st.shape[1], st.shape[0]) if transposed else st.shape
        for suffix in ("", "_new"):
            old = mat(st.name + suffix, *st.shape)
            new = mat(name + suffix, *shape)
            sub[old] = new.T if transposed else new
        new_targets[rec.new(st.name)] = (f"{name}_new", transposed)
        init = sp.Transpose(st.init).doit() if transposed else st.init
        states.append(StateDecl(name, shape, init, st.doc + (" (stored transposed)" if transposed else "")))

    def fix(a: Assign, rename_targets: bool) -> Assign:
        expr = a.expr.xreplace(sub)
        if rename_targets and a.target in new_targets:
            target, transposed = new_targets[a.target]
            if transposed:
                return Assign(target, sp.Transpose(expr).doit(), (a.shape[1], a.shape[0]), a.doc)
            return Assign(target, expr, a.shape, a.doc)
        return Assign(a.target, expr, a.shape, a.doc)

    rec2 = Recurrence(tuple(states), tuple(fix(a, True) for a in rec.update),
                      tuple(fix(a, True) for a in rec.readout), rec.backward,
                      tuple((s.name, new_targets[rec.new(old.name)][0]) for s, old in zip(states, rec.states)),
                      rec.output)
    if kernel is None:
        return rec2, None
    k2 = KernelForm(kernel.accumulators, tuple(fix(a, False) for a in kernel.stats_from_state),
                    tuple(fix(a, False) for a in kernel.precondition),
                    tuple(fix(a, True) for a in kernel.state_from_stats))
    return rec2, k2


def namespace_user_symbols(rec: Recurrence, kernel: KernelForm | None, mapping: dict[sp.Symbol, sp.Symbol]
                           ) -> tuple[Recurrence, KernelForm | None]:
    """Rename parameter and input symbols to their code identifiers (``lam`` → ``u_lam``, see USER_PREFIX)."""

    def fix(a: Assign) -> Assign:
        return Assign(a.target, a.expr.xreplace(mapping), a.shape, a.doc)

    states = tuple(StateDecl(s.name, s.shape, s.init.xreplace(mapping), s.doc) for s in rec.states)
    rec2 = replace(rec, states=states, update=tuple(map(fix, rec.update)), readout=tuple(map(fix, rec.readout)))
    if kernel is None:
        return rec2, None
    accs = tuple(replace(a, summand=a.summand.xreplace(mapping)) for a in kernel.accumulators)
    return rec2, KernelForm(accs, tuple(map(fix, kernel.stats_from_state)),
                            tuple(map(fix, kernel.precondition)), tuple(map(fix, kernel.state_from_stats)))


def prune_dead_states(rec: Recurrence, kernel: KernelForm | None, params: set[str]
                      ) -> tuple[Recurrence, KernelForm | None]:
    """Drop states that never influence an output (e.g. Σ k kᵀ for one GD step) and assignments that die.

    A state is live if it reaches ``o`` or the update of a live state; iterated to a fixed point.
    """
    body = rec.update + rec.readout
    available = TOKEN_NAMES | params | {st.name for st in rec.states}
    live_states: set[str] = set()
    while True:
        outputs = {rec.output} | {rec.new(s) for s in live_states}
        reach = graph.live(body, available, outputs)
        now = {st.name for st in rec.states if st.name in reach}
        if now == live_states:
            break
        live_states = now
    keep = graph.live(body, available, {rec.output} | {rec.new(s) for s in live_states})
    states = tuple(st for st in rec.states if st.name in live_states)
    rec2 = Recurrence(states, tuple(a for a in rec.update if a.target in keep),
                      tuple(a for a in rec.readout if a.target in keep), rec.backward,
                      tuple((s, t) for s, t in rec.next_state if s in live_states), rec.output)
    if kernel is None:
        return rec2, None
    dead_new = {rec.new(st.name) for st in rec.states if st.name not in live_states}
    stats = tuple(a for a in kernel.stats_from_state if a.target != "A0" or kernel.uses_gram)
    accs = tuple(a for a in kernel.accumulators if a.name != "Abar" or kernel.uses_gram)
    k2 = KernelForm(accs, stats, kernel.precondition,
                    tuple(a for a in kernel.state_from_stats if a.target not in dead_new))
    return rec2, k2


def schedule_programs(rec: Recurrence, kernel: KernelForm | None, params: set[str]
                      ) -> tuple[Recurrence, KernelForm | None]:
    """Check single assignment / acyclicity and order every program deterministically."""
    states = {st.name for st in rec.states}
    update = graph.schedule(rec.update, TOKEN_NAMES | params | states)
    readout = graph.schedule(rec.readout, TOKEN_NAMES | params | states | {a.target for a in update})
    rec2 = replace(rec, update=update, readout=readout)
    if kernel is None:
        return rec2, None
    k2 = KernelForm(kernel.accumulators,
                    graph.schedule(kernel.stats_from_state, params | states),
                    graph.schedule(kernel.precondition, params | {"q", "Abar"}),
                    graph.schedule(kernel.state_from_stats, params | {"Cbar", "Abar"}))
    return rec2, k2


def choose_backward(rec: Recurrence, kernel: KernelForm | None, params: set[str]
                    ) -> tuple[Recurrence, KernelForm | None]:
    """Choose how reverse mode of the recurrent form is generated (:data:`~mesagen.ir.records.BACKWARDS`).

    ``implicit`` when the recurrence keeps the exact ridge solution -- states (S, P) = ((C Ā⁻¹)ᵀ, Ā⁻¹) with a
    uniform-weight parallel form over the Gram sums -- because differentiating through Sherman–Morrison steps
    amplifies their rounding (docs/numerics.md); ``checkpointed`` autodiff otherwise (identical to a plain scan below
    64 tokens, O(√T) activation memory above).
    """
    ridge = [(s.name, s.shape) for s in rec.states] == [("S", ("K", "V")), ("P", ("K", "K"))]
    # the implicit backward differentiates o_t = C̄_t Ā_t⁻¹ q_t with the plain sums Σ v kᵀ, Σ k kᵀ: no decay and no
    # importance weight (a scalar symbol in a summand) -- those keep checkpointed autodiff
    unweighted = kernel is not None and all(
        not any(isinstance(x, sp.Symbol) for x in acc.summand.free_symbols) for acc in kernel.accumulators)
    if ridge and kernel is not None and kernel.uses_gram and not kernel.decayed and unweighted:
        return replace(rec, backward="implicit"), kernel
    return replace(rec, backward="checkpointed"), kernel


#: The passes run by :func:`mesagen.ir.lower.lower`, in order (name, function). Layout is mandatory, and so
#: are ``schedule`` and ``choose_backward``.
PASSES = (("prune_dead_states", prune_dead_states), ("schedule", schedule_programs),
          ("choose_backward", choose_backward))
MANDATORY = frozenset({"schedule", "choose_backward"})

"""Lower a verified :class:`~mesagen.symbolic.derive.Derivation` to a :class:`~mesagen.ir.records.LayerIR`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mesagen.ir.passes import MANDATORY, PASSES, namespace_user_symbols, to_stored_layout
import sympy as sp

from mesagen.ir.records import USER_PREFIX, Assign, Decay, DeltaChunkForm, InputDecl, LayerIR, ParamDecl

if TYPE_CHECKING:  # the IR never imports the symbolic stage at run time (no import cycle)
    from mesagen.symbolic.derive import Derivation


def lower(d: "Derivation", spec_path: str, spec_sha256: str, skip: frozenset[str] = frozenset()) -> LayerIR:
    """Build the backend-facing IR: stored layout, then every pass of :data:`~mesagen.ir.passes.PASSES`.

    Args:
        d: a derivation that passed :func:`~mesagen.symbolic.verify.verify`.
        spec_path: the spec path to record in generated headers (relative, POSIX).
        spec_sha256: the canonical spec hash.
        skip: names of optional passes to leave out (tests use this to show each pass keeps results).

    Returns:
        The :class:`LayerIR`.

    Raises:
        ValueError: a pass found the program ill-formed (double assignment, cycle, undefined read).
    """
    spec = d.spec
    w = spec.objective.weights
    gate = w.gate if w.kind == "decayed" else None
    axis = {"batch": "B", "time": "T", "heads": "H", "d_k": "K", "d_v": "V"}
    params = tuple(ParamDecl(n, p.init, p.domain, tuple(axis[a] for a in p.shape)) for n, p in spec.parameters.items())
    inputs = tuple(InputDecl(n, i.space, i.domain, tuple(axis[a] for a in i.shape),
                             "gate" if n == gate else "importance" if n == w.importance else "step_size")
                   for n, i in spec.inputs.items())
    decay = None
    if gate is not None:
        src = spec.inputs.get(gate)
        decay = Decay(gate, "input" if src else "parameter", bool(src and len(src.shape) == 4),
                      src.space if src else "linear")
    names = {p.symbol for p in params} | {i.symbol for i in inputs}
    rec, kernel = to_stored_layout(d.recurrence, d.kernel, d.stored_names)
    mapping = {sym: sp.MatrixSymbol(USER_PREFIX + name, *sym.shape) if isinstance(sym, sp.MatrixSymbol) else
               type(sym)(USER_PREFIX + name, **sym.assumptions0) for name, sym in d.params.items()}
    rec, kernel = namespace_user_symbols(rec, kernel, mapping)
    for name, fn in PASSES:
        if name not in skip or name in MANDATORY:
            rec, kernel = fn(rec, kernel, names)
    forms = ("recurrent",)
    if kernel is not None:  # the parallel form; chunkwise where KernelForm says so (a per-head gate for the stats form)
        chunks = kernel.chunkable or kernel.gram_chunkable or (
            kernel.stats_chunkable and not (decay is not None and decay.per_channel))
        forms += ("closed_form", "chunked") if chunks else ("closed_form",)
    delta_chunk = _delta_chunk(d, mapping)
    if delta_chunk is not None:  # a delta-rule recurrence: the chunked WY form
        forms += ("chunked",)
    solver = spec.solver
    linear_solve = ("conjugate_gradient" if solver.kind == "conjugate_gradient" else
                    "cholesky" if solver.kind == "closed_form" else None)
    cg = (solver.max_iterations, solver.tolerance) if solver.kind == "conjugate_gradient" else None
    return LayerIR(linear_solve=linear_solve, cg=cg, name=spec.name, spec_path=spec_path, spec_sha256=spec_sha256,
                   description=" ".join(spec.description.split()), params=params, inputs=inputs,
                   recurrence=rec, kernel=kernel, forms=forms, decay=decay, importance=w.importance,
                   feature_map=spec.objective.model.feature_map, default_scale=spec.readout.scale,
                   delta_chunk=delta_chunk)


def _delta_chunk(d: "Derivation", mapping: dict) -> DeltaChunkForm | None:
    """The derivation's delta-rule chunk form with user symbols renamed to their code identifiers, or None."""
    if d.delta_chunk is None:
        return None
    return DeltaChunkForm(tuple(Assign(a.target, a.expr.xreplace(mapping), a.shape, a.doc) for a in d.delta_chunk.step))

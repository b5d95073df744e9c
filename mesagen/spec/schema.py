"""The spec language (v1 and v2): typed, frozen records validated with pydantic.

A spec states an in-context objective along five axes -- loss, regression weights, regulariser, model,
solver -- plus the readout, the layer's parameters and its per-token inputs:

    W_t = argmin_W  ½ Σ_{i≤t} ω_{t,i} ‖v_i − W φ(k_i)‖²  +  R(W),        o_t = W_t φ(q_t)

(von Oswald et al., arXiv 2309.05858, Eq. 10 for the ridge case; docs/specs.md). Every vocabulary is closed
(``Literal``); unknown keys are errors (``extra="forbid"``); nothing in a spec is ever evaluated.
Cross-field rules that pydantic cannot express locally live in :func:`semantic_errors`, which returns
``(field_path, reason)`` pairs so that the loader can point at the exact line of the offending field.

Version 2 adds decayed regression weights ω_{t,i} = ∏_{j=i+1}^{t} α_j with a forget gate per token and head,
per key channel or per head (Yang et al. 2024, GLA; Sun et al. 2023, RetNet; Yang et al. 2025, Gated DeltaNet),
importance weights β_i on each pair's loss, the feature maps ``l2_normalize`` and ``elu_plus_one``, the
readout ``scale`` (fla's meaning) and a step size of 1 by default. A v2 key in a ``spec_version: 1`` file is an
error; every v1 spec loads and compiles to the same layer under v2.
"""

from __future__ import annotations

import keyword
import math
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, field_validator
from pydantic_core import PydanticCustomError

#: A plain identifier: a spec name, parameter or input name. No dots, slashes or spaces.
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]

#: Names a parameter or input may not take. Generated code writes every user name with a prefix (``u_lam``), so
#: no internal identifier can be shadowed; what stays reserved are the public argument names of ``forward`` /
#: ``step`` (an input is passed as a keyword), the IR's own symbols (one symbol, one meaning in DERIVATION.md),
#: and Python keywords.
RESERVED_NAMES = frozenset({
    "q", "k", "v", "o", "q_t", "k_t", "v_t", "state", "params", "inputs", "inputs_t", "form", "initial_state",
    "output_final_state", "dfinal_state", "do", "W", "S", "P", "A", "C", "x", "e", "s", "K", "V", "H", "B", "T",
    "jax", "jnp", "np", "lax", "math", "numba", "cuda",
} | set(keyword.kwlist) | set(keyword.softkwlist))

Domain = Literal["real", "positive", "unit_interval", "nonpositive", "positive_unit_interval"]
"""``real``; ``positive`` (> 0); ``unit_interval`` ([0, 1]); ``nonpositive`` (≤ 0: a forget gate in log space,
g = log α); ``positive_unit_interval`` ((0, 1]: a forget gate in linear space, α)."""

#: The feature maps φ of ``model.feature_map``, applied to q and k alike.
FEATURE_MAPS = ("identity", "l2_normalize", "elu_plus_one")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Weights(_Record):
    """Regression weights of pair i at time t: ``uniform`` (ω_{t,i} = 1) or ``decayed``
    (ω_{t,i} = ∏_{j=i+1}^{t} α_j, α the forget ``gate``), each optionally times an ``importance`` weight β_i.

    ``gate`` names an input ``[batch, time, heads]`` (a scalar gate per token and head), an input
    ``[batch, time, heads, d_k]`` (a gate per key channel: the memory forgets per channel, GLA) or a
    parameter ``[heads]`` (a constant decay per head, RetNet). v2 only.

    ``kernel`` (v2, with ``model: {kind: constant}`` only): query-dependent kernel weights
    κ_{t,i} = exp(scale · φ(k_i)ᵀ φ(q_t)), times ω_{t,i} = ∏_{j=i+1}^{t} α_j when a ``gate`` is given (an input
    ``[batch, time, heads]``, log or linear space): Nadaraya–Watson regression = causal softmax attention
    (forgetting attention with the gate; Lin et al. 2025).
    """

    kind: Literal["uniform", "decayed", "kernel"]
    gate: Identifier | None = None
    importance: Identifier | None = None


class Regularizer(_Record):
    """R(W): ``none``, or ``ridge`` = ½ λ ‖W‖²_F with λ a positive parameter (``coefficient``): one per head
    (shape ``[heads]``) or, v2, one per key channel (shape ``[heads, d_k]``: R = ½ Σ_d λ_d ‖W_{:,d}‖², i.e.
    Λ = Diag(λ); MesaNet).

    ``decays_with_data`` (v2, decayed weights only): the regulariser is forgotten with the data,
    R_t(W) = ½ λ ω_{t,0} ‖W‖² with ω_{t,0} = ∏_{j≤t} α_j (exponentially weighted recursive least squares with
    a forgetting factor). Only then does the exact solution admit a rank-one (Sherman–Morrison) recursion.
    """

    kind: Literal["none", "ridge"]
    coefficient: Identifier | None = None
    decays_with_data: bool = False


class Model(_Record):
    """The in-context model ``v ≈ W φ(k)``, queried at φ(q): ``linear``, with the feature map φ ``identity``,
    ``l2_normalize`` (φ(x) = x / √(Σ x² + 10⁻⁶), fla's l2norm) or ``elu_plus_one`` (φ(x) = elu(x) + 1;
    Katharopoulos et al. 2020). The last two are v2.

    ``constant`` (v2): v ≈ w ∈ R^V, fitted with kernel weights (``weights: {kind: kernel}``); its minimiser is
    the kernel-weighted mean w_t = Σ κ_{t,i} v_i / Σ κ_{t,i} (softmax attention; docs/family.md §9)."""

    kind: Literal["linear", "constant"]
    feature_map: Literal["identity", "l2_normalize", "elu_plus_one"] = "identity"


class Objective(_Record):
    """The in-context learning problem: ``loss`` (v1: ``squared`` = ½‖v − W φ(k)‖²) and the other axes."""

    loss: Literal["squared"]
    weights: Weights
    regularizer: Regularizer
    model: Model


class ClosedFormSolver(_Record):
    """Exact minimiser, kept recursively by ``sherman_morrison`` (rank-1 inverse updates; recursive least squares;
    with decayed weights only when the regulariser decays with the data) or, v2, by ``cholesky``: the running
    sums H_t = Σ ω β k kᵀ and G_t = Σ ω β v kᵀ are the state and every position solves (H_t + Λ) x_t = q_t by a
    Cholesky factorisation (a direct per-position solve; never a general inverse).

    ``kv_cache`` (v2, constant model with kernel weights only): the exact kernel-weighted mean, computed from
    the cached keys and values (the state is a KV cache; softmax attention with the maximum logit subtracted)."""

    kind: Literal["closed_form"]
    recurrence: Literal["sherman_morrison", "cholesky", "kv_cache"]


class ConjugateGradientSolver(_Record):
    """v2: the exact minimiser's readout x_t = (H_t + Λ)⁻¹ q_t by conjugate gradient on the running sums
    (MesaNet, von Oswald et al. 2025): at most ``max_iterations`` iterations, stopped once the residual
    ‖(H_t + Λ) x − q_t‖₂ ≤ ``tolerance`` · ‖q_t‖₂, started from the Jacobi guess x⁰ = q_t / (diag H_t + λ)."""

    kind: Literal["conjugate_gradient"]
    max_iterations: Annotated[int, Field(ge=1, le=1000)]
    tolerance: Annotated[float, Field(gt=0.0, lt=1.0)]


class ImplicitOnlineGDSolver(_Record):
    """v2: the exact implicit (proximal) online step on the newest pair, step size ``step_size`` β_t:
    W_t = argmin_W ½‖W − W'‖²_F + β_t ℓ_t(W), W' the (decayed) previous iterate. sympy derives its closed form,
    W_t = W' + ε_t e_t k_tᵀ with ε_t = β_t / (1 + β_t k_tᵀk_t) (the objective of Longhorn, Liu et al. 2024,
    solved exactly)."""

    kind: Literal["implicit_online_gd"]
    step_size: Identifier
    init: Literal["zero"] = "zero"


class GDSolver(_Record):
    """``steps`` steps of full-batch gradient descent on the objective from W⁰ = 0, step size ``step_size``
    (a parameter name; v2 may omit it for a step size of 1, fla's convention for linear attention)."""

    kind: Literal["gd"]
    steps: Annotated[int, Field(ge=1, le=32)]
    step_size: Identifier | None = None
    init: Literal["zero"] = "zero"


class OnlineGDSolver(_Record):
    """Online GD (LMS / delta rule): one gradient step on the newest term per token, step size ``step_size``.
    With decayed weights the iterate is decayed first, then stepped (gated delta rule, decay first as fla)."""

    kind: Literal["online_gd"]
    step_size: Identifier
    init: Literal["zero"] = "zero"


Solver = Annotated[Union[ClosedFormSolver, ConjugateGradientSolver, GDSolver, OnlineGDSolver, ImplicitOnlineGDSolver],
                   Field(discriminator="kind")]


class Readout(_Record):
    """How the layer answers: ``query`` = o_t = W_t (scale · φ(q_t)).

    ``scale`` is fla's: the query is multiplied by it after the feature map; ``inverse_sqrt_dk`` means
    d_k^(-1/2) (fla's default). Default 1 (v1 layers). The generated ``forward`` / ``step`` take a ``scale``
    argument that overrides it per call.
    """

    kind: Literal["query"]
    scale: Union[Literal["inverse_sqrt_dk"], float] = 1.0

    @field_validator("scale", mode="plain")
    @classmethod
    def _scale(cls, v: object) -> str | float:
        # One validator, not a pydantic union: a union reports one error per member, located at made-up
        # fields such as ``readout.scale.constrained-float``; a spec author needs one line saying what to write.
        if isinstance(v, str) and v == "inverse_sqrt_dk":
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                x = float(v)
            except OverflowError:
                x = math.inf
            if math.isfinite(x) and x > 0:
                return x
        raise PydanticCustomError("readout_scale", "the readout scale is a finite number greater than 0 (e.g. "
                                  "0.125) or 'inverse_sqrt_dk' (d_k^(-1/2), fla's default)")


AxisName = Literal["heads", "d_k", "d_v"]

#: The layouts a per-token input may have: a scalar per token and head, per key channel, per value channel.
INPUT_SHAPES = (("batch", "time", "heads"), ("batch", "time", "heads", "d_k"), ("batch", "time", "heads", "d_v"))


class Parameter(_Record):
    """A learned per-layer parameter, given in its constrained space (the trainer owns reparameterisation)."""

    shape: Annotated[tuple[AxisName, ...], Field(strict=False, min_length=1)]
    init: float
    domain: Domain


class Input(_Record):
    """A per-token input such as a step size β_t or a forget gate; its ``space`` (log or linear) is always stated.

    Shape ``[batch, time, heads]``; v2 also ``[batch, time, heads, d_k]`` (a forget gate per key channel) and
    ``[batch, time, heads, d_v]`` (an online-GD step size per value channel).
    """

    shape: Annotated[tuple[Literal["batch", "time", "heads", "d_k", "d_v"], ...], Field(strict=False)]
    space: Literal["linear", "log"]
    domain: Domain

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        # One check of the whole layout, not a pydantic union of tuples (which reported each member's errors at
        # fields such as ``inputs.g.shape.tuple[literal['batch'], ...][3]``).
        if v not in INPUT_SHAPES:
            raise PydanticCustomError("input_shape", "an input's shape is [batch, time, heads], [batch, time, "
                                      "heads, d_k] (per key channel) or [batch, time, heads, d_v] (per value "
                                      f"channel), not [{', '.join(v)}]")
        return v


class Spec(_Record):
    """A whole spec file (``spec_version: 1`` or ``2``)."""

    spec_version: StrictInt  # the integer 1 (not true, not 1.0: Literal[1] would take both)
    name: Identifier
    description: str
    objective: Objective
    solver: Solver
    readout: Readout
    parameters: dict[Identifier, Parameter] = Field(default_factory=dict)
    inputs: dict[Identifier, Input] = Field(default_factory=dict)

    @field_validator("spec_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v not in (1, 2):
            raise ValueError("Input should be 1 or 2 (the versions of the spec language)")
        return v


def _in_domain(x: float, domain: str) -> bool:
    if not math.isfinite(x):
        return False
    return {"real": True, "positive": x > 0, "unit_interval": 0.0 <= x <= 1.0, "nonpositive": x <= 0,
            "positive_unit_interval": 0.0 < x <= 1.0}[domain]


def semantic_errors(spec: Spec) -> list[tuple[tuple[str | int, ...], str]]:
    """Cross-field checks of a structurally valid spec.

    Args:
        spec: a spec that passed pydantic validation.

    Returns:
        A list of ``(field_path, reason)``, one per failing rule (all of them, not only the first); empty when
        the spec is consistent. The path is a tuple of keys (e.g. ``("objective", "regularizer",
        "coefficient")``) that the loader maps to a line and column. A name declared but unused is not
        reported when a reference failed to resolve (the misspelled reference is the one mistake).
    """
    errs: list[tuple[tuple[str | int, ...], str]] = []
    bad = sorted({c for c in spec.description if (not c.isprintable() and c not in "\n") or c in '\\"'})
    if bad:
        errs.append((("description",), "the description is copied into generated docstrings and comments: it may "
                     f"not contain backslashes, double quotes or control characters (found {bad})"))
    names = set(spec.parameters) | set(spec.inputs)
    for group in ("parameters", "inputs"):
        for name in getattr(spec, group):
            if name in RESERVED_NAMES:
                errs.append(((group, name), f"name {name!r} is reserved in generated code; choose another"))
    for name in set(spec.parameters) & set(spec.inputs):
        errs.append((("inputs", name), f"{name!r} is declared both as a parameter and as an input"))
    for name, p in spec.parameters.items():
        if not math.isfinite(p.init):
            errs.append((("parameters", name, "init"), f"init must be a finite number, not {p.init!r}"))
        elif not _in_domain(p.init, p.domain):
            errs.append((("parameters", name, "init"), f"init {p.init!r} is outside the domain {p.domain!r}"))
    used: set[str] = set()
    unresolved = False

    reg = spec.objective.regularizer
    if reg.kind == "ridge":
        if reg.coefficient is None:
            errs.append((("objective", "regularizer"), "a ridge regularizer needs a 'coefficient' (a parameter name)"))
        elif reg.coefficient not in spec.parameters:
            unresolved = True
            errs.append((("objective", "regularizer", "coefficient"),
                         f"{reg.coefficient!r} is not a declared parameter (declared: {sorted(spec.parameters)})"))
        else:
            used.add(reg.coefficient)
            p = spec.parameters[reg.coefficient]
            if p.domain != "positive":
                errs.append((("parameters", reg.coefficient, "domain"),
                             "the ridge coefficient λ must have domain 'positive'"))
            if p.shape == ("heads", "d_k"):
                if spec.spec_version < 2:
                    errs.append((("parameters", reg.coefficient, "shape"), "a per-key-channel ridge coefficient "
                                 "[heads, d_k] needs spec_version: 2"))
                elif spec.solver.kind not in ("closed_form", "conjugate_gradient"):
                    errs.append((("parameters", reg.coefficient, "shape"), "unsupported combination: a per-key-channel "
                                 "ridge coefficient [heads, d_k] needs an exact solver (closed_form or "
                                 f"conjugate_gradient), not {spec.solver.kind}; use shape [heads]"))
            elif p.shape != ("heads",):
                errs.append((("parameters", reg.coefficient, "shape"),
                             "the ridge coefficient is one scalar per head, shape [heads], or one per key channel, "
                             f"shape [heads, d_k]; not {list(p.shape)}"))
    elif reg.coefficient is not None:
        errs.append((("objective", "regularizer", "coefficient"), "regularizer 'none' takes no coefficient"))
    if reg.decays_with_data:
        if spec.spec_version < 2:
            errs.append((("objective", "regularizer", "decays_with_data"), "a regulariser that decays with the data "
                         "needs spec_version: 2"))
        elif reg.kind != "ridge" or spec.objective.weights.kind != "decayed":
            errs.append((("objective", "regularizer", "decays_with_data"), "decays_with_data needs a ridge "
                         "regularizer and decayed weights (it forgets the regulariser with the data's gate)"))

    solver = spec.solver
    exact = solver.kind in ("closed_form", "conjugate_gradient")
    if solver.kind in ("conjugate_gradient", "implicit_online_gd") and spec.spec_version < 2:
        errs.append((("solver", "kind"), f"the {solver.kind} solver needs spec_version: 2"))
    if solver.kind == "closed_form" and solver.recurrence == "cholesky" and spec.spec_version < 2:
        errs.append((("solver", "recurrence"), "the cholesky recurrence needs spec_version: 2"))
    kv_cache = solver.kind == "closed_form" and solver.recurrence == "kv_cache"
    if exact and reg.kind != "ridge" and not kv_cache:
        errs.append((("solver", "kind"), f"unsupported combination: the {solver.kind} solver needs a ridge "
                     "regularizer (without it Σ k kᵀ is singular for t < d_k)"))
    if solver.kind == "implicit_online_gd" and reg.kind != "none":
        errs.append((("objective", "regularizer"), "unsupported combination: the implicit_online_gd solver "
                     "takes the proximal step on the newest pair's loss alone (regularizer kind: none)"))
    if exact:  # the exact solvers take no step size
        pass
    elif solver.step_size is None:  # only gd may omit it (pydantic requires the online solvers')
        if spec.spec_version < 2:
            errs.append((("solver",), "the gd solver needs a 'step_size' in spec_version 1 (a parameter name); "
                         "omitting it for a step size of 1 needs spec_version: 2"))
    else:
        ss = solver.step_size
        if ss in spec.parameters:
            used.add(ss)
            p = spec.parameters[ss]
            if p.shape != ("heads",):
                errs.append((("parameters", ss, "shape"),
                             f"a step size is one scalar per head: shape must be [heads], not {list(p.shape)}"))
        elif ss in spec.inputs:
            used.add(ss)
            if solver.kind == "gd":
                errs.append((("solver", "step_size"), "the gd solver's step size must be a parameter, not a per-token "
                             "input (full-batch GD restarts from W⁰ = 0 at every t)"))
            if spec.inputs[ss].space != "linear":
                errs.append((("inputs", ss, "space"), "unsupported combination: a step size is used in linear "
                             "space; a log-space input is only meaningful as a forget gate"))
            if solver.kind == "implicit_online_gd" and spec.inputs[ss].shape[3:]:
                errs.append((("inputs", ss, "shape"), "the implicit_online_gd step size is one scalar per token "
                             "and head: shape [batch, time, heads]"))
            elif spec.inputs[ss].shape[3:] == ("d_k",):
                errs.append((("inputs", ss, "shape"), "a step-size input is [batch, time, heads] (one per token and "
                             "head) or [batch, time, heads, d_v] (one per value channel), not [batch, time, heads, d_k]: "
                             "a per-key-channel shape is only for forget gates"))
        else:
            unresolved = True
            errs.append((("solver", "step_size"), f"{ss!r} is neither a declared parameter nor an input"))

    v2 = spec.spec_version >= 2
    w = spec.objective.weights
    if spec.objective.model.kind == "constant" or w.kind == "kernel" or kv_cache:
        unresolved |= _kernel_errors(spec, errs, used)
    if w.kind == "uniform" and w.gate is not None:
        errs.append((("objective", "weights", "gate"), "uniform weights take no gate (use kind: decayed)"))
    if w.kind == "decayed":
        if not v2:
            errs.append((("objective", "weights", "kind"), "decayed weights need spec_version: 2"))
        if w.gate is None:
            errs.append((("objective", "weights"), "decayed weights need a 'gate': the name of a forget-gate input "
                         "(e.g. gate: g with inputs: g: {shape: [batch, time, heads], space: log, domain: "
                         "nonpositive}) or of a decay parameter [heads] with domain 'positive_unit_interval'"))
        elif w.gate in spec.inputs:
            used.add(w.gate)
            g = spec.inputs[w.gate]
            want = "nonpositive" if g.space == "log" else "positive_unit_interval"
            if g.domain != want:
                errs.append((("inputs", w.gate, "domain"),
                             f"a forget gate in {g.space} space "
                             f"({'g = log α ≤ 0' if g.space == 'log' else 'α ∈ (0, 1]'}) must have domain {want!r}, "
                             f"not {g.domain!r}"))
            if g.shape[3:] == ("d_v",):
                errs.append((("inputs", w.gate, "shape"), "a forget gate is [batch, time, heads] or per key channel "
                             "[batch, time, heads, d_k], not per value channel [batch, time, heads, d_v]"))
            if g.shape[3:] == ("d_k",) and solver.kind == "gd" and solver.steps > 1:
                errs.append((("inputs", w.gate, "shape"), "unsupported combination: a per-key-channel gate "
                             "forgets the memory Σ v kᵀ; with more than one GD step the Gram sums Σ k kᵀ would "
                             "need a two-sided decay (use steps: 1, or a gate [batch, time, heads])"))
        elif w.gate in spec.parameters:
            used.add(w.gate)
            p = spec.parameters[w.gate]
            if p.domain != "positive_unit_interval":
                errs.append((("parameters", w.gate, "domain"), "a forget-gate parameter is a decay γ in linear "
                             f"space: domain must be 'positive_unit_interval' ((0, 1]), not {p.domain!r}"))
            if p.shape != ("heads",):
                errs.append((("parameters", w.gate, "shape"),
                             f"a forget-gate parameter is one scalar per head: shape must be [heads], not {list(p.shape)}"))
        else:
            unresolved = True
            errs.append((("objective", "weights", "gate"), f"{w.gate!r} is neither a declared parameter nor an input "
                         f"(declared: {sorted(names)})"))
        if (solver.kind == "closed_form" and solver.recurrence == "sherman_morrison" and reg.kind == "ridge"
                and not reg.decays_with_data):
            errs.append((("solver", "recurrence"), "no rank-one recursion keeps the exact solution: with decayed "
                         "weights Sherman–Morrison needs the regulariser to decay with the data "
                         "(objective.regularizer.decays_with_data: true, RLS with a forgetting factor); with a "
                         "regulariser that does not decay use recurrence: cholesky (a direct per-position solve) or "
                         "solver {kind: conjugate_gradient, max_iterations: N, tolerance: ε}"))
        if exact and w.gate in spec.inputs and spec.inputs[w.gate].shape[3:]:
            errs.append((("inputs", w.gate, "shape"), f"unsupported combination: the {solver.kind} solver weighs "
                         "each pair's whole loss, so its forget gate is one scalar per token and head [batch, time, "
                         "heads], not per key channel"))
    roles = [("objective", "weights", "gate", w.gate), ("objective", "weights", "importance", w.importance),
             ("solver", "step_size", getattr(solver, "step_size", None))]
    seen: dict[str, str] = {}
    for *loc, name in roles:
        if name is not None and name in seen:
            errs.append((tuple(loc), f"{name!r} is already the {seen[name]}; one input or parameter has one role "
                         "(declare another)"))
        elif name is not None:
            seen[name] = ".".join(loc)
    if w.importance is not None:
        if not v2:
            errs.append((("objective", "weights", "importance"), "importance weights need spec_version: 2"))
        if w.importance in spec.inputs:
            used.add(w.importance)
            x = spec.inputs[w.importance]
            if x.shape[3:] or x.space != "linear" or x.domain not in ("positive", "unit_interval"):
                errs.append((("inputs", w.importance), "an importance weight β_i must be an input [batch, time, "
                             "heads] in linear space with domain 'positive' or 'unit_interval', not "
                             f"[{', '.join(x.shape)}] in {x.space} space with domain {x.domain!r}"))
        else:
            unresolved = True
            errs.append((("objective", "weights", "importance"),
                         f"{w.importance!r} is a parameter; an importance weight β_i is a per-token input [batch, "
                         "time, heads]" if w.importance in spec.parameters else
                         f"{w.importance!r} is not a declared input (declared inputs: {sorted(spec.inputs)})"))
        if solver.kind not in ("gd", "closed_form", "conjugate_gradient"):
            errs.append((("objective", "weights", "importance"), f"unsupported combination: importance weights "
                         f"need the gd, closed_form or conjugate_gradient solver, not {solver.kind} (online GD sees "
                         "one pair per step: multiply the step size by the weight instead)"))
    if not v2:
        if spec.objective.model.feature_map != "identity":
            errs.append((("objective", "model", "feature_map"), f"the feature map {spec.objective.model.feature_map!r} "
                         "needs spec_version: 2 (spec_version 1 has only identity)"))
        if spec.readout.scale != 1.0:
            errs.append((("readout", "scale"), "a readout scale needs spec_version: 2 (spec_version 1 has scale 1)"))
        for name, x in spec.inputs.items():
            if x.shape[3:]:
                errs.append((("inputs", name, "shape"), f"a per-channel input [{', '.join(x.shape)}] needs "
                             "spec_version: 2 (spec_version 1 has [batch, time, heads] only)"))
            if x.domain in ("nonpositive", "positive_unit_interval"):
                errs.append((("inputs", name, "domain"), f"the domain {x.domain!r} needs spec_version: 2"))
        for name, p in spec.parameters.items():
            if p.domain in ("nonpositive", "positive_unit_interval"):
                errs.append((("parameters", name, "domain"), f"the domain {p.domain!r} needs spec_version: 2"))

    if unresolved:  # a misspelled reference would also make its intended target look unused: report it once
        return errs
    for group in ("parameters", "inputs"):
        for name in getattr(spec, group):
            if name not in used and name in names:
                errs.append(((group, name), f"{name!r} is declared but no axis of the objective or solver uses it"))
    return errs


def _kernel_errors(spec: Spec, errs: list, used: set[str]) -> bool:
    """The rules of kernel regression (softmax attention, docs/family.md §9): a constant model, kernel weights
    (optionally decayed by a forget-gate input [batch, time, heads]), no regulariser, the closed_form solver with
    the kv_cache recurrence, spec_version 2. Appends ``(field_path, reason)`` to ``errs``, adds the gate to
    ``used``; returns whether a reference failed to resolve."""
    w, solver, model = spec.objective.weights, spec.solver, spec.objective.model
    kv_cache = solver.kind == "closed_form" and solver.recurrence == "kv_cache"
    if spec.spec_version < 2:
        errs.append((("objective", "model", "kind") if model.kind == "constant" else ("objective", "weights", "kind")
                     if w.kind == "kernel" else ("solver", "recurrence"),
                     "kernel regression (a constant model, kernel weights, the kv_cache recurrence) needs "
                     "spec_version: 2"))
        return False
    if model.kind == "constant" and w.kind != "kernel":
        errs.append((("objective", "weights", "kind"), f"unsupported combination: a constant model needs kernel "
                     f"weights (weights: {{kind: kernel}}, softmax attention), not {w.kind!r}: with "
                     "query-independent weights every query gets the same weighted mean of the values"))
    if w.kind == "kernel" and model.kind != "constant":
        errs.append((("objective", "weights", "kind"), "unsupported combination: kernel weights (query-dependent, "
                     f"softmax attention) need model kind 'constant', not {model.kind!r}"))
    if model.kind == "constant" and not kv_cache:
        errs.append((("solver",), "unsupported combination: a constant model with kernel weights is solved by "
                     "solver {kind: closed_form, recurrence: kv_cache} (the exact kernel-weighted mean), not "
                     f"{solver.kind}" + (f" with recurrence {solver.recurrence}" if solver.kind == "closed_form" else "")))
    if kv_cache and model.kind != "constant":
        errs.append((("solver", "recurrence"), "unsupported combination: the kv_cache recurrence solves a constant "
                     "model with kernel weights (softmax attention); a linear model needs sherman_morrison or "
                     "cholesky"))
    if model.kind == "constant" and spec.objective.regularizer.kind != "none":
        errs.append((("objective", "regularizer", "kind"), "unsupported combination: kernel regression takes no "
                     "regulariser (regularizer: {kind: none}); its minimiser Σ κ v / Σ κ is unique since κ > 0"))
    if w.kind != "kernel":
        return False
    if w.importance is not None:
        errs.append((("objective", "weights", "importance"), "unsupported combination: kernel weights take no "
                     "importance weights"))
    if w.gate is None:
        return False
    if w.gate in spec.inputs:
        used.add(w.gate)
        g = spec.inputs[w.gate]
        want = "nonpositive" if g.space == "log" else "positive_unit_interval"
        if g.domain != want:
            errs.append((("inputs", w.gate, "domain"), f"a forget gate in {g.space} space "
                         f"({'g = log α ≤ 0' if g.space == 'log' else 'α ∈ (0, 1]'}) must have domain {want!r}, "
                         f"not {g.domain!r}"))
        if g.shape[3:]:
            errs.append((("inputs", w.gate, "shape"), "unsupported combination: the forget gate of kernel weights "
                         "is one scalar per token and head, [batch, time, heads] (it adds Σ g to the logits)"))
        return False
    if w.gate in spec.parameters:
        used.add(w.gate)
        errs.append((("objective", "weights", "gate"), f"unsupported combination: {w.gate!r} is a parameter; the "
                     "forget gate of kernel weights is a per-token input [batch, time, heads]"))
        return False
    errs.append((("objective", "weights", "gate"), f"{w.gate!r} is not a declared input (declared inputs: "
                 f"{sorted(spec.inputs)})"))
    return True

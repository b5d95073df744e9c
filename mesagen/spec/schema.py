"""The spec language, v1: typed, frozen records validated with pydantic.

A spec states an in-context objective along five axes -- loss, regression weights, regulariser, model,
solver -- plus the readout, the layer's parameters and its per-token inputs:

    W_t = argmin_W  ½ Σ_{i≤t} ω_{t,i} ‖v_i − W φ(k_i)‖²  +  R(W),        o_t = W_t φ(q_t)

(von Oswald et al., arXiv 2309.05858, Eq. 10 for the ridge case; DESIGN.md §1). Every vocabulary is closed
(``Literal``); unknown keys are errors (``extra="forbid"``); nothing in a spec is ever evaluated.
Cross-field rules that pydantic cannot express locally live in :func:`semantic_errors`, which returns
``(field_path, reason)`` pairs so that the loader can point at the exact line of the offending field.
"""

from __future__ import annotations

import keyword
import math
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, field_validator

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

Domain = Literal["real", "positive", "unit_interval"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Weights(_Record):
    """Regression weights ω_{t,i}. v1: ``uniform`` (ω = 1, every past pair counts equally)."""

    kind: Literal["uniform"]


class Regularizer(_Record):
    """R(W): ``none``, or ``ridge`` = ½ λ ‖W‖²_F with λ a positive per-head parameter (``coefficient``)."""

    kind: Literal["none", "ridge"]
    coefficient: Identifier | None = None


class Model(_Record):
    """The in-context model ``v ≈ W φ(k)``. v1: ``linear`` with the ``identity`` feature map."""

    kind: Literal["linear"]
    feature_map: Literal["identity"] = "identity"


class Objective(_Record):
    """The in-context learning problem: ``loss`` (v1: ``squared`` = ½‖v − W φ(k)‖²) and the other axes."""

    loss: Literal["squared"]
    weights: Weights
    regularizer: Regularizer
    model: Model


class ClosedFormSolver(_Record):
    """Exact minimiser, kept recursively by ``sherman_morrison`` (rank-1 inverse updates; recursive least squares)."""

    kind: Literal["closed_form"]
    recurrence: Literal["sherman_morrison"]


class GDSolver(_Record):
    """``steps`` steps of full-batch gradient descent on the objective from W⁰ = 0, step size ``step_size``."""

    kind: Literal["gd"]
    steps: Annotated[int, Field(ge=1, le=32)]
    step_size: Identifier
    init: Literal["zero"] = "zero"


class OnlineGDSolver(_Record):
    """Online GD (LMS / delta rule): one gradient step on the newest term per token, step size ``step_size``."""

    kind: Literal["online_gd"]
    step_size: Identifier
    init: Literal["zero"] = "zero"


Solver = Annotated[Union[ClosedFormSolver, GDSolver, OnlineGDSolver], Field(discriminator="kind")]


class Readout(_Record):
    """How the layer answers: ``query`` = o_t = W_t φ(q_t)."""

    kind: Literal["query"]


AxisName = Literal["heads", "d_k", "d_v"]


class Parameter(_Record):
    """A learned per-layer parameter, given in its constrained space (the trainer owns reparameterisation)."""

    shape: Annotated[tuple[AxisName, ...], Field(strict=False, min_length=1)]
    init: float
    domain: Domain


class Input(_Record):
    """A per-token input such as a step size β_t or a forget gate; its ``space`` (log or linear) is always stated."""

    shape: Annotated[tuple[Literal["batch"], Literal["time"], Literal["heads"]], Field(strict=False)]
    space: Literal["linear", "log"]
    domain: Domain


class Spec(_Record):
    """A whole spec file (``spec_version: 1``)."""

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
        if v != 1:
            raise ValueError("Input should be 1 (the only version of the spec language)")
        return v


def _in_domain(x: float, domain: str) -> bool:
    if not math.isfinite(x):
        return False
    return {"real": True, "positive": x > 0, "unit_interval": 0.0 <= x <= 1.0}[domain]


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
            if p.shape != ("heads",):
                errs.append((("parameters", reg.coefficient, "shape"),
                             f"the ridge coefficient is one scalar per head: shape must be [heads], not {list(p.shape)}"))
    elif reg.coefficient is not None:
        errs.append((("objective", "regularizer", "coefficient"), "regularizer 'none' takes no coefficient"))

    solver = spec.solver
    if solver.kind == "closed_form":
        if reg.kind != "ridge":
            errs.append((("solver", "kind"), "unsupported combination: the closed_form solver needs a ridge "
                         "regularizer (without it Σ k kᵀ is singular for t < d_k)"))
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
        else:
            unresolved = True
            errs.append((("solver", "step_size"), f"{ss!r} is neither a declared parameter nor an input"))

    if unresolved:  # a misspelled reference would also make its intended target look unused: report it once
        return errs
    for group in ("parameters", "inputs"):
        for name in getattr(spec, group):
            if name not in used and name in names:
                errs.append(((group, name), f"{name!r} is declared but no axis of the objective or solver uses it"))
    return errs

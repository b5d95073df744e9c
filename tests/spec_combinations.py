"""Every objective × solver × option combination the spec schema admits, and the §4 table of docs/specs.md.

The candidates are enumerated from the schema itself (the ``Literal`` vocabularies of
:mod:`mesagen.spec.schema`, the bounds of ``GDSolver.steps``, parameter vs per-token-input step sizes in
each input space) and filtered by pydantic validation plus :func:`mesagen.spec.schema.semantic_errors`, so
a new vocabulary entry or a relaxed cross-field rule shows up here without editing this file. Shared by
tests/test_numba_combinations.py (JAX and Numba CPU) and tests/cuda/sim_checks.py (CUDA simulator).

Spec language v2 adds axes (:func:`v2_candidates`), each varied over every solver base of v1 rather than
as a full product (which would be thousands of layers): decayed weights with a forget gate of every shape
the schema's ``Input`` / ``Parameter`` admit (per token and head, per key channel, per value channel --
refused --, a per-head parameter; log and linear space), importance weights (with every solver: only gd
is admitted), the feature maps with a readout scale, per-value-channel (and per-key-channel: refused)
step sizes, and the default step size of 1.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path

import annotated_types
import pydantic

from mesagen.spec import schema

ROOT = Path(__file__).resolve().parents[1]


def _literals(model, field: str) -> tuple:
    return typing.get_args(model.model_fields[field].annotation)


def _bound(model, field: str, kind) -> int:
    return next(getattr(m, kind.__name__.lower()) for m in model.model_fields[field].metadata if isinstance(m, kind))


REGULARIZERS = _literals(schema.Regularizer, "kind")
SOLVER_MODELS = typing.get_args(typing.get_args(schema.Solver)[0])
STEPS_MIN, STEPS_MAX = _bound(schema.GDSolver, "steps", annotated_types.Ge), _bound(schema.GDSolver, "steps",
                                                                                       annotated_types.Le)
STEPS = (STEPS_MIN, 3)  # the smallest count and one with a genuine polynomial (Horner) readout
INPUT_SPACES = _literals(schema.Input, "space")


@dataclass(frozen=True)
class Combination:
    """One admitted combination: a spec document and the labels that place it in the docs table."""

    regularizer: str
    solver: str
    steps: int | None
    step_size: str | None  # "parameter" | "input" | None (closed form, or v2's default step size of 1)
    space: str | None  # the step-size input's space
    doc: dict
    v2: tuple[str, ...] = ()  # labels of the v2 options, e.g. ("gate=input-K-log",); () for a v1 combination

    @property
    def id(self) -> str:
        """A short test id, e.g. ``ridge-gd3-parameter`` or ``none-gd1-parameter-gate=input-K-log``."""
        s = self.solver + (str(self.steps) if self.steps is not None else "")
        return "-".join(x for x in (self.regularizer, s, self.step_size, self.space) + self.v2 if x)


def _doc(reg: str, solver: dict, parameters: dict, inputs: dict) -> dict:
    objective = {"loss": "squared", "weights": {"kind": "uniform"}, "regularizer": {"kind": reg},
                 "model": {"kind": "linear", "feature_map": "identity"}}
    if reg == "ridge":
        objective["regularizer"]["coefficient"] = "lam"
        parameters = {"lam": {"shape": ["heads"], "init": 0.8, "domain": "positive"}, **parameters}
    return {"spec_version": 1, "name": "combo", "description": "A schema-enumerated combination.",
            "objective": objective, "solver": solver, "readout": {"kind": "query"},
            "parameters": parameters, "inputs": inputs}


#: Values for the required solver fields that are not a vocabulary (``Literal``): conjugate gradient's settings.
#: The tolerance is tight enough that at d_k = 3 the iteration runs to the exact solution (the combination tests
#: compare against the exact solve at 1e-10); the shipped mesanet spec's own settings are tested in
#: tests/test_numba_cpu.py.
REPRESENTATIVE = {"max_iterations": 30, "tolerance": 1e-12}


def _solver_variants(model) -> list[dict]:
    """The solver documents of a model without a step size: every value of each required vocabulary field (e.g.
    closed_form's recurrence: sherman_morrison, cholesky), REPRESENTATIVE values for the other required fields.

    Raises:
        KeyError: a required field that is neither a vocabulary nor in REPRESENTATIVE.
    """
    kind = _literals(model, "kind")[0]
    docs = [{"kind": kind}]
    for f, info in model.model_fields.items():
        if f == "kind" or not info.is_required():
            continue
        values = _literals(model, f) if typing.get_origin(info.annotation) is typing.Literal else (REPRESENTATIVE[f],)
        docs = [d | {f: x} for d in docs for x in values]
    return docs


def candidates() -> list[Combination]:
    """Every combination built from the schema's vocabularies, admitted or not."""
    out = []
    for reg in REGULARIZERS:
        for model in SOLVER_MODELS:
            kind = _literals(model, "kind")[0]
            if "step_size" not in model.model_fields:
                for solver in _solver_variants(model):
                    out.append(Combination(reg, kind + ("-" + solver["recurrence"] if "recurrence" in solver and
                                                        solver["recurrence"] != "sherman_morrison" else ""),
                                           None, None, None, _doc(reg, solver, {}, {})))
                continue
            for steps in (STEPS if "steps" in model.model_fields else (None,)):
                solver = {"kind": kind, "step_size": "eta"} | ({"steps": steps} if steps is not None else {})
                out.append(Combination(reg, kind, steps, "parameter", None, _doc(
                    reg, solver, {"eta": {"shape": ["heads"], "init": 0.3, "domain": "real"}}, {})))
                for space in INPUT_SPACES:
                    domain = "unit_interval" if space == "linear" else "real"
                    out.append(Combination(reg, kind, steps, "input", space, _doc(
                        reg, solver, {}, {"eta": {"shape": ["batch", "time", "heads"], "space": space,
                                                  "domain": domain}})))
    return out


def _input_shapes() -> list[list[str]]:
    """Every per-token input shape the schema admits (``schema.INPUT_SHAPES``): [batch, time, heads] and one per
    trailing channel (d_k, d_v)."""
    return [list(s) for s in schema.INPUT_SHAPES]


FEATURE_MAPS = schema.FEATURE_MAPS


def _v2(c: Combination, label: str, edit) -> Combination:
    """``c`` as a spec_version 2 document with one more option (``edit`` changes the document in place)."""
    import copy

    doc = copy.deepcopy(c.doc)
    doc["spec_version"] = 2
    edit(doc)
    return Combination(c.regularizer, c.solver, c.steps, c.step_size, c.space, doc, c.v2 + (label,))


def _gate(doc, shape=None, space="log", parameter=False):
    """A forget gate ``alpha`` of the given shape and space (or a per-head parameter). With the Sherman–Morrison
    recurrence the regulariser decays with the data (RLS with forgetting): the only decayed objective whose exact
    solution a rank-one recursion keeps -- the compiler refuses the other with its reason (tests/test_solvers_v2.py)."""
    doc["objective"]["weights"] = {"kind": "decayed", "gate": "alpha"}
    if doc["solver"] == {"kind": "closed_form", "recurrence": "sherman_morrison"}:
        doc["objective"]["regularizer"]["decays_with_data"] = True
    if parameter:
        doc["parameters"]["alpha"] = {"shape": ["heads"], "init": 0.9, "domain": "positive_unit_interval"}
    else:
        doc["inputs"]["alpha"] = {"shape": shape, "space": space,
                                  "domain": "nonpositive" if space == "log" else "positive_unit_interval"}


def _v2_only(c: Combination) -> Combination:
    """``c`` as a spec_version 2 document and nothing else (for the solvers that need spec_version 2)."""
    def v2(d):
        pass
    return _v2(c, "spec_version=2", v2)


def v2_candidates() -> list[Combination]:
    """The v2 options over every v1 base (admitted or not; see the module docstring), and over the bases that
    only spec_version 2 admits (conjugate_gradient, implicit_online_gd, closed_form with a cholesky recurrence)."""
    bases = [c for c in candidates() if admitted(c)]
    bases += [c2 for c in candidates() if not admitted(c) for c2 in [_v2_only(c)] if admitted(c2)]
    out = []
    for c in bases:  # forget gates of every shape and space, and a per-head parameter
        for shape in _input_shapes():
            for space in INPUT_SPACES:
                tag = "-".join(["input"] + [{"d_k": "K", "d_v": "V"}[a] for a in shape[3:]] + [space])
                out.append(_v2(c, f"gate={tag}", lambda d, sh=shape, sp=space: _gate(d, sh, sp)))
        out.append(_v2(c, "gate=parameter", lambda d: _gate(d, parameter=True)))
    for c in bases:  # importance weights β_i (with a decayed gate too, for the solvers that admit them)
        for domain in ("positive", "unit_interval"):
            def imp(d, dom=domain):
                d["objective"]["weights"]["importance"] = "w"
                d["inputs"]["w"] = {"shape": ["batch", "time", "heads"], "space": "linear", "domain": dom}
            out.append(_v2(c, f"importance={domain}", imp))
        out.append(_v2(_v2(c, "gate=input-log", lambda d: _gate(d, ["batch", "time", "heads"])), "importance=positive",
                       lambda d: (d["objective"]["weights"].update(importance="w"), d["inputs"].update(
                           w={"shape": ["batch", "time", "heads"], "space": "linear", "domain": "positive"}))))
    scales = ("inverse_sqrt_dk", 0.5)  # both kinds of readout scale, one per feature map
    for c in bases:  # feature maps other than the identity, each with a readout scale
        for n, fm in enumerate(FEATURE_MAPS[1:]):
            def feat(d, fm=fm, scale=scales[n % 2]):
                d["objective"]["model"]["feature_map"] = fm
                d["readout"]["scale"] = scale
            out.append(_v2(c, f"phi={fm}-scale={scales[n % 2]}", feat))
    for c in bases:  # step sizes per value channel (and per key channel: refused), alone and after a gate
        if c.step_size != "input":
            continue
        for ch in ("d_v", "d_k"):
            def per_channel(d, ch=ch):
                d["inputs"]["eta"]["shape"] = ["batch", "time", "heads", ch]
            cc = _v2(c, f"step={ch[-1].upper()}", per_channel)
            out.append(cc)
            out.append(_v2(cc, "gate=input-K-log", lambda d: _gate(d, ["batch", "time", "heads", "d_k"])))
    for c in bases:  # a ridge coefficient per key channel, λ [heads, d_k] (the exact solvers; refused otherwise)
        if c.regularizer == "ridge":
            def per_key(d):
                d["parameters"]["lam"]["shape"] = ["heads", "d_k"]
            out.append(_v2(c, "lam=K", per_key))
    for c in bases:  # the default step size of 1 (v2: no step_size)
        if c.step_size == "parameter":
            def default_step(d):
                del d["solver"]["step_size"]
                d["parameters"].pop("eta")
            out.append(_v2(Combination(c.regularizer, c.solver, c.steps, None, None, c.doc), "step=default",
                           default_step))
    return out


def admitted(c: Combination) -> bool:
    """Whether the schema and its cross-field rules accept the combination's spec document."""
    try:
        spec = schema.Spec.model_validate(c.doc)
    except pydantic.ValidationError:
        return False
    return not schema.semantic_errors(spec)


def supported() -> list[Combination]:
    """The admitted v1 combinations, in a fixed order."""
    return [c for c in candidates() if admitted(c)]


def supported_v2() -> list[Combination]:
    """The admitted v2 combinations (:func:`v2_candidates`), in a fixed order, without repeats."""
    seen, out = set(), []
    for c in v2_candidates():
        if c.id not in seen and admitted(c):
            seen.add(c.id)
            out.append(c)
    return out


@dataclass(frozen=True)
class Row:
    """One row of the supported-combinations table of docs/specs.md §4."""

    text: str
    regularizer: str
    solver: str
    steps: range | None
    step_sizes: frozenset
    forms: frozenset

    def matches(self, c: Combination) -> bool:
        """Whether combination ``c`` is what this row describes."""
        if (c.regularizer, c.solver) != (self.regularizer, self.solver):
            return False
        if self.steps is not None and c.steps not in self.steps:
            return False
        return c.step_size is None or c.step_size in self.step_sizes


def doc_rows(path: Path = ROOT / "docs" / "specs.md") -> list[Row]:
    """Parse the §4 table (``| regularizer | solver | step size | forms generated | known layer |``)."""
    text = path.read_text(encoding="utf-8")
    section = text.split("## 4. Supported combinations", 1)[1].split("\n## ", 1)[0]
    section = section.split("| regularizer | solver |", 1)[1].split("\n\n", 1)[0]  # the v1 table only
    rows = []
    for line in section.splitlines():
        cells = [x.strip() for x in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        reg = re.findall(r"`([^`]+)`", cells[0])[0]
        solver = re.findall(r"`([^`]+)`", cells[1])[0]
        steps = None
        m = re.search(r"steps:\s*(\w+)`(?:\s*\((\d+)…(\d+)\))?", cells[1])
        if m and m.group(1).isdigit():
            steps = range(int(m.group(1)), int(m.group(1)) + 1)
        elif m and m.group(2):
            steps = range(int(m.group(2)), int(m.group(3)) + 1)
        elif m:
            steps = range(STEPS_MIN, STEPS_MAX + 1)
        sizes = frozenset(x for x in ("parameter", "input") if x in cells[2])
        forms = frozenset(re.findall(r"`([^`]+)`", cells[3]))
        rows.append(Row(line, reg, solver, steps, sizes, forms))
    return rows

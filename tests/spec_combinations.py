"""Every objective × solver × option combination the spec schema admits, and the §4 table of docs/specs.md.

The candidates are enumerated from the schema itself (the ``Literal`` vocabularies of
:mod:`mesagen.spec.schema`, the bounds of ``GDSolver.steps``, parameter vs per-token-input step sizes in
each input space) and filtered by pydantic validation plus :func:`mesagen.spec.schema.semantic_errors`, so
a new vocabulary entry or a relaxed cross-field rule shows up here without editing this file. Shared by
tests/test_numba_combinations.py (JAX and Numba CPU) and tests/cuda/sim_checks.py (CUDA simulator).
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
    step_size: str | None  # "parameter" | "input" | None (closed form)
    space: str | None  # the step-size input's space
    doc: dict

    @property
    def id(self) -> str:
        """A short test id, e.g. ``ridge-gd3-parameter``."""
        s = self.solver + (str(self.steps) if self.steps is not None else "")
        return "-".join(x for x in (self.regularizer, s, self.step_size, self.space) if x)


def _doc(reg: str, solver: dict, parameters: dict, inputs: dict) -> dict:
    objective = {"loss": "squared", "weights": {"kind": "uniform"}, "regularizer": {"kind": reg},
                 "model": {"kind": "linear", "feature_map": "identity"}}
    if reg == "ridge":
        objective["regularizer"]["coefficient"] = "lam"
        parameters = {"lam": {"shape": ["heads"], "init": 0.8, "domain": "positive"}, **parameters}
    return {"spec_version": 1, "name": "combo", "description": "A schema-enumerated combination.",
            "objective": objective, "solver": solver, "readout": {"kind": "query"},
            "parameters": parameters, "inputs": inputs}


def candidates() -> list[Combination]:
    """Every combination built from the schema's vocabularies, admitted or not."""
    out = []
    for reg in REGULARIZERS:
        for model in SOLVER_MODELS:
            kind = _literals(model, "kind")[0]
            if "step_size" not in model.model_fields:
                extra = {f: _literals(model, f)[0] for f in model.model_fields
                         if f != "kind" and model.model_fields[f].is_required()}
                out.append(Combination(reg, kind, None, None, None, _doc(reg, {"kind": kind, **extra}, {}, {})))
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


def admitted(c: Combination) -> bool:
    """Whether the schema and its cross-field rules accept the combination's spec document."""
    try:
        spec = schema.Spec.model_validate(c.doc)
    except pydantic.ValidationError:
        return False
    return not schema.semantic_errors(spec)


def supported() -> list[Combination]:
    """The admitted combinations, in a fixed order."""
    return [c for c in candidates() if admitted(c)]


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

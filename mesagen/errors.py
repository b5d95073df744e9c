"""Error types shared by every stage of the compiler."""

from __future__ import annotations

from collections.abc import Sequence


class MesagenError(Exception):
    """Base class of every error mesagen raises on purpose."""


class SpecError(MesagenError):
    """A spec file is invalid: one problem, or several found in the same pass.

    ``str(err)`` is one ``file:line:column: field: reason`` line per problem (sorted by position), so a
    spec with three mistakes is reported in one run, not three.

    Attributes:
        path: the spec file.
        line: 1-based line of the (first) offending node (None if unknown).
        column: 1-based column of the (first) offending node (None if unknown).
        field: dotted field path inside the spec, e.g. ``objective.regularizer.coefficient``.
        reason: what is wrong, in one sentence.
        problems: every problem found, this one first (each a single-problem :class:`SpecError`).
    """

    def __init__(self, path: str, reason: str, *, line: int | None = None, column: int | None = None,
                 field: str = "", others: Sequence[SpecError] = ()) -> None:
        reason = " ".join(str(reason).split())  # one line, always: the CLI prints one line per problem
        self.path, self.reason, self.line, self.column, self.field = str(path), reason, line, column, field
        self.problems: tuple[SpecError, ...] = (self, *others)
        super().__init__("\n".join(p.format() for p in self.problems))

    def format(self) -> str:
        """Return ``file:line:column: field: reason`` of this problem (parts that are unknown are left out)."""
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.field + ': ' if self.field else ''}{self.reason}"

    @classmethod
    def collect(cls, problems: Sequence[SpecError]) -> SpecError:
        """One error holding several problems, sorted by position (located ones first), duplicates dropped.

        Args:
            problems: single-problem errors of one spec file; at least one.

        Returns:
            A :class:`SpecError` whose own fields are those of the first problem and whose ``problems`` are all.

        Raises:
            ValueError: ``problems`` is empty.
        """
        if not problems:
            raise ValueError("SpecError.collect needs at least one problem")
        seen: dict[str, SpecError] = {}
        for p in sorted(problems, key=lambda p: (p.line is None, p.line or 0, p.column or 0, p.field, p.reason)):
            seen.setdefault(p.format(), p)
        first, *rest = seen.values()
        return cls(first.path, first.reason, line=first.line, column=first.column, field=first.field, others=rest)


class DerivationError(MesagenError):
    """A derived identity failed its verification; nothing unverified reaches code.

    Attributes:
        spec: the spec name.
        step: the derivation step that failed (e.g. ``sherman_morrison``).
    """

    def __init__(self, spec: str, step: str, reason: str) -> None:
        self.spec, self.step, self.reason = spec, step, reason
        super().__init__(f"spec {spec!r}, step {step!r}: {reason}")

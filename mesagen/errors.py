"""Error types shared by every stage of the compiler."""

from __future__ import annotations


class MesagenError(Exception):
    """Base class of every error mesagen raises on purpose."""


class SpecError(MesagenError):
    """A spec file is invalid.

    Attributes:
        path: the spec file.
        line: 1-based line of the offending node (None if unknown).
        column: 1-based column of the offending node (None if unknown).
        field: dotted field path inside the spec, e.g. ``objective.regularizer.coefficient``.
        reason: what is wrong, in one sentence.
    """

    def __init__(self, path: str, reason: str, *, line: int | None = None, column: int | None = None,
                 field: str = "") -> None:
        reason = " ".join(str(reason).split())  # one line, always: the CLI prints one line per error
        self.path, self.reason, self.line, self.column, self.field = str(path), reason, line, column, field
        super().__init__(self.format())

    def format(self) -> str:
        """Return ``file:line:column: field: reason`` (parts that are unknown are left out)."""
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.field + ': ' if self.field else ''}{self.reason}"


class DerivationError(MesagenError):
    """A derived identity failed its verification; nothing unverified reaches code.

    Attributes:
        spec: the spec name.
        step: the derivation step that failed (e.g. ``sherman_morrison``).
    """

    def __init__(self, spec: str, step: str, reason: str) -> None:
        self.spec, self.step, self.reason = spec, step, reason
        super().__init__(f"spec {spec!r}, step {step!r}: {reason}")

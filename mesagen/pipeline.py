"""The compiler driver: named stages with typed hand-offs, no disk I/O (see :mod:`mesagen.writer`).

    load_spec → derive → verify → lower → emit (one backend each)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mesagen.backends import BACKENDS
from mesagen.errors import MesagenError
from mesagen.ir.lower import lower
from mesagen.ir.records import LayerIR
from mesagen.spec.loader import load_spec, spec_sha256
from mesagen.spec.schema import Spec
from mesagen.symbolic.derive import Derivation, derive
from mesagen.symbolic.verify import Check, verify


@dataclass(frozen=True)
class Compiled:
    """The result of compiling one spec: every stage's output and the files to write.

    Attributes:
        spec, derivation, checks, ir: the stage outputs.
        files: relative path (``NAME/layer_jax.py`` ...) → file text.
    """

    spec: Spec
    derivation: Derivation
    checks: tuple[Check, ...]
    ir: LayerIR
    files: dict[str, str]


_SAFE_PATH_PART = re.compile(r"^[A-Za-z0-9_.+-]+$")


def spec_display_path(path: str | Path) -> str:
    """The spec path recorded in headers: ``<folder>/<file>`` (POSIX), independent of cwd and absolute paths.

    Raises:
        MesagenError: the folder or file name holds characters that could break a generated header
            (anything but letters, digits and ``_ . + -``).
    """
    p = Path(path)
    folder = p.resolve().parent.name
    for part in (folder, p.name) if folder else (p.name,):
        if not _SAFE_PATH_PART.match(part):
            raise MesagenError(f"{path}: spec folder and file names may hold only letters, digits and '_.+-' "
                               f"(they are written into generated headers); got {part!r}")
    return f"{folder}/{p.name}" if folder else p.name


VERIFY_SEED = 0
"""Seed of the verification's random points. Generated text must not depend on it (a test changes it)."""


def compile_spec(spec: Spec, spec_path: str, backends: tuple[str, ...] | None = None) -> Compiled:
    """Compile a validated spec in memory.

    Args:
        spec: the validated spec.
        spec_path: the path to record in generated headers (see :func:`spec_display_path`).
        backends: backend names to emit (default: all registered).

    Returns:
        The :class:`Compiled` record.

    Raises:
        DerivationError: a derived identity failed verification (nothing is emitted).
        KeyError: an unknown backend name.
    """
    derivation = derive(spec)
    checks = verify(derivation, seed=VERIFY_SEED)
    ir = lower(derivation, spec_path, spec_sha256(spec))
    names = tuple(BACKENDS) if backends is None else backends
    files = {f"{spec.name}/{BACKENDS[b].filename}": BACKENDS[b].emit(ir, derivation, checks) for b in names}
    return Compiled(spec, derivation, checks, ir, files)


def compile_file(path: str | Path, backends: tuple[str, ...] | None = None) -> Compiled:
    """Load, validate and compile a spec file (raises SpecError / DerivationError)."""
    return compile_spec(load_spec(path), spec_display_path(path), backends)

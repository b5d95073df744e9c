"""The compiler driver: named stages with typed hand-offs, no disk I/O (see :mod:`mesagen.writer`).

    load_spec → derive → verify → lower → emit (one backend each)
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mesagen.backends import BACKENDS
from mesagen.errors import MesagenError
from mesagen.ir.lower import lower
from mesagen.ir.records import InputDecl, KernelLayerIR, LayerIR
from mesagen.spec.loader import load_spec, spec_sha256
from mesagen.spec.schema import Spec
from mesagen.symbolic.derive import Derivation, derive
from mesagen.symbolic.kernel import KernelDerivation, derive_kernel, verify_kernel
from mesagen.symbolic.verify import Check, verify


@dataclass(frozen=True)
class Compiled:
    """The result of compiling one spec: every stage's output and the files to write.

    Attributes:
        spec, derivation, checks, ir: the stage outputs.
        files: relative path (``NAME/layer_jax.py`` ...) → file text.
    """

    spec: Spec
    derivation: Derivation | KernelDerivation
    checks: tuple[Check, ...]
    ir: LayerIR | KernelLayerIR
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


#: Output folder of ``mesagen build`` when no ``--out`` is given: ``generated`` in the current folder.
DEFAULT_OUT = "generated"


def spec_root(path: str | Path) -> Path:
    """The folder a header's regenerate command runs in: the one that holds the spec's folder (absolute).

    Args:
        path: the spec file, as given on the command line.

    Returns:
        For ``/x/proj/specs/ridge.yaml``, ``/x/proj``: there ``mesagen build specs/ridge.yaml`` finds the
        spec again (the header records it as :func:`spec_display_path`, ``specs/ridge.yaml``). For a spec
        at the file-system root, the root.
    """
    parent = Path(path).resolve().parent
    return parent.parent if parent.name else parent


def out_argument(spec_path: str | Path, out: str | Path) -> str:
    """The ``--out`` argument the header's regenerate command records for output folder ``out``.

    Args:
        spec_path: the spec file, as given on the command line.
        out: the output folder, as given (``--out``) or the default (:data:`DEFAULT_OUT` in the current folder).

    Returns:
        ``""`` when ``out`` is ``generated`` beside the spec's folder (the default, recorded without
        ``--out``); otherwise ``out`` relative to :func:`spec_root` as a POSIX path (``build/gen``,
        ``../elsewhere``). It depends only on where ``out`` lies relative to the spec, never on the current
        folder or on absolute paths, so a checkout's files are byte-identical on every machine.

    Raises:
        MesagenError: that relative path holds characters that could break a generated header (anything
            but letters, digits and ``_ . + -`` in a folder name).
    """
    rel = Path(os.path.relpath(Path(out).resolve(), spec_root(spec_path))).as_posix()
    if rel == DEFAULT_OUT:
        return ""
    for part in rel.split("/"):
        if not _SAFE_PATH_PART.match(part):
            raise MesagenError(f"{out}: output folder names may hold only letters, digits and '_.+-' (the path "
                               f"from the spec's project folder, {rel!r}, is written into generated headers); "
                               f"got {part!r}")
    return rel


VERIFY_SEED = 0
"""Seed of the verification's random points. Generated text must not depend on it (a test changes it)."""


def compile_spec(spec: Spec, spec_path: str, backends: tuple[str, ...] | None = None,
                 out_arg: str = "") -> Compiled:
    """Compile a validated spec in memory.

    Args:
        spec: the validated spec.
        spec_path: the path to record in generated headers (see :func:`spec_display_path`).
        backends: backend names to emit (default: all registered).
        out_arg: the output folder the header's regenerate command names (see :func:`out_argument`;
            ``""`` for the default).

    Returns:
        The :class:`Compiled` record.

    Raises:
        DerivationError: a derived identity failed verification (nothing is emitted).
        KeyError: an unknown backend name.
    """
    if spec.objective.model.kind == "constant":
        return _compile_kernel(spec, spec_path, backends, out_arg)
    derivation = derive(spec)
    checks = verify(derivation, seed=VERIFY_SEED)
    ir = dataclasses.replace(lower(derivation, spec_path, spec_sha256(spec)), out_arg=out_arg)
    names = tuple(BACKENDS) if backends is None else backends
    files = {f"{spec.name}/{BACKENDS[b].filename}": BACKENDS[b].emit(ir, derivation, checks) for b in names}
    return Compiled(spec, derivation, checks, ir, files)


#: The backends that emit a kernel-regression layer (constant model with kernel weights): every registered one
#: (see docs/family.md §9). A backend added to the registry without kernel support is refused for such a spec.
KERNEL_BACKENDS = ("jax", "numba_cpu", "numba_cuda", "md")


def _compile_kernel(spec: Spec, spec_path: str, backends: tuple[str, ...] | None, out_arg: str) -> Compiled:
    """:func:`compile_spec` for a constant model with kernel weights (softmax / forgetting attention).

    Raises:
        MesagenError: a requested backend does not emit kernel-regression layers (the Numba backends).
        DerivationError: a derived identity failed verification.
    """
    names = tuple(BACKENDS) if backends is None else backends
    missing = [b for b in names if b not in KERNEL_BACKENDS]
    if missing:
        raise MesagenError(f"{spec_path}: the {', '.join(missing)} backend(s) do not emit kernel-regression layers "
                           f"(constant model, kernel weights) yet; only {list(KERNEL_BACKENDS)} do")
    derivation = derive_kernel(spec)
    checks = verify_kernel(derivation, seed=VERIFY_SEED)
    axis = {"batch": "B", "time": "T", "heads": "H", "d_k": "K", "d_v": "V"}
    inputs = tuple(InputDecl(n, x.space, x.domain, tuple(axis[a] for a in x.shape), "gate")
                   for n, x in spec.inputs.items())
    ir = KernelLayerIR(name=spec.name, spec_path=spec_path, spec_sha256=spec_sha256(spec),
                       description=" ".join(spec.description.split()), inputs=inputs,
                       feature_map=spec.objective.model.feature_map, default_scale=spec.readout.scale, out_arg=out_arg)
    files = {f"{spec.name}/{BACKENDS[b].filename}": BACKENDS[b].emit(ir, derivation, checks) for b in names}
    return Compiled(spec, derivation, checks, ir, files)


def compile_file(path: str | Path, backends: tuple[str, ...] | None = None, out: str | Path | None = None) -> Compiled:
    """Load, validate and compile a spec file.

    Args:
        path: the spec file.
        backends: backend names to emit (default: all registered).
        out: the output folder the files are meant for (recorded in the headers' regenerate command, see
            :func:`out_argument`); None: ``generated`` beside the spec's folder, the default of a checkout.

    Returns:
        The :class:`Compiled` record.

    Raises:
        SpecError: the spec is invalid. DerivationError: a derived identity failed verification.
        MesagenError: the spec or output path cannot be recorded in a header.
    """
    spec = load_spec(path)
    display = spec_display_path(path)
    return compile_spec(spec, display, backends, "" if out is None else out_argument(path, out))

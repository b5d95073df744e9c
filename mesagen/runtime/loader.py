"""Load generated layer modules by path and check their provenance (docs/contract.md §3, §6).

A block's layer is named in a run config as ``softmax``, ``generated:NAME`` or a path to a module file
(absolute, or relative to the repository root).

Where ``generated:NAME`` is looked up -- the one rule, implemented by :func:`generated_dirs`:

1. the folder given explicitly (``mesagen train/eval --generated DIR``), else
2. the folder in the environment variable ``MESAGEN_GENERATED``, else
3. ``./generated`` of the current folder (where ``mesagen build`` writes by default), then the source
   checkout's ``generated/`` (the shipped layers).

With 1 or 2 only that folder is searched; with 3 the first folder holding ``NAME/layer_jax.py`` wins. If none
does, the error lists every folder searched.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from mesagen.errors import MesagenError

#: The generated-module format this runtime understands (the ``CODEGEN_FORMAT`` of ``layer_jax.py``).
SUPPORTED_CODEGEN_FORMAT = 1

#: Names every generated ``layer_jax.py`` must define.
REQUIRED_NAMES = ("SPEC_NAME", "SPEC_SHA256", "CODEGEN_FORMAT", "PARAMS", "INPUTS", "FORMS", "State",
                  "init_params", "init_state", "forward", "step")

#: Repository root (the folder holding ``mesagen/``, ``generated/`` and ``configs/``).
REPO_ROOT = Path(__file__).resolve().parents[2]

#: Environment variable naming the folder of generated layers (rule 2 of :func:`generated_dirs`).
GENERATED_ENV = "MESAGEN_GENERATED"

_CACHE: dict[Path, ModuleType] = {}
_EXPLICIT: list[Path] = []   # set by use_generated_dir (the CLI's --generated)


class LayerLoadError(MesagenError):
    """A generated layer module is missing, malformed, stale, or of an unsupported codegen format."""


def generated_dirs(explicit: str | Path | None = None) -> list[Path]:
    """The folders searched for ``generated:NAME``, in order (the module docstring states the rule).

    Args:
        explicit: a folder given on the command line (``--generated``); default: the one set by
            :func:`use_generated_dir`, if any.

    Returns:
        Absolute folders (not checked for existence), without duplicates.
    """
    if explicit is None and _EXPLICIT:
        explicit = _EXPLICIT[-1]
    if explicit is not None:
        return [Path(explicit).resolve()]
    if os.environ.get(GENERATED_ENV):
        return [Path(os.environ[GENERATED_ENV]).resolve()]
    dirs = [(Path.cwd() / "generated").resolve(), (REPO_ROOT / "generated").resolve()]
    return list(dict.fromkeys(dirs))


@contextlib.contextmanager
def use_generated_dir(path: str | Path | None) -> Iterator[None]:
    """Within the block, :func:`generated_dirs` searches only ``path`` (no-op for None): the CLI's ``--generated``."""
    if path is None:
        yield
        return
    _EXPLICIT.append(Path(path))
    try:
        yield
    finally:
        _EXPLICIT.pop()


def resolve_layer_path(kind: str, root: Path | None = None) -> Path:
    """Map a layer kind to a module file.

    Args:
        kind: ``generated:NAME`` or a path ending in ``.py``.
        root: for ``generated:NAME``, the folder holding ``NAME/`` (skips the search rule of
            :func:`generated_dirs`); for a relative ``.py`` path, its base (default: the repository root).

    Returns:
        The absolute module path; a ``generated:NAME`` path exists, a ``.py`` path is not checked.

    Raises:
        LayerLoadError: if ``kind`` is neither form, or no searched folder holds ``NAME/layer_jax.py`` (the
            message lists the folders searched).
    """
    if kind.startswith("generated:"):
        name = kind.split(":", 1)[1]
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise LayerLoadError(f"bad layer kind {kind!r}: expected generated:NAME")
        dirs = [Path(root).resolve()] if root is not None else generated_dirs()
        for d in dirs:
            if (d / name / "layer_jax.py").is_file():
                return (d / name / "layer_jax.py").resolve()
        searched = ", ".join(str(d / name / "layer_jax.py") for d in dirs)
        if (REPO_ROOT / "specs" / f"{name}.yaml").is_file():
            how = f"run `mesagen build specs/{name}.yaml`"
        else:
            how = (f"this checkout has no specs/{name}.yaml to build it from (a layer of a newer mesagen, or a spec "
                   f"of your own: `mesagen build YOUR_SPEC.yaml`)")
        raise LayerLoadError(f"layer {kind!r} not found; searched {searched} ({how}, or point --generated / "
                             f"${GENERATED_ENV} at the folder holding {name}/)")
    base = Path(root) if root is not None else REPO_ROOT
    if kind.endswith(".py"):
        path = Path(kind)
        return (path if path.is_absolute() else base / path).resolve()
    raise LayerLoadError(f"bad layer kind {kind!r}: expected 'softmax', 'generated:NAME' or a path to a .py file")


def load_layer_module(path: str | Path, expected_sha256: str | None = None) -> ModuleType:
    """Import a generated layer module from a file and check its header constants.

    Modules are cached by resolved path, so every block naming the same file shares one module object.

    Args:
        path: the module file.
        expected_sha256: if given, the module's ``SPEC_SHA256`` must equal it (hex, case-insensitive).

    Returns:
        The imported module.

    Raises:
        LayerLoadError: if the file is missing, fails to import, lacks a required name, has a different
            ``CODEGEN_FORMAT`` than :data:`SUPPORTED_CODEGEN_FORMAT`, or a different spec hash.
    """
    path = Path(path).resolve()
    module = _CACHE.get(path)
    if module is None:
        if not path.is_file():
            hint = " (run `mesagen build specs/NAME.yaml` first)" if path.name == "layer_jax.py" else ""
            raise LayerLoadError(f"layer module {path} does not exist{hint}")
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
        name = f"_mesagen_layer_{path.parent.name}_{digest}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 -- any import failure becomes one clear error
            del sys.modules[name]
            raise LayerLoadError(f"importing layer module {path} failed: {type(exc).__name__}: {exc}") from exc
        missing = [n for n in REQUIRED_NAMES if not hasattr(module, n)]
        if missing:
            raise LayerLoadError(f"layer module {path} lacks {', '.join(missing)}")
        if module.CODEGEN_FORMAT != SUPPORTED_CODEGEN_FORMAT:
            raise LayerLoadError(
                f"layer module {path} has CODEGEN_FORMAT {module.CODEGEN_FORMAT}, this runtime supports "
                f"{SUPPORTED_CODEGEN_FORMAT}; regenerate it with a matching mesagen")
        _CACHE[path] = module
    if expected_sha256 is not None and module.SPEC_SHA256.lower() != expected_sha256.lower():
        raise LayerLoadError(
            f"layer module {path} was generated from spec sha256 {module.SPEC_SHA256}, expected "
            f"{expected_sha256}; regenerate it or update the expected hash")
    return module

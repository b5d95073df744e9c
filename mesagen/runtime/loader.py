"""Load generated layer modules by path and check their provenance (DESIGN.md Sec. 3).

A block's layer is named in a run config as ``softmax``, ``generated:NAME`` (``generated/NAME/layer_jax.py``
under the repository root) or a path to a module file (absolute, or relative to the repository root).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
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

_CACHE: dict[Path, ModuleType] = {}


class LayerLoadError(MesagenError):
    """A generated layer module is missing, malformed, stale, or of an unsupported codegen format."""


def resolve_layer_path(kind: str, root: Path | None = None) -> Path:
    """Map a layer kind to a module file.

    Args:
        kind: ``generated:NAME`` or a path ending in ``.py``.
        root: base of relative paths (default: the repository root).

    Returns:
        The absolute module path (not checked for existence).

    Raises:
        LayerLoadError: if ``kind`` is neither form.
    """
    base = Path(root) if root is not None else REPO_ROOT
    if kind.startswith("generated:"):
        name = kind.split(":", 1)[1]
        if not name or "/" in name:
            raise LayerLoadError(f"bad layer kind {kind!r}: expected generated:NAME")
        return (base / "generated" / name / "layer_jax.py").resolve()
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

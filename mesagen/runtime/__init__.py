"""mesagen.runtime: load generated layers, build models, train and evaluate on the paper's tasks.

Never imports the compiler side (spec / symbolic / ir / backends): training needs no sympy. The names below
are imported lazily (PEP 562), so ``mesagen.runtime.cli_train`` -- and with it ``mesagen``'s ``train`` and
``eval`` subcommands -- loads without jax; a missing runtime package is reported when it is first needed.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"ConfigError": "config", "RunConfig": "config", "load_config": "config",
            "SUPPORTED_CODEGEN_FORMAT": "loader", "LayerLoadError": "loader", "load_layer_module": "loader",
            "resolve_layer_path": "loader", "generated_dirs": "loader", "Model": "model", "Trainer": "train"}
# (the function ``train`` is ``mesagen.runtime.train.train``: a package attribute ``train`` would be shadowed
# by the submodule of that name as soon as it is imported)

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    """Import ``name`` from its submodule on first use (PEP 562).

    Raises:
        AttributeError: for a name this package does not export.
    """
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mesagen.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mesagen.runtime.{_EXPORTS[name]}"), name)

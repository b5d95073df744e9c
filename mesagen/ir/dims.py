"""The one dimension type of the IR and the symbols that carry it.

Per head, every array of a layer program has a shape built from two symbolic sizes, ``K`` (d_k, the key and
query width) and ``V`` (d_v, the value width), and the integer 1 (a column vector is ``(K, 1)``, a scalar a
``(1, 1)`` matrix). :data:`Dim` is that type everywhere: IR records, the derivation, the printers.
"""

from __future__ import annotations

from typing import Literal, Union

import sympy as sp

#: A dimension of a per-head array: the key width "K", the value width "V", or 1.
Dim = Union[Literal["K", "V"], Literal[1]]

K = sp.Symbol("K", integer=True, positive=True)
V = sp.Symbol("V", integer=True, positive=True)
DIMS = {"K": K, "V": V, 1: sp.Integer(1)}


def check_dim(d: object, where: str) -> None:
    """Raise ValueError unless ``d`` is a :data:`Dim` ("K", "V" or 1); ``where`` names the record."""
    if d not in ("K", "V", 1) or isinstance(d, bool):
        raise ValueError(f"{where}: dimension must be 'K', 'V' or 1, got {d!r}")


def mat(name: str, rows: Dim, cols: Dim) -> sp.MatrixSymbol:
    """A MatrixSymbol with dims given as 'K' (d_k), 'V' (d_v) or 1, e.g. ``mat("k", "K", 1)`` for a key column.

    Raises:
        KeyError: a dim other than 'K', 'V', 1.
    """
    return sp.MatrixSymbol(name, DIMS[rows], DIMS[cols])


def dim_of(size: sp.Basic) -> Dim:
    """The :data:`Dim` of a sympy size (``K`` → "K", ``V`` → "V", 1 → 1).

    Raises:
        ValueError: any other size.
    """
    for name, sym in DIMS.items():
        if sp.sympify(size) == sym:
            return name
    raise ValueError(f"size {size} is not K, V or 1")

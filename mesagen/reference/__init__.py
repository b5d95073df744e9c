"""mesagen.reference: hand-written numpy float64 ground truth for the shipped layers (docs/family.md §4; docs/contract.md §16).

Imports nothing from the compiler side; generated layers are tested against these.
"""

from mesagen.reference.layers import delta, finite_difference_grad, gd, linear, ridge, ridge_lstsq

__all__ = ["delta", "finite_difference_grad", "gd", "linear", "ridge", "ridge_lstsq"]

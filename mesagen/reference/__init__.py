"""mesagen.reference: hand-written numpy float64 ground truth for the shipped layers (DESIGN §4, §5).

Imports nothing from the compiler side; generated layers are tested against these.
"""

from mesagen.reference.layers import delta, finite_difference_grad, gd, linear, ridge, ridge_lstsq

__all__ = ["delta", "finite_difference_grad", "gd", "linear", "ridge", "ridge_lstsq"]

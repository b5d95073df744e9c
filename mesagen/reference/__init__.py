"""mesagen.reference: hand-written numpy float64 ground truth for the shipped layers (docs/family.md §4; docs/contract.md §16).

Imports nothing from the compiler side; generated layers are tested against these.
"""

from mesagen.reference.attention import forgetting_attention, softmax_attention, softmax_attention_weights
from mesagen.reference.gated import (gated_delta, gated_delta_vjp, gla, gla_vjp, kda, kda_vjp, retention,
                                     retention_vjp, simple_gla, simple_gla_vjp)
from mesagen.reference.layers import delta, finite_difference_grad, gd, linear, ridge, ridge_lstsq

__all__ = ["delta", "finite_difference_grad", "forgetting_attention", "gated_delta", "gated_delta_vjp", "gd", "gla",
           "gla_vjp", "kda", "kda_vjp", "linear", "retention", "retention_vjp", "ridge", "ridge_lstsq", "simple_gla",
           "simple_gla_vjp", "softmax_attention", "softmax_attention_weights"]

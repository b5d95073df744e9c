"""Float64 numpy references of causal softmax attention and forgetting attention (docs/family.md §9).

Independent of the compiler: every output is the explicitly normalised weighted mean of the values, the weight
matrix built entry by entry (the decay as a product of α, not from cumulative sums of log gates):

    o_t = Σ_{i≤t} p_{t,i} v_i,  p_{t,i} = κ_{t,i} / Σ_{j≤t} κ_{t,j},  κ_{t,i} = exp(scale · k_iᵀq_t + log ∏_{j=i+1}^{t} α_j − m_t),

m_t the row's maximum exponent (a constant per row, so p is unchanged; it keeps exp finite). Sources: Nadaraya 1964 /
Watson 1964 (kernel regression), Vaswani et al. 2017 (attention), Lin et al. 2025 (forgetting attention).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mesagen.reference import _checks


def softmax_attention_weights(q: Any, k: Any, scale: float, g: Any = None, gate_space: str = "log") -> np.ndarray:
    """The causal attention weights p [B, H, T, T] (rows sum to 1; p_{t,i} = 0 for i > t), float64.

    Args:
        q, k: [B, T, H, K] queries and keys (no feature map: pass φ(q), φ(k)).
        scale: the kernel's temperature (a positive float).
        g: None, or the forget gate [B, T, H]: log α (``gate_space="log"``, ≤ 0) or α (``"linear"``, in (0, 1]).
        gate_space: ``"log"`` or ``"linear"``.

    Raises:
        ValueError: bad shapes or dtypes, a gate outside its domain, an unknown gate space.
    """
    q, k, _ = _checks.qkv(q, k, np.zeros(np.shape(q)[:3] + (1,)))
    B, T, H, _ = q.shape
    if g is None:
        alpha = np.ones((B, T, H))
    else:
        alpha = np.exp(_checks.gate_to_log("g", _checks.per_token("g", g, (B, T, H)), gate_space))
    p = np.zeros((B, H, T, T))
    for b in range(B):
        for h in range(H):
            for t in range(T):
                logits = np.array([scale * float(k[b, i, h] @ q[b, t, h]) for i in range(t + 1)])
                decay = np.array([np.prod(alpha[b, i + 1:t + 1, h]) for i in range(t + 1)])
                lw = logits + np.log(decay)  # the decay as a product of α, then its log
                w = np.exp(lw - lw.max())
                p[b, h, t, :t + 1] = w / w.sum()
    return p


def softmax_attention(q: Any, k: Any, v: Any, scale: float, g: Any = None, gate_space: str = "log") -> np.ndarray:
    """Causal (forgetting) softmax attention, o [B, T, H, V] float64 (see the module docstring).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; scale, g, gate_space: as :func:`softmax_attention_weights`.

    Raises:
        ValueError: as :func:`softmax_attention_weights`.
    """
    q, k, v = _checks.qkv(q, k, v)
    p = softmax_attention_weights(q, k, scale, g, gate_space)
    return np.einsum("bhti,bihv->bthv", p, v)


def forgetting_attention(q: Any, k: Any, v: Any, g: Any, scale: float, gate_space: str = "log") -> np.ndarray:
    """Forgetting attention (fla ``forgetting_attn``): :func:`softmax_attention` with the forget gate ``g``
    [B, T, H] required. Returns o [B, T, H, V] float64. Raises ValueError as :func:`softmax_attention`."""
    if g is None:
        raise ValueError("g: forgetting attention needs a forget gate [B, T, H]")
    return softmax_attention(q, k, v, scale, g, gate_space)

"""Front-door validation shared by the reference layers.

Every check raises ``ValueError`` naming the argument and the expected shape, and returns float64 copies so
the references never alias (or mutate) a caller's arrays.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def as_float64(name: str, x: Any) -> np.ndarray:
    """Return ``x`` as a fresh float64 array; reject non-real or non-numeric input."""
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    return np.array(arr, dtype=np.float64, copy=True)


def qkv(q: Any, k: Any, v: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check ``q, k: [B, T, H, K]`` and ``v: [B, T, H, V]``; return float64 copies."""
    q, k, v = as_float64("q", q), as_float64("k", k), as_float64("v", v)
    for name, arr in (("q", q), ("k", k), ("v", v)):
        if arr.ndim != 4:
            raise ValueError(f"{name}: expected 4 axes (batch, time, heads, d), got shape {arr.shape}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, K]; got q {q.shape}, k {k.shape}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v: expected leading axes (batch, time, heads) = {k.shape[:3]}, got {v.shape[:3]}")
    if k.shape[3] < 1 or v.shape[3] < 1:
        raise ValueError(f"d_k and d_v must be >= 1; got d_k={k.shape[3]}, d_v={v.shape[3]}")
    return q, k, v


def per_head(name: str, x: Any, num_heads: int, *, positive: bool = False) -> np.ndarray:
    """Check a per-head parameter: shape ``[H]`` (a scalar is broadcast); optionally ``> 0``."""
    arr = as_float64(name, x)
    if arr.ndim == 0:
        arr = np.full(num_heads, float(arr))
    if arr.shape != (num_heads,):
        raise ValueError(f"{name}: expected shape (heads,) = ({num_heads},) or a scalar, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: must be finite, got {arr}")
    if positive and not np.all(arr > 0):
        raise ValueError(f"{name}: must be > 0 for every head, got {arr}")
    return arr


def per_token(name: str, x: Any, bth: tuple[int, int, int]) -> np.ndarray:
    """Check a per-token input of shape ``[B, T, H]``."""
    arr = as_float64(name, x)
    if arr.shape != tuple(bth):
        raise ValueError(f"{name}: expected shape (batch, time, heads) = {tuple(bth)}, got {arr.shape}")
    return arr


def state(initial_state: Mapping[str, Any] | None, expected: Mapping[str, tuple[int, ...]],
          defaults: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check an initial-state dict against ``expected`` shapes; ``None`` gives ``defaults``.

    The dict must hold exactly the keys of ``expected``; each value is copied to float64.
    """
    if initial_state is None:
        return {key: np.array(val, dtype=np.float64, copy=True) for key, val in defaults.items()}
    if not isinstance(initial_state, Mapping):
        raise ValueError(f"initial_state: expected a dict with keys {sorted(expected)}, "
                         f"got {type(initial_state).__name__}")
    if set(initial_state) != set(expected):
        raise ValueError(f"initial_state: expected keys {sorted(expected)}, got {sorted(initial_state)}")
    out = {}
    for key, shape in expected.items():
        arr = as_float64(f"initial_state[{key!r}]", initial_state[key])
        if arr.shape != shape:
            raise ValueError(f"initial_state[{key!r}]: expected shape {shape}, got {arr.shape}")
        out[key] = arr
    return out


def steps_count(steps: Any) -> int:
    """Check a GD step count: a non-negative int (bools rejected)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps: expected a non-negative int, got {steps!r}")
    return int(steps)


def per_token_channels(name: str, x: Any, bthd: tuple[int, int, int, int], channel: str) -> np.ndarray:
    """Check a per-token, per-channel input of shape ``[B, T, H, D]`` (``channel`` names the last axis)."""
    arr = as_float64(name, x)
    if arr.shape != tuple(bthd):
        raise ValueError(f"{name}: expected shape (batch, time, heads, {channel}) = {tuple(bthd)}, got {arr.shape}")
    return arr


def per_token_scalar_or_channels(name: str, x: Any, bth: tuple[int, int, int], d: int,
                                 channel: str) -> np.ndarray:
    """Check a per-token input of shape ``[B, T, H]`` or ``[B, T, H, D]``; return it as ``[B, T, H, D]``."""
    arr = as_float64(name, x)
    if arr.shape == tuple(bth):
        return np.repeat(arr[..., None], d, axis=3)
    if arr.shape == (*bth, d):
        return arr
    raise ValueError(f"{name}: expected shape (batch, time, heads) = {tuple(bth)} or "
                     f"(batch, time, heads, {channel}) = {(*bth, d)}, got {arr.shape}")


GATE_SPACES = ("log", "linear")


def gate_to_log(name: str, arr: np.ndarray, gate_space: str) -> np.ndarray:
    """Check a decay gate's domain and return it in log space (float64, same shape).

    ``gate_space="log"``: ``arr`` is ``g = log(alpha)``, must be finite and ``<= 0``.
    ``gate_space="linear"``: ``arr`` is ``alpha``, must be finite and in ``(0, 1]``; returns ``log(alpha)``.
    """
    if gate_space not in GATE_SPACES:
        raise ValueError(f"gate_space: expected one of {GATE_SPACES}, got {gate_space!r}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: must be finite (gate_space={gate_space!r})")
    if gate_space == "log":
        if np.any(arr > 0):
            raise ValueError(f"{name}: a log-space gate must be <= 0 (got max {np.max(arr)!r})")
        return arr
    if np.any(arr <= 0) or np.any(arr > 1):
        raise ValueError(f"{name}: a linear-space gate must lie in (0, 1] "
                         f"(got min {np.min(arr)!r}, max {np.max(arr)!r})")
    return np.log(arr)


def unit_interval(name: str, arr: np.ndarray) -> np.ndarray:
    """Check that every entry of ``arr`` is finite and in ``[0, 1]``; return ``arr``."""
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise ValueError(f"{name}: every entry must be finite and in [0, 1]")
    return arr

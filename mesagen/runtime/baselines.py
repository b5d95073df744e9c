"""In-context baselines of the paper, evaluated per position t (paper Sec. 3-4; docs/paper.md §4).

Position t (0-based) has the t context pairs ``(x_i, y_i) = (s_i, s_{i+1})``, ``i < t``, and the query
``x_t = s_t``; every predictor outputs an estimate of ``y_t = s_{t+1}``. All run in numpy float64 (the ridge
systems are ill-conditioned for small lambda and t < D; float32 would bias the reference values).
Losses are in the paper's unit: ``0.5 * ||y_hat - y||^2`` summed over state dims, averaged over the batch.
"""

from __future__ import annotations

import numpy as np

#: lambda grid of the ridge line search (standard ridge coefficient; the paper's lambda is its inverse).
RIDGE_GRID = tuple(10.0 ** e for e in np.arange(-6.0, 1.01, 0.25))


def per_t_loss(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Paper-unit loss per position.

    Args:
        pred: ``(batch, T, D)``.
        target: ``(batch, T, D)``.

    Returns:
        float64 ``(T,)``: ``mean_b 0.5 * sum_d (pred - target)^2``.
    """
    err = np.asarray(pred, np.float64) - np.asarray(target, np.float64)
    return 0.5 * np.mean(np.sum(err ** 2, axis=-1), axis=0)


def _pairs(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(states, np.float64)
    return s[:, :-1], s[:, 1:]


def predict_zero(states: np.ndarray) -> np.ndarray:
    """Trivial baseline ``y_hat_t = 0``. Args: states ``(batch, T + 1, D)``. Returns ``(batch, T, D)``."""
    x, _ = _pairs(states)
    return np.zeros_like(x)


def predict_last(states: np.ndarray) -> np.ndarray:
    """Trivial baseline ``y_hat_t = s_t`` (copy the current state). Returns ``(batch, T, D)``."""
    x, _ = _pairs(states)
    return x.copy()


def gd1_direction(states: np.ndarray) -> np.ndarray:
    """One GD step from Phi_0 = 0 with unit rate: ``g_t = sum_{i<t} y_i x_i^T x_t`` (paper Eq. 5 / Prop. 1).

    Args:
        states: ``(batch, T + 1, D)``.

    Returns:
        float64 ``(batch, T, D)``; the GD-1 prediction with rate eta is ``eta * g``.
    """
    x, y = _pairs(states)
    scores = np.einsum("btd,bid->bti", x, x)                       # x_t . x_i
    scores *= np.tril(np.ones(scores.shape[1:]), k=-1)            # keep i < t
    return np.einsum("bti,bid->btd", scores, y)


def gd1(states: np.ndarray, eta: float) -> np.ndarray:
    """GD-1 prediction ``eta * sum_{i<t} y_i x_i^T x_t``. Returns ``(batch, T, D)``."""
    return eta * gd1_direction(states)


def fit_gd1_eta(states: np.ndarray) -> float:
    """Exact line search of the GD-1 rate: the prediction is linear in eta, so the minimiser of the mean loss
    over batch and positions is ``<g, y> / <g, g>``.

    Args:
        states: tuning sequences ``(batch, T + 1, D)`` (keep them apart from the evaluation set).

    Returns:
        The optimal eta (float).
    """
    g = gd1_direction(states)
    _, y = _pairs(states)
    return float(np.sum(g * y) / np.sum(g * g))


def ridge(states: np.ndarray, lam: float) -> np.ndarray:
    """In-context ridge regression including the newest pair (docs/paper.md §4; the mesa layer's target).

    ``Phi_t = (sum_{i<t} y_i x_i^T)(sum_{i<t} x_i x_i^T + lam I)^{-1}``, prediction ``Phi_t x_t``; at t = 0
    there are no pairs and the prediction is 0.

    Args:
        states: ``(batch, T + 1, D)``.
        lam: ridge coefficient (> 0).

    Returns:
        float64 ``(batch, T, D)``.

    Raises:
        ValueError: if ``lam <= 0``.
    """
    if lam <= 0:
        raise ValueError(f"ridge coefficient must be positive, got {lam}")
    x, y = _pairs(states)
    d = x.shape[-1]
    xx = np.cumsum(np.einsum("bti,btj->btij", x, x), axis=1)
    yx = np.cumsum(np.einsum("bti,btj->btij", y, x), axis=1)
    zeros = np.zeros_like(xx[:, :1])
    xx, yx = np.concatenate([zeros, xx[:, :-1]], 1), np.concatenate([zeros, yx[:, :-1]], 1)  # exclusive: i < t
    sol = np.linalg.solve(xx + lam * np.eye(d), x[..., None])[..., 0]   # (XX + lam I)^{-1} x_t
    return np.einsum("btij,btj->bti", yx, sol)


def fit_ridge_lambda(states: np.ndarray, grid: tuple[float, ...] = RIDGE_GRID) -> float:
    """Line search of the ridge coefficient over ``grid`` by mean loss over batch and positions.

    Args:
        states: tuning sequences ``(batch, T + 1, D)``.
        grid: candidate coefficients.

    Returns:
        The best coefficient on ``grid``.
    """
    _, y = _pairs(states)
    losses = [per_t_loss(ridge(states, lam), y).mean() for lam in grid]
    return float(grid[int(np.argmin(losses))])


#: β grid of the softmax kernel-regression line search.
KERNEL_BETA_GRID = tuple(10.0 ** e for e in np.arange(-1.0, 2.51, 0.125))


def softmax_kernel(states: np.ndarray, beta: float) -> np.ndarray:
    """Softmax kernel regression (Nadaraya–Watson with an exponential kernel; docs/paper.md §4, the paper's
    baseline for softmax attention): ``y_hat_t = sum_{i<t} y_i softmax_i(beta x_i^T x_t)``, 0 at t = 0.

    Args:
        states: ``(batch, T + 1, D)``.
        beta: inverse temperature (>= 0; 0 averages the context's targets).

    Returns:
        float64 ``(batch, T, D)``.

    Raises:
        ValueError: if ``beta < 0`` or is not finite.
    """
    if not (np.isfinite(beta) and beta >= 0):
        raise ValueError(f"softmax kernel: beta must be finite and >= 0, got {beta}")
    x, y = _pairs(states)
    scores = beta * np.einsum("btd,bid->bti", x, x)                  # beta x_t . x_i
    keep = np.tril(np.ones(scores.shape[1:], bool), k=-1)            # i < t
    scores = np.where(keep, scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    w = np.where(keep, np.exp(scores - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = w.sum(-1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)   # t = 0: no pairs, prediction 0
    return np.einsum("bti,bid->btd", w, y)


def fit_softmax_kernel_beta(states: np.ndarray, grid: tuple[float, ...] = KERNEL_BETA_GRID) -> float:
    """Line search of the kernel-regression β over ``grid`` by mean loss over batch and positions.

    Args:
        states: tuning sequences ``(batch, T + 1, D)``. grid: candidate β.

    Returns:
        The best β on ``grid``.
    """
    _, y = _pairs(states)
    losses = [per_t_loss(softmax_kernel(states, b), y).mean() for b in grid]
    return float(grid[int(np.argmin(losses))])


def fit_baselines(tune_states: np.ndarray) -> dict[str, float]:
    """Line-search every tunable baseline on tuning sequences: ``{"gd1_eta": ..., "ridge_lambda": ...}``."""
    return {"gd1_eta": fit_gd1_eta(tune_states), "ridge_lambda": fit_ridge_lambda(tune_states)}


def baseline_losses(states: np.ndarray, fitted: dict[str, float]) -> dict[str, np.ndarray]:
    """Per-t losses of all baselines on held-out sequences.

    Args:
        states: evaluation sequences ``(batch, T + 1, D)``.
        fitted: output of :func:`fit_baselines` (tuned on *other* sequences).

    Returns:
        ``{"predict_zero", "predict_last", "gd1", "ridge"} -> (T,)`` float64 losses.
    """
    _, y = _pairs(states)
    return {
        "predict_zero": per_t_loss(predict_zero(states), y),
        "predict_last": per_t_loss(predict_last(states), y),
        "gd1": per_t_loss(gd1(states, fitted["gd1_eta"]), y),
        "ridge": per_t_loss(ridge(states, fitted["ridge_lambda"]), y),
    }

"""PNG figures of a run (matplotlib, Agg backend): per-position loss curves and the training curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_STYLE = {"model": ("C0", "-", 2.0), "gd1": ("C1", "--", 1.5), "ridge": ("C2", "--", 1.5),
          "predict_zero": ("0.5", ":", 1.2), "predict_last": ("0.7", ":", 1.2)}
_LABEL = {"model": "model", "gd1": "GD-1 (tuned η)", "ridge": "ridge LSQ (tuned λ)",
          "predict_zero": "predict 0", "predict_last": "predict s_t"}


def plot_per_t(curves: dict[str, np.ndarray], path: Path, title: str = "") -> None:
    """Loss against the number of context pairs t, log scale, like the paper's Figs. 2-4.

    Args:
        curves: name -> ``(T,)`` losses (names ``model``, ``gd1``, ``ridge``, ... get fixed styles).
        path: output PNG.
        title: figure title.
    """
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, c in curves.items():
        color, ls, lw = _STYLE.get(name, (None, "-", 1.5))
        ax.plot(np.arange(len(c)), c, ls, color=color, lw=lw, label=f"{_LABEL.get(name, name)} ({np.mean(c):.3f})")
    _finish(fig, ax, path, title, "context pairs t", "loss ½‖ŝ − s‖²", legend_size=7)


def plot_training(metrics: list[dict], path: Path, title: str = "") -> None:
    """Training loss and held-out mean loss against the step (log scale)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    tr = [(r["step"], r["train_loss"]) for r in metrics if "train_loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    if tr:
        ax.plot(*zip(*tr), label="train")
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out")
    _finish(fig, ax, path, title, "step", "loss", legend_size=8)


def _finish(fig, ax, path: Path, title: str, xlabel: str, ylabel: str, legend_size: int) -> None:
    """Shared styling of both figures (log y, labels, legend, grid), then save and close."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

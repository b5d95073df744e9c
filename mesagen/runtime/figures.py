"""PNG figures of a run (matplotlib, Agg backend): per-position loss curves and the training curve."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_STYLE = {"model": ("C0", "-", 2.0), "gd1": ("C1", "--", 1.5), "ridge": ("C2", "--", 1.5),
          "predict_zero": ("0.5", ":", 1.2), "predict_last": ("0.7", ":", 1.2)}
#: Display names of spec parameters in figures and titles.
GREEK = {"lam": "λ", "eta": "η", "beta": "β", "gamma": "γ"}

_LABEL = {"model": "model", "gd1": "GD-1 (tuned η)", "ridge": "ridge LSQ (tuned λ)",
          "predict_zero": "predict 0", "predict_last": "predict s_t"}


def plot_per_t(curves: dict[str, np.ndarray], path: Path, title: str = "", *, xlabel: str = "context pairs t",
               ylabel: str = "loss ½‖ŝ − s‖²") -> None:
    """Loss against the number of context pairs t, log scale, like the paper's Figs. 2-4.

    Args:
        curves: name -> ``(T,)`` losses (names ``model``, ``gd1``, ``ridge``, ... get fixed styles).
        path: output PNG.
        title: figure title.  xlabel, ylabel: axis labels (defaults: the dynamics task's).
    """
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, c in curves.items():
        color, ls, lw = _STYLE.get(name, (None, "-", 1.5))
        ax.plot(np.arange(len(c)), c, ls, color=color, lw=lw, label=f"{_LABEL.get(name, name)} ({np.mean(c):.3f})")
    _finish(fig, ax, path, title, xlabel, ylabel, legend_size=7)


def plot_training(metrics: list[dict], path: Path, title: str = "", *, ylabel: str = "loss") -> None:
    """Training loss and held-out mean loss against the step (log scale); the learned layer parameters
    recorded with them (``params`` of ``metrics.jsonl``, e.g. λ per head; a parameter with channels per head,
    such as MesaNet's λ of shape ``(H, K)``, as each head's min and max over channels) on a second, right-hand
    axis.

    Args:
        metrics: the records of ``metrics.jsonl``.
        path: output PNG.
        title: figure title.  ylabel: the loss axis label.
    """
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    tr = [(r["step"], r["train_loss"]) for r in metrics if "train_loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    if tr:
        ax.plot(*zip(*tr), label="train")
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out")
    series: dict[str, list[tuple[int, float]]] = {}
    for r in metrics:
        for blk, ps in (r.get("params") or {}).items():
            for name, values in ps.items():
                for h, v in enumerate(values):
                    label = f"{blk} {GREEK.get(name, name)}[{h}]"
                    if np.ndim(v) == 0:
                        series.setdefault(label, []).append((r["step"], v))
                    else:       # channels per head (MesaNet's λ, shape (H, K)): the head's range, two lines
                        series.setdefault(f"{label} min", []).append((r["step"], float(np.min(v))))
                        series.setdefault(f"{label} max", []).append((r["step"], float(np.max(v))))
    if series:
        ax2 = ax.twinx()
        for i, (label, pts) in enumerate(sorted(series.items())):
            ax2.plot(*zip(*pts), ":", color=f"C{(i + 2) % 10}", lw=1.2, label=label)
        ax2.set_ylabel("learned layer parameter", fontsize=8)
        ax2.legend(fontsize=6, loc="upper right")
    # loss falls from the upper left: its legend goes lower left, the parameters' upper right
    _finish(fig, ax, path, title, "step", ylabel, legend_size=8, legend_loc="lower left" if series else "best")


def _finish(fig, ax, path: Path, title: str, xlabel: str, ylabel: str, legend_size: int,
            legend_loc: str = "best") -> None:
    """Shared styling of both figures (log y, labels, legend, grid), then save and close."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=9)  # long model names wrap, never cut off
    ax.legend(fontsize=legend_size, loc=legend_loc)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

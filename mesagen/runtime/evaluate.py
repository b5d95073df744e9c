"""Held-out evaluation of a run against the baselines, per position t, with a table and figures.

Text runs (``task.kind: text``) have no baselines: their evaluation is the next-byte cross-entropy per position
on the validation windows, in nats, bits per byte and perplexity, and the in-context-learning score.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from mesagen.data import sample_states
from mesagen.runtime.baselines import baseline_losses, fit_baselines
from mesagen.runtime.config import load_config
from mesagen.runtime.figures import GREEK, plot_per_t, plot_training

#: Positions shown in the summary table (t = number of context pairs).
TABLE_T = (0, 1, 5, 10, 20, 30, 49)


def baselines_for(trainer) -> dict:
    """Tune GD-1's eta and ridge's lambda on ``eval.tune_batch`` sequences from ``PRNGKey(eval.seed + 1)`` and
    return ``{"fitted": {...}, "per_t": {name: [T floats]}}`` on the trainer's held-out set."""
    cfg = trainer.config
    tune = np.asarray(sample_states(jax.random.PRNGKey(cfg.eval.seed + 1), cfg.task, cfg.eval.tune_batch))
    fitted = fit_baselines(tune)
    return {"fitted": fitted, "per_t": {k: v.tolist() for k, v in baseline_losses(trainer.eval_states, fitted).items()}}


def format_table(curves: dict[str, np.ndarray], ts: tuple[int, ...] = TABLE_T) -> str:
    """Text table: one row per curve, the mean over t, then the loss at each t in ``ts`` present."""
    n = len(next(iter(curves.values())))
    ts = tuple(t for t in ts if t < n)
    head = f"{'':14s} {'mean':>9s} " + " ".join(f"{'t=' + str(t):>9s}" for t in ts)
    rows = [f"{name:14s} {np.mean(c):9.4f} " + " ".join(f"{c[t]:9.4f}" for t in ts) for name, c in curves.items()]
    return "\n".join([head, *rows])


def provenance(trainer, model, steps: int, wall_s: float | None) -> dict:
    """What produced a model: its description (depth, layer kinds), the learned layer parameters (constrained
    space, per head), layer spec hashes and files, steps / batch / tokens trained, mesagen and jax versions,
    training wall time and throughput (None where the wall time is unknown)."""
    from mesagen import __version__
    from mesagen.runtime.train import describe_model, layer_provenance, learned_params

    cfg = trainer.config
    tokens = steps * cfg.train.batch_size * cfg.task.seq_len
    rate = steps / wall_s if wall_s else None
    return {"model": describe_model(cfg), "depth": len(cfg.model.blocks), "params": learned_params(model),
            "layers": layer_provenance(model), "steps_trained": steps, "batch_size": cfg.train.batch_size,
            "tokens_trained": tokens, "mesagen_version": __version__, "jax_version": jax.__version__,
            "wall_s": wall_s, "steps_per_s": rate, "tokens_per_s": rate * cfg.train.batch_size * cfg.task.seq_len
            if rate else None}


def _head_value(x) -> str:
    """One head's value of a learned parameter: ``0.93`` for a scalar, ``0.81…1.2`` (min…max over the head's
    channels) for a per-channel one such as MesaNet's λ of shape ``(H, K)``."""
    a = np.asarray(x, np.float64)
    return f"{float(a):.3g}" if a.ndim == 0 else f"{a.min():.3g}…{a.max():.3g}"


def params_line(params: dict) -> str:
    """``"learned λ: block_0 [0.93, 1.21]"``-style text of :func:`~mesagen.runtime.train.learned_params`; a
    parameter with channels per head (shape ``(H, K)``) shows each head's range ``min…max``."""
    parts = [f"{blk} {GREEK.get(n, n)}=[{', '.join(_head_value(x) for x in v)}]"
             for blk, ps in params.items() for n, v in ps.items()]
    return "learned " + "; ".join(parts) if parts else "no learned layer parameters"


def write_evaluation(run_dir: Path, trainer, model, *, steps: int | None = None, wall_s: float | None = None) -> dict:
    """Evaluate ``model`` and the baselines on the held-out set; write ``eval.json`` (per-t curves, means,
    fitted baselines and :func:`provenance`), ``per_t.png``, ``training.png``; print the table.

    Args:
        run_dir: the run folder. trainer: its :class:`~mesagen.runtime.train.Trainer`. model: the model.
        steps: optimiser steps the model was trained (default ``train.steps``).
        wall_s: training wall time in seconds (None if unknown).

    Returns:
        The ``eval.json`` content.
    """
    run_dir = Path(run_dir)
    if trainer.config.is_text:
        return write_text_evaluation(run_dir, trainer, model, steps=steps, wall_s=wall_s)
    base_path = run_dir / "baselines.json"
    base = json.loads(base_path.read_text()) if base_path.exists() else None
    if base is None or base.get("eval") != trainer.config.eval.model_dump() or base.get("task") != trainer.config.task.model_dump():
        base = {**baselines_for(trainer), "eval": trainer.config.eval.model_dump(), "task": trainer.config.task.model_dump()}
        base_path.write_text(json.dumps(base) + "\n")
    curves = {"model": trainer.evaluate(model), **{k: np.asarray(v) for k, v in base["per_t"].items()}}
    prov = provenance(trainer, model, trainer.config.train.steps if steps is None else steps, wall_s)
    result = {"name": trainer.config.name, "fitted": base["fitted"],
              "mean": {k: float(np.mean(v)) for k, v in curves.items()},
              "per_t": {k: v.tolist() for k, v in curves.items()}, **prov}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    named = f"{trainer.config.name} ({prov['model']}, {prov['steps_trained']} steps)\n{params_line(prov['params'])}"
    plot_per_t(curves, run_dir / "per_t.png", title=f"held-out loss per position: {named}")
    from mesagen.runtime.train import read_metrics
    plot_training(read_metrics(run_dir), run_dir / "training.png", title=named)
    print(f"{trainer.config.name}: held-out loss (0.5 * squared error summed over dims), "
          f"gd1 eta={base['fitted']['gd1_eta']:.4f}, ridge lambda={base['fitted']['ridge_lambda']:.2e}")
    print(format_table(curves))
    return result


def write_text_evaluation(run_dir: Path, trainer, model, *, steps: int | None = None,
                          wall_s: float | None = None) -> dict:
    """Text runs: evaluate ``model`` on the validation windows; write ``eval.json`` (per-position loss in nats,
    its mean, bits per byte, perplexity, ICL score, the number of validation sequences and tokens, the corpus
    record and :func:`provenance`), ``per_t.png`` (bits per byte per position) and ``training.png``; print a
    summary line.

    Returns:
        The ``eval.json`` content.
    """
    from mesagen.runtime.train import model_param_count, read_metrics, text_metrics

    per_t = trainer.evaluate(model)
    prov = provenance(trainer, model, trainer.config.train.steps if steps is None else steps, wall_s)
    scores = text_metrics(per_t)
    n_seq = int(trainer.eval_tokens.shape[0])
    result = {"name": trainer.config.name, **scores, "mean": {"model": scores["eval_loss"]},
              "per_t": {"model": per_t.tolist()}, "eval_sequences": n_seq, "eval_tokens": n_seq * per_t.shape[0],
              "corpus": trainer.data.corpus.record, "param_count": model_param_count(model),
              "precision": trainer.config.train.precision, **prov}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    named = f"{trainer.config.name} ({prov['model']}, {prov['steps_trained']} steps)"
    plot_per_t({"model": per_t / np.log(2.0)}, run_dir / "per_t.png", title=f"validation bits per byte per "
               f"position: {named}", xlabel="bytes of context t", ylabel="bits per byte")
    plot_training(read_metrics(run_dir), run_dir / "training.png", title=named, ylabel="cross-entropy (nats/byte)")
    print(f"{trainer.config.name}: validation {scores['eval_bpb']:.4f} bits/byte, perplexity "
          f"{scores['eval_ppl']:.3f}, ICL score {scores['eval_icl']:+.4f} nats ({n_seq} sequences of "
          f"{per_t.shape[0]} bytes)")
    return result


def evaluate_run(run_dir: str | Path) -> dict:
    """Evaluate the checkpoint of a run folder (``mesagen eval RUN_DIR``).

    Raises:
        ConfigError: if ``config.yaml`` is invalid. FileNotFoundError: if there is no checkpoint.
        CheckpointError: if the checkpoint is not in this mesagen's format.
        LayerLoadError: if a generated layer is missing or changed since training.
    """
    from mesagen.runtime.train import Trainer
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml", stored=True)
    ckpt = run_dir / "checkpoint.eqx"
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: no checkpoint (train the run first)")
    from mesagen.runtime.train import read_checkpoint_header
    header = read_checkpoint_header(ckpt)
    trainer = Trainer(config, json.loads((run_dir / "layers.json").read_text()))
    state = trainer.load(ckpt)
    return write_evaluation(run_dir, trainer, state.model, steps=state.step, wall_s=header.get("wall_s"))

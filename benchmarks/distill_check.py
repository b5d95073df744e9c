"""Claim 5's distillation on a finished softmax run: swap its layers after the first for distilled linear ones.

    python3 benchmarks/distill_check.py RUN_DIR [--steps 500] [--lr 1e-2] [--plain-lr 2e-3] [--n 256] [--out FILE]

Loads the run's checkpoint read-only (``Trainer.load``), samples ``--n`` training and ``--n / 2`` held-out
sequences (seeds ``eval.seed + 1000`` / ``+ 1001``: neither the held-out evaluation set nor the baselines'
tuning set), distils every layer after the first (:func:`mesagen.runtime.distill.distill_linear_layers`) as the
1/(t+1)-normalised and as the plain linear layer, and prints the per-layer relative errors and the held-out
loss (``Trainer.evaluate``, the run's own evaluation set) of the original model, of the model with all those
layers swapped, and with one swapped at a time (:func:`mesagen.runtime.distill.swap_losses`). ``--out`` writes
all of it as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

from mesagen.data import sample_states
from mesagen.runtime.config import load_config
from mesagen.runtime.distill import distill_linear_layers, swap_losses
from mesagen.runtime.train import Trainer, batch_from_states


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate of the normalised layers")
    p.add_argument("--plain-lr", type=float, default=2e-3, help="of the plain layers (1e-2 diverges for them)")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    config = load_config(a.run_dir / "config.yaml", stored=True)
    trainer = Trainer(config, json.loads((a.run_dir / "layers.json").read_text()))
    state = trainer.load(a.run_dir / "checkpoint.eqx")
    model = state.model

    def tokens(seed, n):
        return batch_from_states(config, sample_states(jax.random.PRNGKey(seed), config.task, n))[0]

    train_tok, eval_tok = tokens(config.eval.seed + 1000, a.n), tokens(config.eval.seed + 1001, a.n // 2)
    layers = list(range(1, len(model.blocks)))
    result = {"run": str(a.run_dir), "step": state.step}
    print(f"{a.run_dir} (step {state.step}): distilling layers {layers} on {a.n} sequences, {a.steps} steps")
    for name, normalize, lr in (("normalized", True, a.lr), ("plain", False, a.plain_lr)):
        t0 = time.perf_counter()
        new, rep = distill_linear_layers(model, train_tok, layers, steps=a.steps, lr=lr, normalize=normalize,
                                         tokens_eval=eval_tok)
        sw = swap_losses(model, new, layers, lambda m: float(trainer.evaluate(m).mean()))
        dt = time.perf_counter() - t0
        print(f"{name} (lr {lr:g}, {dt:.0f} s): held-out loss original {sw['original']:.4f}, all swapped "
              f"{sw['all']:.4f}, one at a time " + ", ".join(f"{i}: {v:.4f}" for i, v in sw["one"].items()))
        for i, r in rep["layers"].items():
            print(f"  layer {i}: relative error {r['scaled_init_rel_error']:.3f} -> {r['rel_error']:.4f} "
                  f"(held out {r['eval_init_rel_error']:.3f} -> {r['eval_rel_error']:.4f})")
        result[name] = {"losses": sw, "report": rep, "seconds": dt}
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

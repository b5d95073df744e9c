"""The README's language-modelling table: every trained ``runs/lm_*`` run on its whole validation split.

    python3 benchmarks/lm_table.py [RUN_DIR ...]        (default: runs/lm_softmax runs/lm_mesa ...)

For each run: load its checkpoint (``mesagen.runtime.generate.load_run_model``), rebuild its corpus split
(``TextData``), and compute the next-byte cross-entropy of every position of every non-overlapping validation
window (not just the ``eval.batch`` windows of the periodic evaluation), in batches of 256. Prints one
Markdown row per run: layers, parameter count, validation bits per byte, perplexity, the in-context-learning
score (``mesagen.data.icl_score``: late minus early positions, nats), mean loss per position band, and the
run's steps, batch and training wall time (from its ``eval.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from mesagen.data import TextData, bits_per_byte, icl_score
from mesagen.runtime.generate import load_run_model
from mesagen.runtime.train import compute_dtype, cross_entropy, describe_model, model_param_count

RUNS = ("lm_softmax", "lm_mesa", "lm_linear", "lm_gated_delta", "lm_gla")


@eqx.filter_jit
def _losses(model, window, dtype=None):
    return cross_entropy(model(window[:, :-1], dtype), window[:, 1:])


def evaluate(run_dir: Path) -> dict:
    """Whole-validation-split metrics of one run (see the module docstring)."""
    config, model = load_run_model(run_dir)
    data = TextData(config.task)
    windows = data.valid_batch(10 ** 9)
    per_t = np.zeros(config.task.seq_len)
    for i in range(0, len(windows), 256):
        per_t += np.asarray(_losses(model, jnp.asarray(windows[i:i + 256]), compute_dtype(config.train)),
                            np.float64).sum(0)
    per_t /= len(windows)
    ev = json.loads((run_dir / "eval.json").read_text())
    loss = float(per_t.mean())
    return {"run": run_dir.name, "model": describe_model(config), "params": model_param_count(model),
            "bpb": bits_per_byte(loss), "ppl": float(np.exp(loss)), "icl": icl_score(per_t),
            "bands": [float(per_t[a:a + 32].mean()) for a in range(0, config.task.seq_len, 32)],
            "windows": len(windows), "steps": ev["steps_trained"], "batch": ev["batch_size"], "wall_s": ev["wall_s"],
            "corpus": data.corpus.record}


def main(argv: list[str]) -> None:
    runs = [Path(a) for a in argv] or [Path("runs") / r for r in RUNS]
    rows = [evaluate(r) for r in runs if (r / "checkpoint.eqx").is_file()]
    if not rows:
        sys.exit("no trained run found (train configs/lm_*.yaml first)")
    c = rows[0]["corpus"]
    print(f"validation: {rows[0]['windows']} windows of 128 bytes; corpus {c['source']} "
          f"(Python {c.get('python_version', '-')}, {c['files']} files, {c['bytes']} bytes, sha256 {c['sha256'][:12]})")
    print("| run | blocks | params | val. bits/byte | perplexity | ICL score (nats) | loss t<32 / 32–63 / 64–95 / "
          "96–127 | steps × batch | wall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        blocks = r["model"].split(";")[0].split(": ", 1)[1]
        print(f"| {r['run']} | {blocks} | {r['params']:,} | {r['bpb']:.3f} | {r['ppl']:.2f} | {r['icl']:+.3f} | "
              f"{' / '.join(f'{b:.3f}' for b in r['bands'])} | {r['steps']} × {r['batch']} | {r['wall_s'] / 60:.1f} min |")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Training steps per second on CPU: the paper's 2-layer linear config and the same model with mesa layers.

    PYTHONPATH=. python3 benchmarks/train_steps.py [--steps N] [--batch B] [--ridge-closed-form]

Model: constructed tokens (embed 40 = 4 D), 2 layers, 4 heads, key size 20, B = 256, T = 50 (paper Table 1,
"k layers, constructed"), one jitted AdamW step per iteration including data sampling. Needs the generated
layers (``mesagen build specs/linear.yaml specs/ridge.yaml``). Compilation is timed separately.
"""

from __future__ import annotations

import argparse
import time

from mesagen.runtime.config import RunConfig
from mesagen.runtime.train import Trainer


def config(layer: str, form: str, batch: int) -> RunConfig:
    """The paper's 2-layer constructed-token config with ``layer`` in both blocks."""
    return RunConfig.model_validate({
        "name": f"bench-{layer}-{form}",
        "model": {"tokens": "constructed", "d_model": 40, "heads": 4, "d_k": 20, "clip_activations": 4.0,
                  "init_std": 0.014142, "blocks": [{"layer": layer, "form": form}] * 2},
        "train": {"steps": 1, "batch_size": batch, "schedule": {"peak_lr": 1e-4}, "weight_decay": 0.1,
                  "progress": False},
        "eval": {"batch": 8, "tune_batch": 8},
    })


def bench(cfg: RunConfig, steps: int) -> tuple[float, float]:
    """Returns (compile seconds, steps per second)."""
    trainer = Trainer(cfg)
    state = trainer.initial_state()
    t0 = time.perf_counter()
    state, loss = trainer.step(state)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, loss = trainer.step(state)
    loss.block_until_ready()
    assert trainer.traces == 1
    return compile_s, steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ridge-closed-form", action="store_true",
                        help="also time ridge's closed_form (its backward at B=256 stalled for minutes on 2 cores)")
    args = parser.parse_args()
    print(f"B={args.batch} T=50 embed=40, 2 layers x 4 heads x key 20, {args.steps} timed steps")
    for layer, form in [("generated:linear", "closed_form"), ("generated:linear", "recurrent"),
                        ("generated:ridge", "recurrent")] + [("generated:ridge", "closed_form")] * args.ridge_closed_form:
        compile_s, sps = bench(config(layer, form, args.batch), args.steps)
        print(f"{layer:18s} {form:12s} compile {compile_s:5.1f} s   {sps:6.2f} steps/s")


if __name__ == "__main__":
    main()

"""Training: the loss falls, the step compiles once, resume is bit-identical, the CLI writes a run folder."""

import json
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

from mesagen.runtime.cli_train import main as cli
from mesagen.runtime.config import RunConfig, dump_config
from mesagen.runtime.train import Trainer, train

FAKE_LINEAR = str(Path(__file__).parent / "fixtures" / "fake_linear_layer.py")


def small_config(steps=6, **train_kw):
    return RunConfig.model_validate({
        "name": "tiny",
        "task": {"state_dim": 3, "seq_len": 9},
        "model": {"tokens": "constructed", "d_model": 12, "heads": 2, "d_k": 6, "blocks": [FAKE_LINEAR, "softmax"],
                  "clip_activations": 4.0, "init_std": 0.1},
        "train": {"steps": steps, "batch_size": 32, "schedule": {"kind": "warmup_cosine", "peak_lr": 3e-3,
                  "warmup_steps": 2}, "weight_decay": 0.1, "clip_grad_norm": 1.0, "log_every": 2,
                  "eval_every": 3, "checkpoint_every": 100, "progress": False, **train_kw},
        "eval": {"batch": 64, "tune_batch": 32},
    })


def test_loss_falls_and_step_compiles_once():
    trainer = Trainer(small_config(steps=100, schedule={"kind": "constant", "peak_lr": 1e-2}))
    state = trainer.initial_state()
    before = trainer.evaluate(state.model).mean()
    for _ in range(100):
        state, loss = trainer.step(state)
    assert trainer.traces == 1
    after = trainer.evaluate(state.model).mean()
    assert after < 0.6 * before, (before, after)


def test_resume_is_bit_identical(tmp_path):
    cfg = small_config(steps=6)
    full = train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "part", stop_at=3)
    resumed = train(cfg, tmp_path / "part", resume=True)
    assert resumed.step == full.step == 6
    for a, b in zip(jax.tree.leaves(eqx.filter((full.model, full.opt_state), eqx.is_array)),
                    jax.tree.leaves(eqx.filter((resumed.model, resumed.opt_state), eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _untimed(tmp_path / "full") == _untimed(tmp_path / "part")


TIMING_KEYS = ("wall_s", "steps_per_s", "tokens_per_s")


def _untimed(run_dir):
    """metrics.jsonl without its measured timings (the only fields that may differ between two runs)."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(k in r for r in records for k in TIMING_KEYS)
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_cli_train_eval(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    dump_config(small_config(steps=4), cfg_path)
    run = tmp_path / "run"
    assert cli(["train", str(cfg_path), "--out", str(run), "--steps", "3", "--seed", "7"]) == 0
    assert cli(["train", str(cfg_path), "--out", str(run)]) == 2          # refuses to overwrite a run
    assert cli(["train", "--resume", str(run), "--steps", "9"]) == 2      # resume uses the stored config only
    assert cli(["train", "--resume", str(run)]) == 0                       # complete run: re-evaluates
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()][-1] == 3
    assert cli(["eval", str(run)]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert set(result["per_t"]) == {"model", "gd1", "ridge", "predict_zero", "predict_last"}
    assert len(result["per_t"]["model"]) == 9
    for f in ("per_t.png", "training.png", "checkpoint.eqx", "config.yaml", "metrics.jsonl"):
        assert (run / f).stat().st_size > 0
    assert "ridge" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {tokens: standard, blocks: [nope], init_std: 0.1}\ntrain: {steps: 1, schedule: {peak_lr: 1}}\n")
    assert cli(["train", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "bad.yaml:1:36: model.blocks[0].layer" in capsys.readouterr().err
    assert cli(["eval", str(tmp_path / "missing")]) == 2


def test_numba_cpu_backend_trains_like_jax():
    """20 steps of the default config (scaled down in batch) on numba_cpu give the JAX backend's losses
    to float32 round-off: same data, same init, forward and backward through the Numba recurrence."""
    from mesagen.runtime.config import load_config

    base = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    losses = {}
    for backend in ("jax", "numba_cpu"):
        blocks = tuple(b.model_copy(update={"backend": backend}) for b in base.model.blocks)
        cfg = base.model_copy(update={
            "model": base.model.model_copy(update={"blocks": blocks}),
            "train": base.train.model_copy(update={
                "steps": 20, "batch_size": 16, "progress": False,
                "schedule": base.train.schedule.model_copy(update={"warmup_steps": 5})})})
        trainer = Trainer(cfg)
        state = trainer.initial_state()
        out = []
        for _ in range(20):
            state, loss = trainer.step(state)
            out.append(float(loss))
        losses[backend] = np.array(out)
    assert losses["jax"][-1] < losses["jax"][0]
    np.testing.assert_allclose(losses["numba_cpu"], losses["jax"], rtol=2e-5)

"""Run folders and the trainer's command line (issue 7 items 9, 11, 12, 13): atomic checkpoints, no hidden
ImportError, --overwrite that validates first and keeps the user's files, save-and-resume on SIGINT / SIGTERM,
--steps below the warm-up, every config mistake at once, the generated-layer search rule, provenance."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

from mesagen import cli as mesagen_cli
from mesagen.runtime import cli_train
from mesagen.runtime.config import ConfigError, RunConfig, dump_config, load_config
from mesagen.runtime.loader import (GENERATED_ENV, REPO_ROOT, LayerLoadError, generated_dirs, load_layer_module,
                                    resolve_layer_path, use_generated_dir)
from mesagen.runtime.train import (RUN_FILES, CheckpointError, Trainer, read_checkpoint_header, read_metrics,
                                   train)

FIX = Path(__file__).parent / "fixtures"
FAKE_LINEAR = str(FIX / "fake_linear_layer.py")


def tiny(steps=4, blocks=(FAKE_LINEAR, "softmax"), **train_kw) -> RunConfig:
    return RunConfig.model_validate({
        "name": "tiny", "task": {"state_dim": 3, "seq_len": 9},
        "model": {"tokens": "constructed", "d_model": 12, "heads": 2, "d_k": 4, "blocks": list(blocks),
                  "clip_activations": 4.0, "init_std": 0.1},
        "train": {"steps": steps, "batch_size": 8, "schedule": {"kind": "warmup_cosine", "peak_lr": 3e-3,
                  "warmup_steps": 1}, "log_every": 2, "eval_every": 2, "checkpoint_every": 2,
                  "progress": False, **train_kw},
        "eval": {"batch": 16, "tune_batch": 16},
    })


# -- item 9: one atomic checkpoint; no hidden ImportError ---------------------------------------------------

def test_checkpoint_is_one_file_and_a_failed_save_keeps_the_old_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    state = train(tiny(steps=4), run, stop_at=2)
    assert not (run / "checkpoint.json").exists() and not list(run.glob("*.tmp"))
    header = read_checkpoint_header(run / "checkpoint.eqx")
    assert header["step"] == 2 == state.step and "pending_losses" in header
    before = (run / "checkpoint.eqx").read_bytes()

    def dies_half_way(fh, tree):            # a kill while the leaves are written
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(eqx, "tree_serialise_leaves", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(steps=4), run, resume=True)
    monkeypatch.undo()
    assert (run / "checkpoint.eqx").read_bytes() == before    # the old checkpoint, whole
    resumed = train(tiny(steps=4), run, resume=True)
    full = train(tiny(steps=4), tmp_path / "full")
    for a, b in zip(jax.tree.leaves(eqx.filter(full.model, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(resumed.model, eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_foreign_checkpoint_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(steps=2), run)
    eqx.tree_serialise_leaves(run / "checkpoint.eqx", Trainer(tiny(steps=2)).initial_state().model)  # old format
    with pytest.raises(CheckpointError, match="not a mesagen checkpoint"):
        train(tiny(steps=2), run, resume=True)
    assert cli_train.main(["eval", str(run)]) == 2
    assert "not a mesagen checkpoint" in capsys.readouterr().err


def test_cli_does_not_hide_an_import_error_of_the_runtime(monkeypatch):
    monkeypatch.setitem(sys.modules, "mesagen.runtime.cli_train", None)   # a bug there: import fails
    with pytest.raises(ImportError):
        mesagen_cli.parser()


def test_missing_runtime_package_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.delitem(sys.modules, "mesagen.runtime.train")
    monkeypatch.setitem(sys.modules, "optax", None)                        # as if optax were not installed
    cfg = tmp_path / "c.yaml"
    dump_config(tiny(), cfg)
    assert mesagen_cli.main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "pip install 'mesagen'" in capsys.readouterr().err and "'optax'" in cli_train.missing_dependency(
        ModuleNotFoundError("No module named 'optax'", name="optax"))
    monkeypatch.setitem(sys.modules, "mesagen.runtime.train", None)        # a bug, not a missing package
    with pytest.raises(ImportError):
        mesagen_cli.main(["train", str(cfg), "--out", str(tmp_path / "r")])


# -- item 11: --overwrite validates first and never deletes a file mesagen did not write ---------------------

def test_overwrite_validates_first_and_keeps_user_files(tmp_path, capsys):
    run = tmp_path / "run"
    good = tmp_path / "good.yaml"
    dump_config(tiny(steps=2), good)
    assert cli_train.main(["train", str(good), "--out", str(run)]) == 0
    (run / "notes.txt").write_text("mine")
    (run / "analysis").mkdir()
    (run / "analysis" / "plot.py").write_text("# mine")
    old = {n: (run / n).read_bytes() for n in ("checkpoint.eqx", "metrics.jsonl", "config.yaml")}
    bad = tmp_path / "bad.yaml"
    dump_config(tiny(steps=2, blocks=("generated:never_built", "softmax")), bad)
    capsys.readouterr()
    assert cli_train.main(["train", str(bad), "--out", str(run), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "generated:never_built" in err and "searched" in err
    assert {n: (run / n).read_bytes() for n in old} == old                 # the old run is untouched
    assert cli_train.main(["train", str(good), "--out", str(run), "--overwrite", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "kept files mesagen did not write: analysis, notes.txt" in out
    assert (run / "notes.txt").read_text() == "mine" and (run / "analysis" / "plot.py").read_text() == "# mine"
    assert read_checkpoint_header(run / "checkpoint.eqx")["step"] == 3
    assert set(RUN_FILES) >= {p.name for p in run.iterdir()} - {"notes.txt", "analysis"}


# -- item 12: signals, --steps below the warm-up, all config mistakes, the generated search rule -------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_prints_the_resume_command(tmp_path, signum):
    run = tmp_path / "run dir"                                             # a space: the command is quoted
    cfg = tmp_path / "long.yaml"
    dump_config(tiny(steps=100_000, log_every=1, eval_every=100_000, checkpoint_every=100_000), cfg)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "mesagen.cli", "train", str(cfg), "--out", str(run)],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not any("train_loss" in r for r in read_metrics(run)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, err
    assert f"resume with: mesagen train --resume '{run}'" in err, err
    step = read_checkpoint_header(run / "checkpoint.eqx")["step"]
    assert 1 <= step == max(r["step"] for r in read_metrics(run)) < 100_000
    state = train(load_config(run / "config.yaml"), run, resume=True, stop_at=step + 1)
    assert state.step == step + 1


def test_steps_below_the_warmup_scale_the_schedule(tmp_path, capsys):
    base = load_config(REPO_ROOT / "configs" / "default.yaml")             # warm-up 150 of 1500 steps
    small = base.with_overrides(steps=10)
    assert (small.train.steps, small.train.schedule.warmup_steps) == (10, 1)
    assert base.with_overrides(steps=1).train.schedule.warmup_steps == 0
    assert base.with_overrides(steps=3000).train.schedule.warmup_steps == 300
    assert base.schedule_change(small) == ("train.steps 1500 -> 10: schedule scaled in proportion "
                                           "(warmup_steps 150 -> 1)")
    cfg = tmp_path / "c.yaml"
    dump_config(tiny(steps=40, schedule={"kind": "warmup_cosine", "peak_lr": 1e-3, "warmup_steps": 20,
                                         "decay_steps": 40}), cfg)
    assert cli_train.main(["train", str(cfg), "--out", str(tmp_path / "r"), "--steps", "2"]) == 0
    assert "warmup_steps 20 -> 1, decay_steps 40 -> 2" in capsys.readouterr().out
    stored = load_config(tmp_path / "r" / "config.yaml").train
    assert (stored.steps, stored.schedule.warmup_steps, stored.schedule.decay_steps) == (2, 1, 2)


def test_config_reports_every_mistake_with_line_and_column(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text(textwrap.dedent("""\
        name: x
        model:
          tokens: constructd
          heads: -1
          blocks: [nope]
          init_std: 0.1
        train:
          steps: 10
          schedule: {peak_lr: 1.0e-3, kind: warmup_cosin}
          bogus: 3
        """))
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.lines == [
        f"{p}:3:3: model.tokens: Input should be 'constructed', 'standard' or 'bytes' (got 'constructd')",
        f"{p}:4:3: model.heads: Input should be greater than or equal to 1 (got -1)",
        f"{p}:5:12: model.blocks[0].layer: expected 'softmax', 'generated:NAME' or a path to a .py file "
        "(got 'nope')",
        f"{p}:9:31: train.schedule.kind: Input should be 'constant' or 'warmup_cosine' (got 'warmup_cosin')",
        f"{p}:10:3: train.bogus: unknown key 'bogus'"]
    assert cli_train.main(["train", str(p)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"mesagen train: {line}" for line in info.value.lines]
    p.write_text(textwrap.dedent("""\
        model: {tokens: constructed, d_model: 12, blocks: [softmax], init_std: 0.1}
        train:
          steps: 10
          schedule: {peak_lr: 1.0e-3, kind: warmup_cosine, warmup_steps: 20}
        """))
    with pytest.raises(ConfigError) as info:                               # cross-field rules: all, located
        load_config(p)
    assert [line.split(": ")[0:2] for line in info.value.lines] == [
        [f"{p}:1:30", "model.d_model"], [f"{p}:4:52", "train.schedule.warmup_steps"]]


def test_generated_layer_search_rule(tmp_path, monkeypatch):
    monkeypatch.delenv(GENERATED_ENV, raising=False)
    local = tmp_path / "work" / "generated" / "mine"
    local.mkdir(parents=True)
    shutil.copy(FAKE_LINEAR, local / "layer_jax.py")
    monkeypatch.chdir(tmp_path / "work")
    checkout = (REPO_ROOT / "generated").resolve()
    assert generated_dirs() == [(tmp_path / "work" / "generated").resolve(), checkout]
    assert resolve_layer_path("generated:mine") == (local / "layer_jax.py").resolve()     # ./generated first
    assert resolve_layer_path("generated:ridge") == checkout / "ridge" / "layer_jax.py"   # then the checkout
    with pytest.raises(LayerLoadError) as info:
        resolve_layer_path("generated:absent")
    assert str(tmp_path / "work" / "generated" / "absent") in str(info.value)
    assert str(checkout / "absent") in str(info.value)
    other = tmp_path / "elsewhere"
    (other / "ridge").mkdir(parents=True)
    shutil.copy(FAKE_LINEAR, other / "ridge" / "layer_jax.py")
    monkeypatch.setenv(GENERATED_ENV, str(other))                          # the environment: only that folder
    assert generated_dirs() == [other.resolve()]
    assert resolve_layer_path("generated:ridge") == (other / "ridge" / "layer_jax.py").resolve()
    with pytest.raises(LayerLoadError, match="searched"):
        resolve_layer_path("generated:mine")
    with use_generated_dir(tmp_path / "work" / "generated"):                # --generated beats the environment
        assert resolve_layer_path("generated:mine") == (local / "layer_jax.py").resolve()
    assert generated_dirs() == [other.resolve()]


# -- item 13: provenance -------------------------------------------------------------------------------------

def test_eval_and_metrics_record_provenance(tmp_path, monkeypatch):
    titles = []
    import mesagen.runtime.evaluate as evaluate

    for name in ("plot_per_t", "plot_training"):
        real = getattr(evaluate, name)
        monkeypatch.setattr(evaluate, name, lambda *a, _real=real, **k: (titles.append(k["title"]), _real(*a, **k)))
    cfg = tiny(steps=4, blocks=({"layer": "generated:ridge", "form": "closed_form"}, "softmax"))
    run = tmp_path / "run"
    state = train(cfg, run)
    ridge = load_layer_module(resolve_layer_path("generated:ridge"))
    lam = np.asarray(state.model.blocks[0].attn.params()["lam"], np.float64)
    result = json.loads((run / "eval.json").read_text())
    assert result["params"] == {"block_0": {"lam": lam.tolist()}} and len(lam) == 2
    assert not np.allclose(lam, 1.0)                                       # learned, not the initial value
    assert result["layers"]["block_0"]["spec_sha256"] == ridge.SPEC_SHA256
    assert (result["steps_trained"], result["batch_size"], result["tokens_trained"]) == (4, 8, 4 * 8 * 9)
    assert result["depth"] == 2 and "generated:ridge (closed_form) -> softmax" in result["model"]
    assert result["mesagen_version"] and result["jax_version"] == jax.__version__
    assert result["wall_s"] > 0 and result["steps_per_s"] > 0
    assert result["tokens_per_s"] == pytest.approx(result["steps_per_s"] * 8 * 9)
    records = read_metrics(run)
    start = records[0]
    assert start["event"] == "start" and start["layers"]["block_0"]["spec_sha256"] == ridge.SPEC_SHA256
    assert start["params"]["block_0"]["lam"] == pytest.approx([1.0, 1.0], rel=1e-5)
    logs = [r for r in records if "train_loss" in r]
    assert all(r["steps_per_s"] > 0 and r["tokens_per_s"] > 0 and r["wall_s"] > 0 for r in logs)
    assert [r["wall_s"] for r in logs] == sorted(r["wall_s"] for r in logs)
    assert [r for r in records if "eval_loss" in r][-1]["params"] == result["params"]
    assert len(titles) == 2 and all("generated:ridge" in t and "2 layers" in t and "λ=[" in t for t in titles)
    assert f"{lam[0]:.3g}" in titles[0]
    again = cli_train.main(["eval", str(run)])                             # mesagen eval keeps the provenance
    assert again == 0 and json.loads((run / "eval.json").read_text())["steps_trained"] == 4

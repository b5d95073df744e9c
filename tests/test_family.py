"""The family comparison of ``mesagen reproduce`` (claim ``family``): its members come from specs/ (and the
nothing else), every member's config is the mesa config with the layer swapped, every
member trains (its gates / β / λ get gradients), and the row, table and figure are built from the runs.

Small sizes throughout (state dim 2, T = 6, 2 heads of key size 3): ~20-40 s on one core, compilation of the
fourteen one-step trainers dominating.
"""

from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from mesagen.runtime import reproduce as rp
from mesagen.runtime.config import RunConfig
from mesagen.runtime.loader import load_layer_module, resolve_layer_path
from mesagen.runtime.train import Trainer

TINY = rp.Budget(1, 4, 8, 8)


def test_family_is_every_spec(tmp_path):
    assert rp.FAMILY == tuple(sorted(p.stem for p in rp.SPEC_DIR.glob("*.yaml")))
    assert {"ridge", "linear", "mesanet", "softmax"} <= set(rp.FAMILY)
    # a spec that lands in specs/ joins the family
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    for name in ("softmax", "ridge"):
        shutil.copy(rp.SPEC_DIR / f"{name}.yaml", spec_dir / f"{name}.yaml")
    assert rp.family_names(spec_dir) == ("ridge", "softmax")
    # every family run -- every layer at every learning-rate scale -- has the one family budget
    names = [r for n in rp.FAMILY for r in rp.family_run_names(n)]
    assert len(names) == len(rp.FAMILY) * len(rp.FAMILY_LR_SCALES) >= 2 * len(rp.FAMILY)
    assert {rp.FULL[r] for r in names} == {rp.FAMILY_BUDGET}


def test_family_lr_scale_multiplies_the_base_schedule_only():
    base = rp.run_config("family_ridge", rp.FAMILY_BUDGET)
    for scale, name in zip(rp.FAMILY_LR_SCALES, rp.family_run_names("ridge")):
        cfg = rp.run_config(name, rp.FAMILY_BUDGET)
        assert cfg.name == ("family_ridge" if scale == 1 else f"family_ridge_lr{scale:g}")     # its own folder
        assert cfg.train.schedule.peak_lr == pytest.approx(scale * base.train.schedule.peak_lr)
        assert cfg.train.schedule.end_lr == pytest.approx(scale * base.train.schedule.end_lr)
        assert cfg.train.schedule.warmup_steps == base.train.schedule.warmup_steps
        strip = lambda c: {**c.model_dump(), "name": None, "description": None,  # noqa: E731
                           "train": {**c.model_dump()["train"], "schedule": None}}
        assert strip(cfg) == strip(base)


def test_family_config_is_the_base_with_the_layer_swapped(tmp_path):
    base = rp.run_config(rp.FAMILY_BASE, rp.FAMILY_BUDGET).model_dump()
    for name in rp.FAMILY:
        cfg = rp.run_config(f"family_{name}", rp.FAMILY_BUDGET)
        d = cfg.model_dump()
        layer = d["model"]["blocks"][0]["layer"]
        module = load_layer_module(resolve_layer_path(layer))
        assert module.SPEC_NAME == name
        assert cfg.name == f"family_{name}" and len(cfg.model.blocks) == 1
        # λ's learning-rate multiplier only where the layer has a λ (else the trainer refuses the config)
        assert cfg.train.param_lr_scale == ({"lam": 100.0} if "lam" in module.PARAMS else {})
        for section in ("task", "eval"):
            assert d[section] == base[section], (name, section)
        for key in ("steps", "batch_size", "seed", "schedule", "weight_decay", "clip_grad_norm"):
            assert d["train"][key] == base["train"][key], (name, key)
        same = {k: v for k, v in d["model"].items() if k != "blocks"}
        assert same == {k: v for k, v in base["model"].items() if k != "blocks"}, name
    with pytest.raises(ValueError, match="no_such_layer"):
        rp.family_config("no_such_layer", TINY)


def _tiny(name: str) -> RunConfig:
    """``family_NAME`` at state dim 2, T = 6, 2 heads of key size 3 (d_model = 4 D for constructed tokens)."""
    d = rp.family_config(name, TINY).model_dump()
    d["task"].update(state_dim=2, seq_len=6)
    d["model"].update(d_model=8, heads=2, d_k=3)
    return RunConfig.model_validate(d)


@pytest.fixture(scope="module")
def stepped():
    """name -> (trainer, model before, model after one step, loss), every family layer at tiny sizes."""
    out = {}
    for name in rp.FAMILY:
        trainer = Trainer(_tiny(name))
        state = trainer.initial_state()
        new, loss = trainer.step(state)
        out[name] = (trainer, state.model, new.model, float(loss))
    return out


@pytest.mark.parametrize("name", rp.FAMILY)
def test_every_family_layer_trains_its_projections_inputs_and_parameters(stepped, name):
    _, before, after, loss = stepped[name]
    assert np.isfinite(loss) and loss > 0
    b, a = before.blocks[0].attn, after.blocks[0].attn
    moved = lambda x, y: float(jnp.max(jnp.abs(x - y))) > 0  # noqa: E731
    assert moved(b.wq, a.wq) and moved(b.wv, a.wv) and moved(b.wo, a.wo)
    for n in b.layer.INPUTS:                 # gates, β: projected from the block input and trained
        assert moved(b.input_w[n], a.input_w[n]), n
    for n in b.layer.PARAMS:                 # λ, η, γ: trained (λ at 100× the rate)
        assert moved(b.raw_params[n], a.raw_params[n]), n


def test_layer_inputs_and_throughput_of_any_layer():
    for name in ("linear", "kda", "mesanet"):
        layer = load_layer_module(resolve_layer_path(f"generated:{name}"))
        q, k, v, params, inputs = rp.layer_inputs(layer, 2, 5, 2, 3, 4)
        assert set(params) == set(layer.PARAMS) and set(inputs) == set(layer.INPUTS)
        assert q.shape == k.shape == (2, 5, 2, 3) and v.shape == (2, 5, 2, 4) and q.dtype == jnp.float32
        if "g" in inputs:
            assert np.all(np.asarray(inputs["g"]) < 0)           # log-space gates
        assert rp.forward_tokens_per_s(layer, shape=(2, 5, 2, 3), repeats=1) > 0
    with pytest.raises(ValueError, match="offers"):
        rp.forward_tokens_per_s(layer, "no_form", (2, 5, 2, 3), 1)


def _fake_run(trainer, model, scale: float) -> rp.Run:
    """A Run whose held-out curves are synthetic: the model's = ``scale`` × ridge's."""
    t = trainer.config.task.seq_len
    ridge = np.linspace(1.0, 0.1, t)
    per_t = {"model": scale * ridge, "gd1": 3 * ridge, "ridge": ridge, "predict_zero": np.full(t, 4.0)}
    result = {"per_t": {k: v.tolist() for k, v in per_t.items()}, "mean": {k: float(np.mean(v)) for k, v in per_t.items()},
              "params": {"block_0": {"lam": [[0.5, 1.0, 2.0], [1.0, 1.0, 1.0]]}}, "steps_per_s": 3.0}
    return rp.Run(trainer.config, trainer, model, result, False)


def test_family_row_ranks_the_layers_and_writes_table_and_figure(stepped, tmp_path):
    runs = {f"family_{n}": _fake_run(stepped[n][0], stepped[n][2], s)
            for n, s in (("linear", 2.5), ("ridge", 1.1), ("mesanet", 1.3))}
    row = rp.family_row(runs, tmp_path, shape=(2, 5, 2, 3), repeats=1, log=lambda *a: None)
    assert row.status == "pass" and "ranks 1 of 3" in row.note
    assert (tmp_path / "family_per_t.png").is_file() and row.figures == ["family_per_t.png"]
    table = [line for line in row.sections if line.startswith("| ")]
    assert len({line.count("|") for line in row.sections if line.startswith("|")}) == 1     # one column count
    assert [line.split("|")[1].strip() for line in table[1:4]] == ["ridge", "mesanet", "linear"]
    assert "0.5…2" in table[2]                                   # per-channel λ shown as a range per head
    ratio = float(table[3].split("|")[4])                        # linear: × ridge
    assert ratio == pytest.approx(2.5, abs=1e-3)
    runs["family_linear"] = _fake_run(stepped["linear"][0], stepped["linear"][2], 0.9)
    row = rp.family_row(runs, tmp_path, shape=(2, 5, 2, 3), repeats=1, log=lambda *a: None)
    assert row.status == "fail" and "lowest: linear" in row.note
    # with the learning rates tried, the table gains a column naming each one's final training loss
    tried = {n: {1.0: (0.5, 1.0), 10.0: (0.25, 0.9)} for n in runs}
    row = rp.family_row(runs, tmp_path, shape=(2, 5, 2, 3), repeats=1, log=lambda *a: None, lr_tried=tried)
    assert len({line.count("|") for line in row.sections if line.startswith("|")}) == 1
    assert "×1: 0.5, ×10: 0.25" in row.sections[-4] and "chosen per layer by final training loss" in row.setting


def test_family_picks_each_layers_lr_by_final_training_loss(stepped, tmp_path, monkeypatch):
    # the chosen run is the one whose *training* loss ends lower, even where its held-out mean is higher
    def fake(name, scale, train_loss, held_out):
        run = _fake_run(stepped[name][0], stepped[name][2], held_out)
        run.run_dir = tmp_path / f"{name}_{scale:g}"
        run.run_dir.mkdir()
        (run.run_dir / "metrics.jsonl").write_text("".join(
            f'{{"step": {s}, "train_loss": {v}}}\n' for s, v in ((10, 9.0), (20, train_loss), (30, train_loss))))
        return run
    runs = {"family_ridge": fake("ridge", 1, 0.3, 1.0), "family_ridge@lr10": fake("ridge", 10, 0.5, 0.8),
            "family_linear": fake("linear", 1, 0.9, 2.0), "family_linear@lr10": fake("linear", 10, 0.7, 2.2)}
    assert runs["family_ridge"].final_train_loss(last=2) == pytest.approx(0.3)
    need = lambda n: runs.get(n)  # noqa: E731
    seen = {}
    monkeypatch.setattr(rp, "family_row", lambda chosen, out, log, lr_tried: seen.update(chosen=chosen, tried=lr_tried))
    rp._family(need, tmp_path, log=lambda *a: None)
    assert seen["chosen"]["family_ridge"] is runs["family_ridge"]
    assert seen["chosen"]["family_linear"] is runs["family_linear@lr10"]
    assert seen["tried"]["family_linear"][10.0] == (pytest.approx((9.0 + 0.7 + 0.7) / 3),
                                                    runs["family_linear@lr10"].mean())


def test_per_channel_parameters_are_shown_per_head(tmp_path):
    # MesaNet's λ has shape (H, K): the evaluation line and the training figure show each head's range (the
    # evaluation line crashed on it before; the figure drew one legend entry per channel)
    from mesagen.runtime.evaluate import params_line
    from mesagen.runtime.figures import plot_training
    params = {"block_0": {"lam": [[0.5, 2.0, 1.0], [1.0, 1.0, 3.0]], "eta": [0.25, 0.5]}}
    assert params_line(params) == "learned block_0 λ=[0.5…2, 1…3]; block_0 η=[0.25, 0.5]"
    metrics = [{"step": s, "train_loss": 1.0 / (s + 1), "params": params} for s in (0, 10)]
    plot_training(metrics, tmp_path / "training.png")
    assert (tmp_path / "training.png").stat().st_size > 0

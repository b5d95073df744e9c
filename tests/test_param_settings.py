"""Per-parameter trainer settings of spec parameters (issue 11 item 2): ``model.param_init`` (initial value in
constrained space) and ``train.param_lr_scale`` (learning-rate multiplier through ``optax.masked``)."""

import re
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from mesagen.runtime.config import ConfigError, RunConfig, load_config
from mesagen.runtime.loader import LayerLoadError
from mesagen.runtime.model import Model
from mesagen.runtime.train import Trainer, make_optimizer, make_schedule

FAKE_RIDGE = str(Path(__file__).parent / "fixtures" / "fake_ridge_layer.py")


def _cfg(model=None, train=None):
    return RunConfig.model_validate({
        "task": {"state_dim": 3, "seq_len": 7},
        "model": {"tokens": "constructed", "d_model": 12, "heads": 2, "d_k": 4, "blocks": [FAKE_RIDGE],
                  "clip_activations": 4.0, "init_std": 0.1, **(model or {})},
        "train": {"steps": 5, "batch_size": 8, "schedule": {"kind": "constant", "peak_lr": 1e-2},
                  "weight_decay": 0.1, "progress": False, **(train or {})},
        "eval": {"batch": 8, "tune_batch": 8}})


@pytest.mark.parametrize("space", ["log", "softplus"])
def test_param_init_lands_in_constrained_space(space):
    cfg = _cfg({"param_init": {"lam": 0.01}, "positive_space": space})
    attn = Model(cfg.model, 3, key=jax.random.PRNGKey(0)).blocks[0].attn
    np.testing.assert_allclose(attn.params()["lam"], [0.01, 0.01], rtol=1e-5)
    if space == "log":
        np.testing.assert_allclose(attn.raw_params["lam"], np.log(0.01), rtol=1e-6)
    default = Model(_cfg({"positive_space": space}).model, 3, key=jax.random.PRNGKey(0)).blocks[0].attn
    np.testing.assert_allclose(default.params()["lam"], 1.0, rtol=1e-6)      # the spec's init without the setting


def test_param_init_outside_domain_and_unknown_names():
    with pytest.raises(LayerLoadError, match=r"model\.param_init\.lam: -1\.0 is outside the domain 'positive'"):
        Model(_cfg({"param_init": {"lam": -1.0}}).model, 3, key=jax.random.PRNGKey(0))
    with pytest.raises(LayerLoadError, match=r"model\.param_init names mu, which no layer"):
        Model(_cfg({"param_init": {"mu": 1.0}}).model, 3, key=jax.random.PRNGKey(0))
    with pytest.raises(LayerLoadError, match=r"train\.param_lr_scale names mu, which no layer"):
        Trainer(_cfg(train={"param_lr_scale": {"mu": 2.0}})).initial_state()


def test_lr_scale_moves_the_parameter_n_times_further():
    """One Adam step moves a raw value by ~lr; with ``{lam: 7}`` λ's raw value moves exactly 7x as far (same
    gradient, same data), and every other leaf moves exactly as without the setting."""
    plain, scaled = Trainer(_cfg()), Trainer(_cfg(train={"param_lr_scale": {"lam": 7.0}}))
    s0 = plain.initial_state()
    a, _ = plain.step(s0)
    b, _ = scaled.step(scaled.initial_state())
    raw0 = np.asarray(s0.model.blocks[0].attn.raw_params["lam"])
    da = np.asarray(a.model.blocks[0].attn.raw_params["lam"]) - raw0
    db = np.asarray(b.model.blocks[0].attn.raw_params["lam"]) - raw0
    assert np.all(np.abs(da) > 0.5e-2)                               # Adam's first step: about lr per entry
    np.testing.assert_allclose(db, 7.0 * da, rtol=1e-4)
    for name in ("wq", "wk", "wv", "wo"):
        np.testing.assert_array_equal(getattr(a.model.blocks[0].attn, name), getattr(b.model.blocks[0].attn, name))
    for _ in range(2):                                               # later steps: the state carries the scale too
        a, _ = plain.step(a)
        b, _ = scaled.step(b)
    assert plain.traces == scaled.traces == 1


def test_without_lr_scale_the_optimizer_is_plain_adamw():
    """No ``param_lr_scale``: the optimiser state has AdamW's structure (checkpoints of older runs still load)."""
    cfg = _cfg()
    params = {"w": np.ones((2, 2), np.float32)}
    plain = optax.adamw(make_schedule(cfg.train.schedule, 5), weight_decay=0.1,
                        mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    assert (jax.tree.structure(make_optimizer(cfg.train).init(params))
            == jax.tree.structure(plain.init(params)))


@pytest.mark.parametrize("section,entry,reason", [
    ("train", "param_lr_scale: {lam: -3}", "greater than 0"),
    ("train", "param_lr_scale: {lam: 0}", "greater than 0"),
    ("train", "param_lr_scale: {lam: fast}", "valid number"),
    ("train", "param_lr_scale: {lam: .inf}", "finite number"),
    ("model", "param_init: {lam: .nan}", "finite number"),
    ("model", "param_init: {lam: small}", "valid number"),
])
def test_bad_values_are_located_config_errors(tmp_path, section, entry, reason):
    field = entry.split(":")[0]
    text = (f"task: {{state_dim: 3, seq_len: 7}}\n"
            f"model:\n  tokens: constructed\n  d_model: 12\n  blocks: [{FAKE_RIDGE}]\n  init_std: 0.1\n"
            + (f"  {entry}\n" if section == "model" else "")
            + "train:\n  steps: 5\n  schedule: {peak_lr: 0.01}\n"
            + (f"  {entry}\n" if section == "train" else ""))
    path = tmp_path / "c.yaml"
    path.write_text(text)
    line = text.splitlines().index(f"  {entry}") + 1
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (msg,) = info.value.lines
    assert re.match(rf"{re.escape(str(path))}:{line}:\d+: {section}\.{field}\.lam: ", msg), msg
    assert reason in msg, msg

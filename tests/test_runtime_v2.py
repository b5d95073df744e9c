"""Trainer support for contract-v2 layers: per-token input shapes and domains, gate bias, scale, the
reparameterisation of positive parameters (log / softplus), and the v2 configs (tests/fixtures/fake_v2_layer.py
stands in for the generated modules until they exist)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesagen.runtime.config import RunConfig, dump_config, load_config
from mesagen.runtime.layers import GATE_BIAS_INIT, GeneratedAttention, constrain, input_map, unconstrain
from mesagen.runtime.loader import REPO_ROOT, LayerLoadError, load_layer_module
from mesagen.runtime.model import Model
from mesagen.runtime.train import Trainer, learned_params

FIX = Path(__file__).parent / "fixtures"
FAKE_V2, FAKE_DELTA, FAKE_RIDGE = (str(FIX / f) for f in ("fake_v2_layer.py", "fake_delta_layer.py",
                                                           "fake_ridge_layer.py"))
V2_LAYERS = ("simple_gla", "retention", "gla", "gated_delta", "kda")


def _attn(path, **kw):
    layer = load_layer_module(path)
    return layer, GeneratedAttention(layer, 12, 2, 5, 7, key=jax.random.PRNGKey(0), init_std=0.1, **kw)


def test_wrapper_passes_declared_shapes_and_domains():
    """g [B,T,H,K] ≤ 0, beta [B,T,H,V] in [0,1], a [B,T,H] in (0,1], params in their domains, scale=None."""
    layer, attn = _attn(FAKE_V2)
    layer.CALLS.clear()
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (3, 11, 12))
    y = attn(x)
    assert y.shape == (3, 11, 12) and np.all(np.isfinite(y))
    (call,) = layer.CALLS
    assert call["scale"] is None                                  # None: the module's DEFAULT_SCALE
    g, beta, a = (call["inputs"][n] for n in ("g", "beta", "a"))
    assert g.shape == (3, 11, 2, 5) and beta.shape == (3, 11, 2, 7) and a.shape == (3, 11, 2)
    assert np.all(g <= 0) and np.all((beta >= 0) & (beta <= 1)) and np.all((a > 0) & (a <= 1))
    np.testing.assert_allclose(call["params"]["gamma"], 0.96875, rtol=1e-6)
    np.testing.assert_allclose(call["params"]["c"], -0.5, rtol=1e-6)
    assert attn.input_w["g"].shape == (12, 2, 5) and attn.input_b["g"].shape == (2, 5)
    assert attn.input_w["beta"].shape == (12, 2, 7) and attn.input_w["a"].shape == (12, 2)


def test_gate_bias_starts_near_one():
    """Gates (log nonpositive, linear positive_unit_interval) start at sigmoid(+3) ≈ 0.953; β at 0.5."""
    layer, attn = _attn(FAKE_V2)
    assert GATE_BIAS_INIT == 3.0
    ins = attn.inputs(jnp.zeros((1, 4, 12)))
    np.testing.assert_allclose(np.exp(ins["g"]), jax.nn.sigmoid(3.0), rtol=1e-6)
    np.testing.assert_allclose(ins["a"], jax.nn.sigmoid(3.0), rtol=1e-6)
    np.testing.assert_allclose(ins["beta"], 0.5)
    assert 0.94 < float(jax.nn.sigmoid(3.0)) < 0.96


def test_scale_only_for_modules_with_default_scale():
    layer, attn = _attn(FAKE_V2, scale=0.25)
    layer.CALLS.clear()
    attn(jnp.ones((1, 3, 12)))
    assert layer.CALLS[0]["scale"] == 0.25
    _, old = _attn(FAKE_DELTA)                          # v1: forward takes no scale; calling must not pass one
    assert old(jnp.ones((1, 3, 12))).shape == (1, 3, 12)
    with pytest.raises(LayerLoadError, match="takes no scale"):
        _attn(FAKE_DELTA, scale=0.5)


def test_unsupported_input_shape_and_space(tmp_path):
    src = Path(FAKE_V2).read_text()
    bad = tmp_path / "bad_shape.py"
    bad.write_text(src.replace('"shape": ("B", "T", "H", "V")', '"shape": ("B", "T", "K")'))
    with pytest.raises(LayerLoadError, match="input 'beta' has shape"):
        _attn(str(bad))
    with pytest.raises(LayerLoadError, match="unsupported input space"):
        input_map(jnp.zeros(3), "real", "log")


@pytest.mark.parametrize("domain,space,value", [
    ("real", "log", -0.3), ("positive", "softplus", 0.01), ("positive", "softplus", 1.0),
    ("positive", "log", 1e-3), ("positive", "log", 7.0), ("unit_interval", "log", 0.2),
    ("positive_unit_interval", "log", 0.96875), ("nonpositive", "log", -0.5), ("nonpositive", "log", -1e-3)])
def test_reparameterisation_roundtrip_all_domains(domain, space, value):
    raw = unconstrain(jnp.float32(value), domain, space)
    np.testing.assert_allclose(constrain(raw, domain, space), value, rtol=1e-5)


def test_reparameterisation_refuses_unreachable_values():
    for domain, value in (("positive", 0.0), ("positive_unit_interval", 1.0), ("nonpositive", 0.0)):
        with pytest.raises(LayerLoadError):
            unconstrain(jnp.float32(value), domain)
    with pytest.raises(LayerLoadError, match="unknown space"):
        constrain(jnp.float32(0.0), "positive", "sqrt")


def test_positive_space_choice():
    """λ = exp(raw) under ``log`` (the default), softplus(raw) under ``softplus``; per-parameter override."""
    _, attn = _attn(FAKE_RIDGE)
    assert dict(attn.param_space) == {"lam": "log"} and float(attn.raw_params["lam"][0]) == 0.0
    _, sp = _attn(FAKE_RIDGE, positive_space="softplus")
    np.testing.assert_allclose(sp.raw_params["lam"], np.log(np.expm1(1.0)), rtol=1e-6)
    _, over = _attn(FAKE_RIDGE, positive_space="softplus", param_space={"lam": "log"})
    assert dict(over.param_space) == {"lam": "log"}
    np.testing.assert_allclose(over.params()["lam"], 1.0)
    with pytest.raises(LayerLoadError, match="only positive parameters"):
        _attn(FAKE_V2, param_space={"gamma": "log"})


def _tiny(blocks, **model):
    return RunConfig.model_validate({
        "task": {"state_dim": 3, "seq_len": 9},
        "model": {"tokens": "constructed", "d_model": 12, "heads": 2, "d_k": 5, "blocks": blocks,
                  "clip_activations": 4.0, "init_std": 0.1, **model},
        "train": {"steps": 30, "batch_size": 16, "schedule": {"kind": "constant", "peak_lr": 1e-2},
                  "progress": False},
        "eval": {"batch": 32, "tune_batch": 16}})


def test_param_space_names_are_checked():
    with pytest.raises(LayerLoadError, match="names mu"):
        Model(_tiny([FAKE_RIDGE], param_space={"mu": "log"}).model, 3, key=jax.random.PRNGKey(0))


def test_v2_layer_trains_and_every_input_learns():
    """A model with the fake v2 layer: the loss falls, every input projection, bias and parameter gets a gradient,
    and the parameters stay in their domains."""
    trainer = Trainer(_tiny([FAKE_V2]))
    state = trainer.initial_state()
    before = trainer.evaluate(state.model).mean()
    attn0 = state.model.blocks[0].attn
    for _ in range(30):
        state, loss = trainer.step(state)
    attn = state.model.blocks[0].attn
    assert np.isfinite(float(loss)) and trainer.evaluate(state.model).mean() < before
    for n in ("g", "beta", "a"):
        assert not np.allclose(attn.input_w[n], attn0.input_w[n]) and not np.allclose(attn.input_b[n], attn0.input_b[n])
    p = learned_params(state.model)["block_0"]
    assert all(0 < x < 1 for x in p["gamma"]) and all(x < 0 for x in p["c"]) and p["gamma"] != [0.96875] * 2


def test_stored_config_without_positive_space_reads_as_softplus(tmp_path):
    """A run folder written before model.positive_space existed trained λ through softplus: resume and eval keep
    that meaning of the checkpoint's raw values; a new config (and a new run's config.yaml) defaults to log."""
    cfg = _tiny([FAKE_RIDGE])
    assert cfg.model.positive_space == "log"
    path = tmp_path / "config.yaml"
    dump_config(cfg, path)
    assert load_config(path, stored=True).model.positive_space == "log"       # written explicitly now
    path.write_text("\n".join(line for line in path.read_text().splitlines() if "positive_space" not in line))
    assert load_config(path).model.positive_space == "log"
    assert load_config(path, stored=True).model.positive_space == "softplus"


@pytest.mark.parametrize("name", V2_LAYERS)
def test_v2_configs(name, tmp_path, monkeypatch):
    """configs/NAME_1layer.yaml is configs/mesa_1layer.yaml with the layer swapped (and without the mesa layer's
    λ learning-rate multiplier); without generated/NAME/ the model build names the layer and the folders
    searched."""
    cfg = load_config(REPO_ROOT / "configs" / f"{name}_1layer.yaml")
    mesa = load_config(REPO_ROOT / "configs" / "mesa_1layer.yaml")
    assert [b.layer for b in cfg.model.blocks] == [f"generated:{name}"]
    assert mesa.train.param_lr_scale == {"lam": 100.0} and cfg.train.param_lr_scale == {}
    assert cfg.task == mesa.task and cfg.train == mesa.train.model_copy(update={"param_lr_scale": {}})
    assert cfg.model.model_copy(update={"blocks": mesa.model.blocks}) == mesa.model
    monkeypatch.setenv("MESAGEN_GENERATED", str(tmp_path))
    with pytest.raises(LayerLoadError, match=f"layer 'generated:{name}' not found; searched {tmp_path}"):
        Model(cfg.model, cfg.task.observed_dim, key=jax.random.PRNGKey(0))

"""Loader checks, reparameterisation, config validation, and model shapes for every layer kind."""

import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesagen.runtime.config import ConfigError, ModelConfig, load_config
from mesagen.runtime.layers import constrain, unconstrain
from mesagen.runtime.loader import REPO_ROOT, LayerLoadError, load_layer_module, resolve_layer_path
from mesagen.runtime.model import Model

FIX = Path(__file__).parent / "fixtures"
FAKE = {"linear": FIX / "fake_linear_layer.py", "ridge": FIX / "fake_ridge_layer.py",
        "delta": FIX / "fake_delta_layer.py"}
#: Real generated modules once the compiler has produced them; otherwise the hand-written fixtures.
KINDS = ["softmax"] + [str(REPO_ROOT / "generated" / n / "layer_jax.py")
                       if (REPO_ROOT / "generated" / n / "layer_jax.py").exists() else str(p)
                       for n, p in FAKE.items()]


def test_loader_checks(tmp_path):
    mod = load_layer_module(FAKE["linear"], "0" * 64)
    assert mod.SPEC_NAME == "fake_linear" and load_layer_module(FAKE["linear"]) is mod
    with pytest.raises(LayerLoadError, match="expected"):
        load_layer_module(FAKE["linear"], "f" * 64)
    bad = tmp_path / "bad_format.py"
    bad.write_text(FAKE["linear"].read_text().replace("CODEGEN_FORMAT = 1", "CODEGEN_FORMAT = 99"))
    with pytest.raises(LayerLoadError, match="CODEGEN_FORMAT 99"):
        load_layer_module(bad)
    partial = tmp_path / "partial.py"
    partial.write_text("SPEC_NAME = 'x'\n")
    with pytest.raises(LayerLoadError, match="lacks"):
        load_layer_module(partial)
    with pytest.raises(LayerLoadError, match="does not exist"):
        load_layer_module(tmp_path / "nope.py")
    assert resolve_layer_path("generated:ridge") == REPO_ROOT / "generated" / "ridge" / "layer_jax.py"
    with pytest.raises(LayerLoadError):
        resolve_layer_path("ridge")


@pytest.mark.parametrize("domain,value", [("real", -0.3), ("positive", 0.01), ("positive", 1.0),
                                          ("unit_interval", 0.2)])
def test_reparameterisation_roundtrip(domain, value):
    np.testing.assert_allclose(constrain(unconstrain(jnp.float32(value), domain), domain), value, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tokens", ["constructed", "standard"])
def test_model_shapes(kind, tokens):
    d = 3
    mc = ModelConfig(tokens=tokens, d_model=4 * d if tokens == "constructed" else 8, heads=2, d_k=5, d_v=7,
                     blocks=[kind, "softmax"], layernorm=tokens == "standard", mlp=tokens == "standard",
                     clip_activations=4.0, init_std=0.3, pos_dim=4 if tokens == "standard" else 0)
    model = Model(mc, d, key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 11, 4 * d if tokens == "constructed" else d))
    y = model(x)
    assert y.shape == (2, 11, d) and y.dtype == jnp.float32 and np.all(np.isfinite(y))
    y2 = model(x.at[:, 6:].set(9.0))                                      # causal: the past ignores the future
    np.testing.assert_allclose(y2[:, :6], y[:, :6], rtol=1e-5, atol=1e-6)


def test_generated_layer_forms_agree():
    mc = ModelConfig(tokens="constructed", d_model=12, heads=2, d_k=5, init_std=0.3,
                     blocks=[{"layer": str(FAKE["linear"]), "form": "recurrent"}])
    m1 = Model(mc, 3, key=jax.random.PRNGKey(0))
    mc2 = mc.model_copy(update={"blocks": (mc.blocks[0].model_copy(update={"form": "closed_form"}),)})
    m2 = Model(mc2, 3, key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 12))
    np.testing.assert_allclose(m1(x), m2(x), rtol=1e-4, atol=1e-6)
    with pytest.raises(LayerLoadError, match="offers forms"):
        Model(mc.model_copy(update={"blocks": (mc.blocks[0].model_copy(update={"form": "chunked"}),)}), 3,
              key=jax.random.PRNGKey(0))


def test_config_errors_name_file_and_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent("""
        model: {tokens: constructed, d_model: 40, blocks: [softmax], init_std: 0.1}
        train: {steps: 10, schedule: {peak_lr: 1.0e-3, kind: warmup_cosin}}
    """))
    with pytest.raises(ConfigError, match=r"c\.yaml:3:48: train\.schedule\.kind"):
        load_config(p)
    p.write_text("model: {tokens: constructed, d_model: 12, blocks: [softmax], init_std: 0.1}\n"
                 "train: {steps: 10, schedule: {peak_lr: 1.0e-3}}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:1:30: model\.d_model: must be 4"):
        load_config(p)
    p.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_shipped_configs_validate():
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        for b in cfg.model.blocks:
            if b.layer != "softmax":
                assert b.layer.startswith("generated:") or Path(b.layer).suffix == ".py"

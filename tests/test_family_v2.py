"""The v2 family on the JAX backend (simple_gla, retention, gla, gated_delta, kda) against the independent float64
reference ``mesagen.reference.gated`` and its hand-derived VJPs, plus the conventions of docs/family.md:
gate spaces, scale, feature maps, per-channel inputs, importance weights, domains and long-T decay.

Gates are random and time-varying (never α ≡ 1); sizes are small distinct primes with K ≠ V.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import V2, make_inputs, reference_v2, reference_v2_vjp
from mesagen import reference as ref
from mesagen.pipeline import compile_spec
from mesagen.spec.loader import parse_spec

B, H, K, V = 2, 2, 3, 5
ROOT = Path(__file__).resolve().parents[1]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def _module_from_text(name: str, text: str, tmp: Path):
    path = tmp / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"_v2_{name}_{abs(hash(str(path)))}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def compile_text(yaml_text: str, tmp: Path):
    """Compile a spec given as YAML text to its JAX module (in memory, imported from ``tmp``)."""
    spec = parse_spec(yaml_text, "specs/test.yaml")
    files = compile_spec(spec, "specs/test.yaml", backends=("jax",)).files
    return _module_from_text(spec.name, files[f"{spec.name}/layer_jax.py"], tmp)


def _state(gen_mod, x):
    return gen_mod.State(jnp.asarray(x))


@pytest.mark.parametrize("T", [1, 7])  # long T: test_parallel_form_survives_decay_underflow, tests/test_chunked.py
@pytest.mark.parametrize("name", V2)
def test_outputs_states_and_every_gradient_match_reference(gen, x64, name, T):
    """≤ 1e-10 relative: outputs, final states, and the gradients of q, k, v, every gate / β / γ and the initial
    state, in every form, from a nonzero initial state and with a final-state cotangent."""
    m = gen[name]
    q, k, v, params, inputs = make_inputs(11 + T, name, t=T)
    rng = np.random.default_rng(T)
    s0 = rng.standard_normal((B, H, K, V))
    do = rng.standard_normal((B, T, H, V))
    dS = rng.standard_normal((B, H, K, V))
    sname = m.State._fields[0]
    o_r, st_r = reference_v2(name, q, k, v, params, inputs, {sname: s0})
    g_r = reference_v2_vjp(name, q, k, v, params, inputs, do, {sname: s0}, {sname: dS})
    for form in m.FORMS:
        o, st = m.forward(q, k, v, params, initial_state=_state(m, s0), output_final_state=True, form=form, **inputs)
        assert rel(o, o_r) <= 1e-10, (form, rel(o, o_r))
        assert rel(st[0], st_r[sname]) <= 1e-10, form

        def loss(q_, k_, v_, p_, i_, s_):
            o_, st_ = m.forward(q_, k_, v_, p_, initial_state=m.State(s_), output_final_state=True, form=form, **i_)
            return jnp.sum(o_ * do) + jnp.sum(st_[0] * dS)

        gq, gk, gv, gp, gi, gs = jax.grad(loss, argnums=range(6))(q, k, v, params, inputs, s0)
        errs = {"q": rel(gq, g_r["q"]), "k": rel(gk, g_r["k"]), "v": rel(gv, g_r["v"]),
                "initial_state": rel(gs, g_r["initial_state"][sname])}
        errs.update({n: rel(gi[n], g_r[n]) for n in inputs})
        errs.update({n: rel(gp[n], g_r[n]) for n in params})
        assert max(errs.values()) <= 1e-10, (form, errs)


@pytest.mark.parametrize("name", V2)
def test_step_loop_equals_forward(gen, x64, name):
    m = gen[name]
    q, k, v, params, inputs = make_inputs(3, name)
    o, st = m.forward(q, k, v, params, output_final_state=True, **inputs)
    state = m.init_state(B, H, K, V, params, jnp.float64)
    for t in range(q.shape[1]):
        o_t, state = m.step(state, q[:, t], k[:, t], v[:, t], params, **{n: x[:, t] for n, x in inputs.items()})
        assert rel(o_t, o[:, t]) <= 1e-12
    assert rel(state[0], st[0]) <= 1e-12


@pytest.mark.parametrize("name", V2)
def test_scale_argument_has_fla_meaning(gen, x64, name):
    """scale=None is the spec's default d_k^(-1/2); an explicit scale multiplies the (feature-mapped) query."""
    m = gen[name]
    assert m.DEFAULT_SCALE == "inverse_sqrt_dk"
    q, k, v, params, inputs = make_inputs(5, name)
    o_half, _ = m.forward(q, k, v, params, scale=0.5, **inputs)
    assert rel(o_half, reference_v2(name, q, k, v, params, inputs, scale=0.5)[0]) <= 1e-10
    o_def, _ = m.forward(q, k, v, params, **inputs)
    assert rel(o_def, reference_v2(name, q, k, v, params, inputs, scale=K ** -0.5)[0]) <= 1e-10


LINEAR_SPACE = {
    "simple_gla": ("g: {shape: [batch, time, heads], space: log, domain: nonpositive}",
                   "g: {shape: [batch, time, heads], space: linear, domain: positive_unit_interval}"),
    "kda": ("g: {shape: [batch, time, heads, d_k], space: log, domain: nonpositive}",
            "g: {shape: [batch, time, heads, d_k], space: linear, domain: positive_unit_interval}"),
}


@pytest.mark.parametrize("name", sorted(LINEAR_SPACE))
def test_log_and_linear_space_specs_agree_in_float32(gen, tmp_path, name):
    """The same layer stated with a log-space gate g and a linear-space gate α = exp(g): ≤ 1e-6 in float32."""
    old, new = LINEAR_SPACE[name]
    text = (ROOT / "specs" / f"{name}.yaml").read_text()
    assert old in text
    lin = compile_text(text.replace(old, new).replace(f"name: {name}", f"name: {name}_linear"), tmp_path)
    m = gen[name]
    q, k, v, params, inputs = make_inputs(7, name, dtype=np.float32)
    alpha = {**inputs, "g": np.exp(inputs["g"])}
    for form in m.FORMS:
        o_log, _ = m.forward(q, k, v, params, form=form, **inputs)
        o_lin, _ = lin.forward(q, k, v, params, form=form, **alpha)
        assert o_log.dtype == jnp.float32
        assert rel(o_lin, o_log) <= 1e-6, form


@pytest.mark.parametrize("name,bad", [("simple_gla", 0.3), ("gla", 0.1), ("gated_delta", 2.0)])
def test_out_of_domain_log_gate_is_refused(gen, name, bad):
    m = gen[name]
    q, k, v, params, inputs = make_inputs(1, name, dtype=np.float32)
    inputs["g"] = inputs["g"].copy()
    inputs["g"][0, 2, 1] = bad
    with pytest.raises(ValueError, match=r"input 'g' has values outside its domain 'nonpositive'"):
        m.forward(q, k, v, params, **inputs)


def test_out_of_domain_linear_gate_is_refused(gen, tmp_path):
    old, new = LINEAR_SPACE["simple_gla"]
    lin = compile_text((ROOT / "specs" / "simple_gla.yaml").read_text().replace(old, new), tmp_path)
    q, k, v, params, inputs = make_inputs(1, "simple_gla", dtype=np.float32)
    for bad in (0.0, -0.2, 1.5):
        alpha = np.exp(inputs["g"])
        alpha[1, 0, 0] = bad
        with pytest.raises(ValueError, match="positive_unit_interval"):
            lin.forward(q, k, v, params, g=alpha)


def test_retention_gamma_out_of_domain_is_refused(gen):
    q, k, v, params, inputs = make_inputs(1, "retention", dtype=np.float32)
    with pytest.raises(ValueError, match="parameter 'gamma'"):
        gen["retention"].forward(q, k, v, {"gamma": np.array([0.9, 1.2], np.float32)})


@pytest.mark.parametrize("name", ["simple_gla", "gla", "retention"])
def test_parallel_form_survives_decay_underflow(gen, x64, name):
    """Over T = 600 tokens with strong decay the cumulative log gate reaches −1800: exp(G_t) underflows to 0, so
    a form that divided products of α (exp(G_t) / exp(G_i)) would give 0/0. Decay ratios from differences of
    cumulative log gates stay exact: the parallel form equals the recurrence and is finite."""
    T = 600
    q, k, v, params, inputs = make_inputs(2, name, t=T)
    if name == "retention":
        params = {"gamma": np.array([0.05, 0.5])}
    else:
        inputs = {"g": np.full(inputs["g"].shape, -3.0)}
    o_rec, st_rec = gen[name].forward(q, k, v, params, output_final_state=True, **inputs)
    o_par, st_par = gen[name].forward(q, k, v, params, output_final_state=True, form="closed_form", **inputs)
    assert np.all(np.isfinite(o_par)) and np.all(np.isfinite(st_par[0]))
    assert rel(o_par, o_rec) <= 1e-10 and rel(st_par[0], st_rec[0]) <= 1e-10


def test_per_value_channel_step_size(x64, tmp_path):
    """A step size per value channel ([B, T, H, V]): matches the reference, and its gradient has its shape."""
    text = (ROOT / "specs" / "gated_delta.yaml").read_text().replace(
        "beta: {shape: [batch, time, heads], space: linear", "beta: {shape: [batch, time, heads, d_v], space: linear")
    m = compile_text(text.replace("name: gated_delta", "name: gated_delta_beta_v"), tmp_path)
    assert m.INPUTS["beta"]["shape"] == ("B", "T", "H", "V")
    rng = np.random.default_rng(0)
    T = 9
    q, k, v, _, inputs = make_inputs(4, "gated_delta", t=T)
    beta = rng.uniform(0.05, 0.95, (B, T, H, V))
    do = rng.standard_normal((B, T, H, V))
    o, _ = m.forward(q, k, v, {}, g=inputs["g"], beta=beta)
    o_r, _ = ref.gated_delta(q, k, v, inputs["g"], beta)
    assert rel(o, o_r) <= 1e-10
    gb = jax.grad(lambda b: jnp.sum(m.forward(q, k, v, {}, g=inputs["g"], beta=b)[0] * do))(beta)
    assert gb.shape == (B, T, H, V)
    assert rel(gb, ref.gated_delta_vjp(q, k, v, inputs["g"], beta, do)["beta"]) <= 1e-10
    with pytest.raises(ValueError, match=r"input 'beta' must have shape"):
        m.forward(q, k, v, {}, g=inputs["g"], beta=beta[..., 0])


IMPORTANCE = """spec_version: 2
name: weighted_gla
description: Simple GLA with importance weights w_i on every pair's loss.
objective:
  loss: squared
  weights: {kind: decayed, gate: g, importance: w}
  regularizer: {kind: none}
  model: {kind: linear, feature_map: elu_plus_one}
solver: {kind: gd, steps: 1}
readout: {kind: query, scale: 0.7}
inputs:
  g: {shape: [batch, time, heads], space: log, domain: nonpositive}
  w: {shape: [batch, time, heads], space: linear, domain: positive}
"""


def test_importance_weights_and_elu_feature_map(x64, tmp_path):
    """Σ ω_{t,i} w_i ½‖v_i − W φ(k_i)‖² after one step = simple_gla on (φ(q), φ(k), w ⊙ v), scale 0.7; both forms
    agree, and the gradient w.r.t. w is that of the reference."""
    m = compile_text(IMPORTANCE, tmp_path)
    assert m.FEATURE_MAP == "elu_plus_one" and m.DEFAULT_SCALE == 0.7
    T = 8
    q, k, v, _, inputs = make_inputs(6, "simple_gla", t=T)
    w = np.random.default_rng(1).uniform(0.1, 2.0, (B, T, H))
    phi = lambda x: np.where(x > 0, x, np.expm1(x)) + 1  # noqa: E731
    o_r, st_r = ref.simple_gla(phi(q), phi(k), v * w[..., None], inputs["g"], scale=0.7)
    do = np.random.default_rng(2).standard_normal((B, T, H, V))
    for form in m.FORMS:
        o, st = m.forward(q, k, v, {}, g=inputs["g"], w=w, output_final_state=True, form=form)
        assert rel(o, o_r) <= 1e-10 and rel(st[0], st_r["kv"]) <= 1e-10, form
        gw = jax.grad(lambda w_: jnp.sum(m.forward(q, k, v, {}, g=inputs["g"], w=w_, form=form)[0] * do))(w)
        dv = ref.simple_gla_vjp(phi(q), phi(k), v * w[..., None], inputs["g"], do, scale=0.7)["v"]
        assert rel(gw, np.sum(dv * v, axis=-1)) <= 1e-10, form


def test_online_gd_stability_and_l2_normalize(gen, x64):
    """docs/family.md: online GD is a contraction iff 0 < β‖k‖² < 2. With unnormalised randn keys at d_k = 64
    (‖k‖² ≈ 64) and β = 0.5 the delta rule diverges; gated_delta's l2_normalize keeps the state bounded."""
    rng = np.random.default_rng(0)
    T, Kb, Vb = 64, 64, 8
    q, k = rng.standard_normal((1, T, 1, Kb)), rng.standard_normal((1, T, 1, Kb))
    v = rng.standard_normal((1, T, 1, Vb))
    beta = np.full((1, T, 1), 0.5)
    o_delta, _ = gen["delta"].forward(q, k, v, {}, beta=beta)
    assert float(np.max(np.abs(o_delta))) > 1e20
    o_gd, st = gen["gated_delta"].forward(q, k, v, {}, beta=beta, g=np.zeros((1, T, 1)), output_final_state=True)
    assert float(np.max(np.abs(o_gd))) < 10 and float(np.max(np.abs(st[0]))) < 10

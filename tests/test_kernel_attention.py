"""Kernel regression (docs/family.md §9): the specs softmax and forgetting_attn (specs/), their JAX layers.

Their JAX layers are compared with the float64 numpy references of mesagen.reference.attention (explicitly
normalised weights): outputs in float64 to 1e-10, gradients (q, k, v, g) against finite differences, step ==
forward token by token, chunked == recurrent, continuation through the KV cache, large logits, non-finite inputs,
float32. Every backend emits these layers (the Numba modules: tests/test_numba_kernel.py, tests/cuda/); a backend
that does not is refused.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesagen import reference as ref
from mesagen.errors import DerivationError, MesagenError
from mesagen.pipeline import KERNEL_BACKENDS, _compile_kernel, compile_file, compile_spec
from mesagen.spec.loader import load_spec
from mesagen.symbolic.kernel import derive_kernel, verify_kernel

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
NAMES = ("softmax", "forgetting_attn")
B, T, H, K, V = 2, 7, 2, 3, 5


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    """name → the generated JAX module, compiled from specs/NAME.yaml into a temporary folder (the compiler's text
    now, not the committed file, which mesagen build --check ties to it)."""
    out = tmp_path_factory.mktemp("kernel_layers")
    mods = {}
    for name in NAMES:
        compiled = compile_file(SPECS / f"{name}.yaml", backends=("jax",))
        path = out / f"{name}_layer_jax.py"
        path.write_text(compiled.files[f"{name}/layer_jax.py"], encoding="utf-8")
        spec = importlib.util.spec_from_file_location(f"_kernel_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    return mods


def _inputs(name, seed, t=T, big=1.0):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, B, t, H, K))
    v = rng.standard_normal((B, t, H, V))
    ins = {"g": np.log(rng.uniform(0.3, 1.0, (B, t, H)))} if name == "forgetting_attn" else {}
    return q * big, k, v, ins


def _reference(q, k, v, ins):
    return ref.softmax_attention(q, k, v, K ** -0.5, ins.get("g"))


# forgetting_attn at every length; softmax (the same frame with no gate) at one (suite time)
@pytest.mark.parametrize("name,t", [("forgetting_attn", 1), ("forgetting_attn", 7), ("forgetting_attn", 70),
                                    ("softmax", 70)])
def test_forms_match_reference_float64(layers, x64, name, t):
    """recurrent and chunked (C = 16, 64) equal the reference to 1e-10 in float64 (T = 1, T < C, T > C, T not a
    multiple of C), and both forms give the same final KV cache."""
    L = layers[name]
    q, k, v, ins = _inputs(name, t, t)
    want = _reference(q, k, v, ins)
    o_r, s_r = L.forward(jnp.asarray(q), k, v, {}, output_final_state=True, **ins)
    np.testing.assert_allclose(np.asarray(o_r), want, rtol=0, atol=1e-10)
    for c in (16, 64):
        o_c, s_c = L.forward(jnp.asarray(q), k, v, {}, form="chunked", chunk_size=c, output_final_state=True, **ins)
        np.testing.assert_allclose(np.asarray(o_c), want, rtol=0, atol=1e-10)
        for a, b in zip(s_r, s_c):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12)
    assert s_r.k.shape == (B, H, t, K) and list(np.asarray(s_r.length)) == [t] * B


def test_linear_space_gate_and_weights(x64):
    """A forget gate in linear space (α) equals the log-space layer fed log α; the reference's weights rows sum to
    1 and vanish above the diagonal."""
    text = (SPECS / "forgetting_attn.yaml").read_text(encoding="utf-8")
    lin = text.replace("space: log, domain: nonpositive", "space: linear, domain: positive_unit_interval")
    assert lin != text
    from mesagen.spec.loader import parse_spec

    spec = parse_spec(lin, "forgetting_attn_linear.yaml")
    mod_text = compile_spec(spec, "fixtures/forgetting_attn_linear.yaml", backends=("jax",)).files[
        "forgetting_attn/layer_jax.py"]
    ns: dict = {}
    exec(compile(mod_text, "forgetting_attn_linear", "exec"), ns)  # noqa: S102 - our own generated module
    q, k, v, ins = _inputs("forgetting_attn", 3)
    alpha = np.exp(ins["g"])
    o, _ = ns["forward"](jnp.asarray(q), k, v, {}, form="chunked", chunk_size=3, g=alpha)
    np.testing.assert_allclose(np.asarray(o), ref.softmax_attention(q, k, v, K ** -0.5, alpha, "linear"), atol=1e-10)
    p = ref.softmax_attention_weights(q, k, 0.7, ins["g"])
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-14)
    assert np.all(np.triu(p, 1) == 0)


@pytest.mark.parametrize("name,form", [("forgetting_attn", "chunked"), ("forgetting_attn", "recurrent"),
                                       ("softmax", "chunked")])
def test_gradients_match_finite_differences(layers, x64, name, form):
    """∂L/∂q, k, v (and g) of L = Σ o ⊙ w through each form equal central finite differences of the reference."""
    L = layers[name]
    t = 5
    q, k, v, ins = _inputs(name, 11, t)
    w = np.random.default_rng(5).standard_normal((B, t, H, V))
    kw = {"form": form, "chunk_size": 2} if form == "chunked" else {}
    args = [q, k, v] + ([ins["g"]] if ins else [])

    def loss(*xs):
        extra = {"g": xs[3]} if ins else {}
        o, _ = L.forward(xs[0], xs[1], xs[2], {}, **kw, **extra)
        return jnp.sum(o * w)

    grads = jax.grad(loss, argnums=tuple(range(len(args))))(*(jnp.asarray(a) for a in args))
    for i, (a, g) in enumerate(zip(args, grads)):
        def f(x, i=i):
            xs = list(args)
            xs[i] = x
            return float(np.sum(_reference(xs[0], xs[1], xs[2], {"g": xs[3]} if ins else {}) * w))
        np.testing.assert_allclose(np.asarray(g), ref.finite_difference_grad(f, a), rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_step_and_continuation(layers, x64, name):
    """step token by token equals forward (outputs and final cache); forward on a prefix, then forward (chunked)
    from its final state equals one forward; decoding after a prompt needs the capacity init_state reserves."""
    L = layers[name]
    q, k, v, ins = _inputs(name, 21)
    o, fin = L.forward(jnp.asarray(q), k, v, {}, output_final_state=True, **ins)
    st = L.init_state(B, H, K, V, {}, jnp.float64, capacity=T)
    outs = []
    for t in range(T):
        o_t, st = L.step(st, jnp.asarray(q[:, t]), k[:, t], v[:, t], {}, **{n: x[:, t] for n, x in ins.items()})
        outs.append(o_t)
    np.testing.assert_allclose(np.stack(outs, 1), np.asarray(o), rtol=0, atol=1e-12)
    for a, b in zip(st, fin):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="KV cache is full"):
        L.step(st, jnp.asarray(q[:, 0]), k[:, 0], v[:, 0], {}, **{n: x[:, 0] for n, x in ins.items()})
    s = 3
    pre = {n: x[:, :s] for n, x in ins.items()}
    post = {n: x[:, s:] for n, x in ins.items()}
    o1, s1 = L.forward(jnp.asarray(q[:, :s]), k[:, :s], v[:, :s], {}, output_final_state=True,
                       initial_state=L.init_state(B, H, K, V, {}, jnp.float64, capacity=2), **pre)
    o2, s2 = L.forward(jnp.asarray(q[:, s:]), k[:, s:], v[:, s:], {}, output_final_state=True, initial_state=s1,
                       form="chunked", chunk_size=2, **post)
    np.testing.assert_allclose(np.concatenate([o1, o2], 1), np.asarray(o), rtol=0, atol=1e-12)
    assert s2.k.shape[2] == 2 + T and list(np.asarray(s2.length)) == [T] * B
    step_jit = jax.jit(lambda s, *x: L._step_batched(s, *x))  # a traced length: a full cache gives NaN, not junk
    full = L.State(*fin)
    o_full, _ = step_jit(full, jnp.asarray(q[:, 0]), jnp.asarray(k[:, 0]), jnp.asarray(v[:, 0]),
                         tuple(jnp.asarray(x[:, 0]) for x in ins.values()))
    assert np.all(np.isnan(np.asarray(o_full)))


@pytest.mark.parametrize("name", NAMES)
def test_large_logits_float32(layers, name):
    """Logits of order 10³ (exp overflows float32 at 88): float32 outputs of both forms are finite and match the
    float64 reference; T = 1 works; errors name the argument."""
    L = layers[name]
    q, k, v, ins = _inputs(name, 31, big=300.0)
    logits = np.einsum("bthk,bshk->bhts", q, k) * K ** -0.5
    assert np.abs(logits).max() > 500
    want = _reference(q, k, v, ins)
    for kw in ({}, {"form": "chunked", "chunk_size": 3}):
        o, _ = L.forward(jnp.asarray(q, jnp.float32), k, v, {}, **kw, **ins)
        assert o.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(o)))
        np.testing.assert_allclose(np.asarray(o), want, rtol=0, atol=2e-3)
    o1, _ = L.forward(jnp.asarray(q[:, :1], jnp.float32), k[:, :1], v[:, :1], {}, **{n: x[:, :1] for n, x in ins.items()})
    np.testing.assert_allclose(np.asarray(o1), v[:, :1], atol=1e-6)  # one token: its own value
    with pytest.raises(ValueError, match="params must be an empty dict"):
        L.forward(jnp.asarray(q, jnp.float32), k, v, {"x": 1.0}, **ins)
    with pytest.raises(ValueError, match="unknown form"):
        L.forward(jnp.asarray(q, jnp.float32), k, v, {}, form="closed_form", **ins)
    with pytest.raises(ValueError, match="initial_state"):
        L.forward(jnp.asarray(q, jnp.float32), k, v, {}, initial_state=(1, 2), **ins)
    if ins:
        with pytest.raises(ValueError, match="outside its domain"):
            L.forward(jnp.asarray(q, jnp.float32), k, v, {}, g=-ins["g"] + 0.1)


@pytest.mark.parametrize("name,form", [("forgetting_attn", "chunked"), ("softmax", "recurrent")])
def test_nonfinite_inputs_stay_causal(layers, x64, name, form):
    """NaN / inf at position s leaves outputs and gradients at t < s untouched."""
    L = layers[name]
    q, k, v, ins = _inputs(name, 41)
    s = 4
    qn, vn, kn = q.copy(), v.copy(), k.copy()
    qn[:, s] = np.nan
    vn[:, s + 1, 0, 1] = np.inf
    kn[:, s, 1, 0] = -np.inf
    want = _reference(q, k, v, ins)
    for kw in ({"form": "chunked", "chunk_size": 2} if form == "chunked" else {},):
        o, _ = L.forward(jnp.asarray(qn), kn, vn, {}, **kw, **ins)
        np.testing.assert_allclose(np.asarray(o)[:, :s], want[:, :s], rtol=0, atol=1e-10)
        gq = jax.grad(lambda x: jnp.sum(L.forward(x, kn, vn, {}, **kw, **ins)[0][:, :s]))(jnp.asarray(qn))
        gq_clean = jax.grad(lambda x: jnp.sum(L.forward(x, k, v, {}, **kw, **ins)[0][:, :s]))(jnp.asarray(q))
        np.testing.assert_allclose(np.asarray(gq)[:, :s], np.asarray(gq_clean)[:, :s], rtol=0, atol=1e-12)
        assert np.all(np.asarray(gq)[:, s:] == 0)


def test_derivation_is_checked_and_every_backend_builds():
    """A wrong closed form fails verification; the derivation is deterministic; every registered backend emits the
    layer (a backend outside KERNEL_BACKENDS would be refused, naming it)."""
    spec = load_spec(SPECS / "forgetting_attn.yaml")
    d = derive_kernel(spec)
    assert [c.name for c in verify_kernel(d)] == ["stationarity", "shift_invariance", "decay", "float64"]
    bad = dataclasses.replace(d, closed_form=d.C / (d.a + 1))
    with pytest.raises(DerivationError, match="stationarity"):
        verify_kernel(bad)
    assert verify_kernel(d, seed=0)[0].detail == verify_kernel(d, seed=7)[0].detail
    a = compile_file(SPECS / "softmax.yaml").files
    assert sorted(a) == ["softmax/DERIVATION.md", "softmax/layer_jax.py", "softmax/layer_numba_cpu.py",
                         "softmax/layer_numba_cuda.py"]
    assert a == compile_file(SPECS / "softmax.yaml", backends=KERNEL_BACKENDS).files
    with pytest.raises(MesagenError, match="the tpu backend"):
        _compile_kernel(load_spec(SPECS / "softmax.yaml"), "specs/softmax.yaml", ("jax", "tpu"), "")
    assert "| stationarity | exact |" in a["softmax/DERIVATION.md"]


def test_docs_quote_the_specs_and_their_snippets_run(monkeypatch):
    """docs/specs.md §6 quotes both specs verbatim, and each worked example's snippet runs as written from the
    checkout's root (o [B, T, H, V] finite; the chunked o2 equal to o)."""
    monkeypatch.chdir(ROOT)
    doc = (ROOT / "docs" / "specs.md").read_text(encoding="utf-8")
    for name in NAMES:
        section = doc.split(f"### `specs/{name}.yaml`", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
        assert section.split("```yaml\n", 1)[1].split("```", 1)[0] == (SPECS / f"{name}.yaml").read_text()
        ns: dict = {}
        exec(compile(section.split("```python\n", 1)[1].split("```", 1)[0], f"docs/specs.md ({name})", "exec"), ns)
        o = np.asarray(ns["o"])
        assert o.shape == (ns["B"], ns["T"], ns["H"], ns["V"]) and np.isfinite(o).all()
        np.testing.assert_allclose(np.asarray(ns["o2"]), o, rtol=1e-5, atol=1e-6)
        assert ns["o_t"].shape == (ns["B"], ns["H"], ns["V"])

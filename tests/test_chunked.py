"""The chunkwise-parallel form ``form="chunked"`` (issue "Chunkwise-parallel forms", first increment).

Offered, from the IR (KernelForm.chunkable: no Gram sums, C̄ linear in v), by linear, simple_gla, retention and
gla, and by any spec of that kind (importance weights, a linear-space gate). Checked against the recurrent form
in float64 to ≤ 1e-12 relative (outputs, final states, every gradient) for T ∈ {1, 5, 64, 130} and chunk sizes
C ∈ {1, 16, 64} — T a multiple of C, not a multiple, shorter than C, and T = 1; strong decay over T = 600; jit,
vmap and grad with several chunks; the causality guard with several chunks; chunk_size validation; and the
activation memory of the backward (jax.checkpoint per chunk) against the recurrent form at long T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import KERNEL, SHIPPED, load_generated, make_inputs
from test_family_v2 import compile_text

CHUNKED = [n for n in SHIPPED if "chunked" in load_generated(n).FORMS and n not in KERNEL
           and not getattr(load_generated(n), "_USES_GRAM", False)]  # ridge: its own tests below
# The kernel layers' chunked form (blockwise online softmax over a KV cache): tests/test_kernel_attention.py.
DELTA = ["delta", "gated_delta", "kda", "implicit_delta"]  # the WY form of the delta rule (implicit_delta: ε = β/(1 + β kᵀk))
STATS = ["gd", "rls_forgetting", "mesanet"]  # the chunked form over the statistics (KernelForm.stats_chunkable)
RIDGE_TOL = 1e-10  # exact ridge chunked vs recurrent, float64, cond(Ā_t) ≤ 1e4 (see test_ridge_*)
B, H, K, V = 2, 2, 3, 5
RTOL = 1e-12


def rel(a, b):
    """Largest absolute difference of two arrays relative to the largest entry of ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b), initial=0.0)) / max(float(np.max(np.abs(b), initial=0.0)), 1e-300)


def args_for(m, name, T, seed=0, b=B):
    """q, k, v, params, inputs (random, time-varying gates) and a random nonzero initial state, float64."""
    q, k, v, params, inputs = make_inputs(seed, name, b=b, t=T, h=H, k=K, v=V)
    rng = np.random.default_rng(seed + 1)
    state = m.State(*(0.3 * rng.standard_normal(x.shape) for x in m.init_state(b, H, K, V, params, jnp.float64)))
    return q, k, v, params, inputs, state


def value_and_grads(m, form, q, k, v, params, inputs, state, seed=5, **kw):
    """(o, final state) and the gradients of ⟨do, o⟩ + ⟨dS, final⟩ w.r.t. q, k, v, params, inputs, state."""
    rng = np.random.default_rng(seed)
    T = q.shape[1]
    do = rng.standard_normal(q.shape[:2] + (H, V))
    dS = [rng.standard_normal(x.shape) for x in state]

    def f(q, k, v, params, inputs, state):
        o, fin = m.forward(q, k, v, params, initial_state=state, output_final_state=True, form=form, **kw, **inputs)
        return jnp.sum(o * do) + sum(jnp.sum(a * b) for a, b in zip(fin, dS)), (o, fin)

    # one jitted program for the forward and the backward (eagerly, the two are compiled apart: twice the compile)
    grads, out = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4, 5), has_aux=True))(q, k, v, params, inputs, state)
    assert out[0].shape == (q.shape[0], T, H, V)
    return out, grads


def assert_close(got, want, what, rtol=RTOL):
    lg, lw = jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)
    assert len(lg) == len(lw) and lw
    for (path, a), b in zip(lg, lw):
        assert bool(np.all(np.isfinite(np.asarray(a)))), (what, jax.tree_util.keystr(path))
        assert rel(a, b) <= rtol, (what, jax.tree_util.keystr(path), rel(a, b))


def test_forms_come_from_the_ir():
    """chunked where the kernel form reads no Gram sums, for the delta-rule family (online GD: the WY form, a
    DeltaChunkForm in the IR), for the exact ridge solve x = Ā⁻¹ q over uniform rank-one sums
    (KernelForm.gram_chunkable), and over the decayed statistics for every other kernel form that reads them
    (KernelForm.stats_chunkable: gd's x = p(Ā) q, rls_forgetting, mesanet; tested separately below)."""
    assert CHUNKED == ["linear", "delta", "simple_gla", "retention", "gla", "gated_delta", "kda", "implicit_delta"]
    assert [n for n in CHUNKED if hasattr(load_generated(n), "_delta_chunk_step")] == DELTA
    assert [n for n in SHIPPED if "chunked" in load_generated(n).FORMS and n not in CHUNKED] == \
        ["gd", "ridge", *STATS[1:], *KERNEL]
    assert [n for n in SHIPPED if hasattr(load_generated(n), "_stats_chunk_step")] == STATS
    for n in SHIPPED:
        forms = load_generated(n).FORMS
        assert forms[0] == "recurrent" and "chunked" in forms, (n, forms)


@pytest.mark.parametrize("name,T", [(n, T) for n in CHUNKED for T in ((1, 70) if n in DELTA else (1, 5, 64, 130))])
def test_chunked_equals_recurrent_with_every_gradient(gen, x64, name, T):
    """Outputs, final state and the gradients of q, k, v, parameters (η, γ), gates, step sizes β and the initial
    state agree with the recurrent form to ≤ 1e-12 relative, for C ∈ {1, 16, 64}: T a multiple of C, not one,
    T < C, T = 1 (random time-varying gates and β)."""
    m = gen[name]
    q, k, v, params, inputs, state = args_for(m, name, T)
    want = value_and_grads(m, "recurrent", q, k, v, params, inputs, state)
    grads = want[1]
    assert set(grads[3]) == set(params) and set(grads[4]) == set(inputs)
    for C in ((16, 64) if name in DELTA else (1, 16, 64)):  # the WY family: T = 70 is 4·16 + 6 and 64 + 6 (suite time)
        got = value_and_grads(m, "chunked", q, k, v, params, inputs, state, chunk_size=C)
        assert_close(got, want, (name, T, C))


def test_default_chunk_size_is_64(gen, x64):
    m = gen["gla"]
    q, k, v, params, inputs, state = args_for(m, "gla", 130, b=1)
    o = m.forward(q, k, v, params, form="chunked", **inputs)[0]
    np.testing.assert_array_equal(o, m.forward(q, k, v, params, form="chunked", chunk_size=64, **inputs)[0])
    assert rel(o, m.forward(q, k, v, params, **inputs)[0]) <= RTOL


@pytest.mark.parametrize("name", CHUNKED)
def test_strong_decay_over_600_tokens_stays_finite(gen, x64, name):
    """Gates far below 0 (log α down to −40 per token; γ = 1e-6): a chunk's cumulative log gate reaches about
    −2500 within 64 tokens, where exp(−G_i) of the factorised form would overflow even in float64. Outputs,
    states and gradients stay finite and equal the recurrent form's (float64); float32 stays finite."""
    m = gen[name]
    T = 600
    q, k, v, params, inputs, state = args_for(m, name, T, seed=3, b=1)
    rng = np.random.default_rng(4)
    if "g" in inputs:
        inputs = {**inputs, "g": -rng.uniform(0.0, 40.0, inputs["g"].shape)}
    if "gamma" in params:
        params = {"gamma": np.full(H, 1e-6)}
    want = value_and_grads(m, "recurrent", q, k, v, params, inputs, state)
    got = value_and_grads(m, "chunked", q, k, v, params, inputs, state, chunk_size=64)
    assert_close(got, want, name)
    f32 = lambda x: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), x)  # noqa: E731
    o, fin = m.forward(*f32((q, k, v)), f32(params), initial_state=f32(state), output_final_state=True,
                       form="chunked", **f32(inputs))
    g = jax.grad(lambda kk: jnp.sum(m.forward(f32(q), kk, f32(v), f32(params), form="chunked", **f32(inputs))[0]))(
        f32(k))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in (o, *fin, g))
    assert rel(o, want[0][0]) <= 1e-4


@pytest.mark.parametrize("name", CHUNKED)
def test_jit_vmap_grad_compose_with_several_chunks(gen, x64, name):
    """T = 5 in chunks of 2 (a padded tail): jit of forward, vmap of per-example calls (params unbatched), grad
    of the vmapped loss and jvp all equal the plain / looped calls."""
    m = gen[name]
    q, k, v, params, inputs, state = args_for(m, name, 5, seed=11, b=3)

    def one(q, k, v, inputs, state):
        o, fin = m.forward(q[None], k[None], v[None], params, initial_state=jax.tree.map(lambda x: x[None], state),
                           output_final_state=True, form="chunked", chunk_size=2,
                           **{n: x[None] for n, x in inputs.items()})
        return o[0], jax.tree.map(lambda x: x[0], fin)

    want = m.forward(q, k, v, params, initial_state=state, output_final_state=True, form="recurrent", **inputs)
    jitted = jax.jit(lambda q, k, v, i, s: m.forward(q, k, v, params, initial_state=s, output_final_state=True,
                                                     form="chunked", chunk_size=2, **i))
    assert_close(jitted(q, k, v, inputs, state), want, "jit")
    assert_close(jax.vmap(one)(q, k, v, inputs, state), want, "vmap")

    def loss_vmap(q, k, v, inputs, state):
        return jnp.sum(jax.vmap(one)(q, k, v, inputs, state)[0] ** 2)

    def loss_rec(q, k, v, inputs, state):
        return jnp.sum(m.forward(q, k, v, params, initial_state=state, **inputs)[0] ** 2)

    argnums = (0, 1, 2, 3, 4)
    assert_close(jax.jit(jax.grad(loss_vmap, argnums))(q, k, v, inputs, state),
                 jax.grad(loss_rec, argnums)(q, k, v, inputs, state), "grad of vmap")
    tangent = jax.tree.map(lambda x: np.random.default_rng(0).standard_normal(np.shape(x)), (q, k, v))
    _, jv = jax.jvp(lambda q, k, v: m.forward(q, k, v, params, form="chunked", chunk_size=2, **inputs)[0],
                    (q, k, v), tangent)
    _, jv_rec = jax.jvp(lambda q, k, v: m.forward(q, k, v, params, **inputs)[0], (q, k, v), tangent)
    assert rel(jv, jv_rec) <= RTOL


@pytest.mark.parametrize("name", CHUNKED)
def test_continuing_from_a_final_state(gen, x64, name):
    """Prefill 7 tokens chunked, then 6 more from its final state: one 13-token call's outputs and state."""
    m = gen[name]
    q, k, v, params, inputs, state = args_for(m, name, 13, seed=2)
    first = m.forward(q[:, :7], k[:, :7], v[:, :7], params, initial_state=state, output_final_state=True,
                      form="chunked", chunk_size=3, **{n: x[:, :7] for n, x in inputs.items()})
    second = m.forward(q[:, 7:], k[:, 7:], v[:, 7:], params, initial_state=first[1], output_final_state=True,
                       form="chunked", chunk_size=4, **{n: x[:, 7:] for n, x in inputs.items()})
    want = m.forward(q, k, v, params, initial_state=state, output_final_state=True, **inputs)
    assert_close((jnp.concatenate([first[0], second[0]], axis=1), second[1]), want, name)


@pytest.mark.parametrize("field", ["q", "k", "v"])
@pytest.mark.parametrize("name", CHUNKED + ["ridge"])
def test_nonfinite_input_stays_causal_across_chunks(gen, x64, name, field):
    """NaN at position 5 of a 9-token sequence in chunks of 2: outputs before 5 equal a clean run's, the
    non-finite outputs are the recurrence's, and with the loss on t < 5 every gradient is finite and equal to
    the clean run's (the chunked form goes through the same _causal_forward as every form)."""
    m = gen[name]
    T, s = 9, 5
    q, k, v, params, inputs, _ = args_for(m, name, T, seed=6, b=1)
    clean = {"q": q, "k": k, "v": v}
    dirty = {n: np.array(x) for n, x in clean.items()}
    dirty[field][0, s, 0, 1] = np.nan

    def run(a, form):
        return m.forward(a["q"], a["k"], a["v"], params, form=form, chunk_size=2 if form == "chunked" else None,
                         **inputs)[0]

    o, o_clean, o_rec = run(dirty, "chunked"), run(clean, "chunked"), run(dirty, "recurrent")
    np.testing.assert_allclose(o[:, :s], o_clean[:, :s], rtol=1e-12, atol=0)
    np.testing.assert_array_equal(np.isfinite(o), np.isfinite(o_rec))
    w = np.random.default_rng(2).standard_normal(o.shape)
    w[:, s:] = 0
    g = jax.grad(lambda a: jnp.sum(w * run(a, "chunked")))(dirty)
    g_clean = jax.grad(lambda a: jnp.sum(w * run(a, "chunked")))(clean)
    for n in g:
        assert bool(jnp.all(jnp.isfinite(g[n]))), n
        np.testing.assert_allclose(g[n], g_clean[n], rtol=1e-12, atol=1e-300)


def test_chunk_size_is_validated(gen, x64):
    m = gen["simple_gla"]
    q, k, v, params, inputs, _ = args_for(m, "simple_gla", 5, b=1)
    for bad in (0, -3, 2.0, 2.5, True, "4", np.array([2]), None):
        if bad is None:
            continue
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            m.forward(q, k, v, params, form="chunked", chunk_size=bad, **inputs)
    want = m.forward(q, k, v, params, form="chunked", chunk_size=2, **inputs)[0]
    for ok in (np.int64(2), jnp.asarray(2)):
        np.testing.assert_array_equal(m.forward(q, k, v, params, form="chunked", chunk_size=ok, **inputs)[0], want)
    for form in ("recurrent", "closed_form"):
        with pytest.raises(ValueError, match="chunk_size applies to form='chunked' only"):
            m.forward(q, k, v, params, form=form, chunk_size=16, **inputs)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        jax.jit(lambda c: m.forward(q, k, v, params, form="chunked", chunk_size=c, **inputs)[0])(2)
    gd = gen["gd"]
    with pytest.raises(ValueError, match="chunk_size applies"):
        gd.forward(q, k, v, {"eta": np.ones(H)}, chunk_size=4)


RECURRENT_ONLY = """spec_version: 2
name: decayed_delta
description: The delta rule with weight decay (a regulariser inside online GD) has no chunked form.
objective:
  loss: squared
  weights: {kind: uniform}
  regularizer: {kind: ridge, coefficient: lam}
  model: {kind: linear, feature_map: identity}
solver: {kind: online_gd, step_size: beta}
readout: {kind: query}
parameters:
  lam: {shape: [heads], init: 0.1, domain: positive}
inputs:
  beta: {shape: [batch, time, heads], space: linear, domain: unit_interval}
"""


def test_a_layer_without_a_chunked_form_refuses_it(x64, tmp_path):
    m = compile_text(RECURRENT_ONLY, tmp_path)
    assert m.FORMS == ("recurrent",)
    q, k, v, _, _ = make_inputs(0, "delta", b=1, t=3, h=H, k=K, v=V)
    with pytest.raises(ValueError, match="unknown form 'chunked'"):
        m.forward(q, k, v, {"lam": np.ones(H)}, form="chunked", beta=np.full((1, 3, H), 0.5))


def test_empty_sequence(gen, x64):
    m = gen["gla"]
    q, k, v, params, inputs, state = args_for(m, "gla", 0, b=1)
    o, fin = m.forward(q, k, v, params, initial_state=state, output_final_state=True, form="chunked", **inputs)
    assert o.shape == (1, 0, H, V)
    np.testing.assert_array_equal(fin[0], state[0])


WEIGHTED_LINEAR_GATE = """spec_version: 2
name: weighted_alpha
description: Decayed linear attention with a linear-space gate alpha and importance weights w.
objective:
  loss: squared
  weights: {kind: decayed, gate: alpha, importance: w}
  regularizer: {kind: none}
  model: {kind: linear, feature_map: elu_plus_one}
solver: {kind: gd, steps: 1}
readout: {kind: query, scale: 0.7}
inputs:
  alpha: {shape: [batch, time, heads], space: linear, domain: positive_unit_interval}
  w: {shape: [batch, time, heads], space: linear, domain: positive}
"""


def test_importance_weights_and_linear_space_gate(x64, tmp_path):
    """A spec outside the shipped four gets the chunked form from its IR too: importance weights (v_i ← w_i v_i)
    and a gate in linear space (log α inside the chunk); all gradients, w and α included, match recurrent."""
    m = compile_text(WEIGHTED_LINEAR_GATE, tmp_path)
    assert m.FORMS == ("recurrent", "closed_form", "chunked")
    T = 11
    q, k, v, _, _ = make_inputs(8, "linear", b=B, t=T, h=H, k=K, v=V)
    rng = np.random.default_rng(9)
    inputs = {"alpha": rng.uniform(0.2, 1.0, (B, T, H)), "w": rng.uniform(0.1, 2.0, (B, T, H))}
    state = m.State(0.3 * rng.standard_normal((B, H, K, V)))
    want = value_and_grads(m, "recurrent", q, k, v, {}, inputs, state)
    for C in (1, 4, 16):
        assert_close(value_and_grads(m, "chunked", q, k, v, {}, inputs, state, chunk_size=C), want, C)


MEM_T, MEM_K = 4096, 64  # float32, B = H = 1, K = V = 64: a state per token would be 64 MiB


def _temp_bytes(fn, *args):
    """Temporary (activation) bytes of the compiled grad of ``fn`` with respect to all its arguments."""
    grad = jax.grad(fn, argnums=tuple(range(len(args))))
    return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", ["simple_gla", "gla"])
def test_backward_stores_only_chunk_boundary_states(gen, name):
    """T = 4096, C = 64, K = V = 64, float32. Measured (XLA:CPU): the grad's temporary memory is 9.5 MB
    (simple_gla) and 12.8 MB (gla) chunked against 9.5 MB and 13.7 MB recurrent (rematerialised √T segments) —
    both far below one state per token (67 MB). jax.checkpoint per chunk is what keeps it there: the scan over
    chunks alone takes 1.3 MB / 7.6 MB checkpointed against 7.7 MB / 216 MB without (every chunk's [C, C]
    scores, per key channel [C, C, K] decays, kept for the backward)."""
    m = gen[name]
    T, K = MEM_T, MEM_K
    q, k, v, params, inputs = make_inputs(0, name, b=1, t=T, h=1, k=K, v=K, dtype=np.float32)

    def loss(form, **kw):
        return lambda q, k, v, g: jnp.sum(m.forward(q, k, v, params, form=form, g=g, **kw)[0])

    chunked = _temp_bytes(loss("chunked", chunk_size=64), q, k, v, inputs["g"])
    recurrent = _temp_bytes(loss("recurrent"), q, k, v, inputs["g"])
    per_token_states = T * K * K * 4
    assert chunked < per_token_states / 4, (chunked, per_token_states)
    assert chunked < 1.5 * recurrent, (chunked, recurrent)

    C = 64
    xs = tuple(jnp.moveaxis(jnp.asarray(a).reshape((1, T // C, C) + a.shape[2:]), 1, 0)
               for a in (q, k, v, inputs["g"]))

    def scan_loss(body):
        def f(*xs):
            Cbar, o = jax.lax.scan(body, jnp.zeros((1, 1, K, K), jnp.float32), xs)
            return jnp.sum(o) + jnp.sum(Cbar)
        return f

    remat, plain = _temp_bytes(scan_loss(jax.checkpoint(m._chunk_step)), *xs), _temp_bytes(scan_loss(m._chunk_step), *xs)
    assert remat < plain / 4, (remat, plain)


@pytest.mark.parametrize("name", ["gated_delta", "kda"])
def test_delta_backward_memory_grows_linearly_without_per_token_states(gen, name):
    """The WY form's backward (jax.checkpoint per chunk): temporary bytes of the compiled fwd+bwd at T = 1024 and
    2048 (B = H = 1, K = V = 32, C = 64, float32) grow at most in proportion to T, by less than half a state
    (K·V·4 bytes) per token (measured on XLA:CPU: about 1.2–1.4 kB per token, the inputs and their gradients, against 4 kB for a
    state). Measured at T = 1024: gated_delta 1.8 MiB chunked against 1.9 MiB recurrent; kda 5.3 MiB against
    2.2 MiB, since one chunk's per-key-channel work arrays ([C, C, K] decays and products, about 4 MiB at
    K = 32) are a fixed cost that the recurrent form does not have: asserted below a dozen such arrays."""
    m = gen[name]
    K, C = 32, 64

    def temp(T, form, **kw):
        q, k, v, params, inputs = make_inputs(0, name, b=1, t=T, h=1, k=K, v=K, dtype=np.float32)
        loss = lambda q, k, v, g, b: jnp.sum(m.forward(q, k, v, params, form=form, g=g, beta=b, **kw)[0])  # noqa: E731
        return _temp_bytes(loss, q, k, v, inputs["g"], inputs["beta"])

    c1024, c2048 = (temp(T, "chunked", chunk_size=C) for T in (1024, 2048))
    slope = (c2048 - c1024) / 1024
    assert 0 < slope < K * K * 4 / 2, (c1024, c2048)
    assert c2048 < 2.2 * c1024, (c1024, c2048)                           # not faster than linear in T
    recurrent = temp(1024, "recurrent")
    if name == "gated_delta":
        assert c1024 < 1.5 * recurrent, (c1024, recurrent)
    else:
        assert c1024 - 1024 * slope < 12 * C * C * K * 4, (c1024, slope, recurrent)


# ----------------------------------------------------------------------------------------------------------------
# The exact chunkwise ridge (mesa) form: prefix Woodbury per chunk, custom VJP by implicit differentiation.


def ridge_args(m, T, seed=0, b=B, lam=None, spread=1.0):
    """q, k, v, params and a reachable (SPD) initial state (S, P = (M Mᵀ + λI)⁻¹), float64; keys scaled by a
    factor geometric in t from 1 to ``spread`` (a conditioning knob)."""
    q, k, v, params, _ = make_inputs(seed, "ridge", b=b, t=T, h=H, k=K, v=V)
    if lam is not None:
        params = {"lam": np.full(H, lam)}
    k = k * np.geomspace(1.0, spread, max(T, 1))[None, :T, None, None]
    rng = np.random.default_rng(seed + 1)
    M = rng.standard_normal((b, H, K, K))
    P = np.linalg.inv(0.3 * M @ np.swapaxes(M, -1, -2) + params["lam"][None, :, None, None] * np.eye(K))
    return q, k, v, params, m.State(0.3 * rng.standard_normal((b, H, K, V)), P)


def ridge_value_and_grads(m, form, q, k, v, params, state, seed=5, **kw):
    """Outputs, final state and the gradients w.r.t. q, k, v, λ, initial state of ⟨do, o⟩ + ⟨dS, final⟩; and,
    from the default initial state (P₀ = I/λ, where λ acts), the gradients w.r.t. q, k, v and λ."""
    rng = np.random.default_rng(seed)
    do = rng.standard_normal(q.shape[:3] + (V,))
    dS = [rng.standard_normal(x.shape) for x in state]

    def f(q, k, v, params, state):
        o, fin = m.forward(q, k, v, params, initial_state=state, output_final_state=True, form=form, **kw)
        return jnp.sum(o * do) + sum(jnp.sum(a * b) for a, b in zip(fin, dS)), (o, fin)

    def g(q, k, v, params):
        o, fin = m.forward(q, k, v, params, output_final_state=True, form=form, **kw)
        return jnp.sum(o * do) + sum(jnp.sum(a * b) for a, b in zip(fin, dS))

    # both gradients in one jitted program (eagerly: four compiles, each forward and backward apart)
    return jax.jit(lambda q, k, v, p, s: (jax.grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, p, s),
                                          jax.grad(g, argnums=(0, 1, 2, 3))(q, k, v, p)))(q, k, v, params, state)


@pytest.mark.parametrize("T,sizes", [(1, (64,)), (7, (1, 3)), (40, (16,))])
def test_ridge_chunked_equals_recurrent_with_every_gradient(gen, x64, T, sizes):
    """Outputs, final states and the gradients of q, k, v, λ and the initial state (S, P) agree with the recurrent
    form to ≤ 1e-10 relative in float64: T = 1, T < C, T a multiple of C (C = 1), not a multiple (a padded
    tail). Measured: ≤ 6e-15."""
    m = gen["ridge"]
    q, k, v, params, state = ridge_args(m, T)
    want = ridge_value_and_grads(m, "recurrent", q, k, v, params, state)
    assert float(np.max(np.abs(want[1][3]["lam"]))) > 0
    for C in sizes:
        assert_close(ridge_value_and_grads(m, "chunked", q, k, v, params, state, chunk_size=C), want, (T, C),
                     rtol=RIDGE_TOL)


def test_ridge_chunked_ill_conditioned(gen, x64):
    """cond(Ā_t) about 1e4 (λ = 1e-3, keys growing threefold over T = 40): still ≤ 1e-10 relative to the recurrent
    form, outputs, states and every gradient (C = 16: two chunks and a tail)."""
    m = gen["ridge"]
    q, k, v, params, state = ridge_args(m, 40, seed=7, lam=1e-3, spread=3.0)
    A = np.cumsum(np.einsum("bthk,bthj->bthkj", k, k), axis=1) + 1e-3 * np.eye(K)
    assert 3e3 < np.max(np.linalg.cond(A)) < 3e4
    want = ridge_value_and_grads(m, "recurrent", q, k, v, params, state)
    assert_close(ridge_value_and_grads(m, "chunked", q, k, v, params, state, chunk_size=16), want, "ill",
                 rtol=RIDGE_TOL)


def test_ridge_chunked_continues_from_a_final_state(gen, x64):
    """Prefill 7 tokens chunked, then 6 more from its final state: one 13-token recurrent call's outputs and
    state; the empty sequence returns the initial state."""
    m = gen["ridge"]
    q, k, v, params, state = ridge_args(m, 13, seed=2)
    first = m.forward(q[:, :7], k[:, :7], v[:, :7], params, initial_state=state, output_final_state=True,
                      form="chunked", chunk_size=3)
    second = m.forward(q[:, 7:], k[:, 7:], v[:, 7:], params, initial_state=first[1], output_final_state=True,
                       form="chunked", chunk_size=4)
    want = m.forward(q, k, v, params, initial_state=state, output_final_state=True)
    assert_close((jnp.concatenate([first[0], second[0]], axis=1), second[1]), want, "continue", rtol=RIDGE_TOL)
    o, fin = m.forward(q[:, :0], k[:, :0], v[:, :0], params, initial_state=state, output_final_state=True,
                       form="chunked")
    assert o.shape == (B, 0, H, V)
    np.testing.assert_array_equal(fin[1], state[1])


def test_ridge_chunked_transforms_compose(gen, x64):
    """T = 5 in chunks of 2 (several chunks and a padded tail; tests/test_transforms.py covers every transformation
    with one chunk): jit, vmap of per-example calls (λ unbatched) and grad of the vmapped loss equal the recurrent
    form; jvp is refused (a custom VJP), with JAX's message."""
    m = gen["ridge"]
    q, k, v, params, state = ridge_args(m, 5, seed=11, b=3)
    kw = dict(form="chunked", chunk_size=2)

    def one(q, k, v, state, lam):
        o, fin = m.forward(q[None], k[None], v[None], {"lam": lam}, output_final_state=True,
                           initial_state=jax.tree.map(lambda x: x[None], state), **kw)
        return o[0], jax.tree.map(lambda x: x[0], fin)

    want = m.forward(q, k, v, params, initial_state=state, output_final_state=True)
    lam = jnp.asarray(params["lam"])
    assert_close(jax.jit(lambda *a: m.forward(*a, params, initial_state=state, output_final_state=True, **kw))(
        q, k, v), want, "jit", rtol=RIDGE_TOL)
    assert_close(jax.vmap(one, in_axes=(0, 0, 0, 0, None))(q, k, v, state, lam), want, "vmap", rtol=RIDGE_TOL)

    def loss(q, k, v, lam):
        return jnp.sum(jax.vmap(one, in_axes=(0, 0, 0, 0, None))(q, k, v, state, lam)[0] ** 2)

    def loss_rec(q, k, v, lam):
        return jnp.sum(m.forward(q, k, v, {"lam": lam}, initial_state=state)[0] ** 2)

    assert_close(jax.jit(jax.grad(loss, (0, 1, 2, 3)))(q, k, v, lam), jax.grad(loss_rec, (0, 1, 2, 3))(q, k, v, lam),
                 "grad of vmap", rtol=RIDGE_TOL)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda q: m.forward(q, k, v, params, **kw)[0], (q,), (q,))


def test_ridge_chunked_backward_stores_chunk_boundary_statistics(gen):
    """T = 4096, K = V = 64, C = 64, float32, B = H = 1. The compiled grad's temporary memory (XLA:CPU) is far below
    one state per token (T·K² floats = 64 MiB) and close to the recurrent form's (√T checkpoints plus one
    segment of per-token states). Measured: 12.0 MiB chunked (stored between forward and backward: the inputs,
    3 MiB, and the statistics entering each of the 64 chunks, 2 MiB; the rest is the backward's transient work
    arrays) against 11.1 MiB recurrent."""
    m = gen["ridge"]
    T, K = MEM_T, MEM_K
    q, k, v, params, _ = make_inputs(0, "ridge", b=1, t=T, h=1, k=K, v=K, dtype=np.float32)

    def loss(form, **kw):
        return lambda q, k, v: jnp.sum(m.forward(q, k, v, params, form=form, **kw)[0])

    chunked = _temp_bytes(loss("chunked", chunk_size=64), q, k, v)
    recurrent = _temp_bytes(loss("recurrent"), q, k, v)
    per_token_states = T * K * K * 4
    assert chunked < per_token_states / 4, (chunked, per_token_states)
    assert chunked < 1.5 * recurrent, (chunked, recurrent)


# ----------------------------------------------------------------------------------------------------------------
# The chunked form over the running statistics (gd's GD polynomial, rls_forgetting's decayed ridge with a decaying
# regulariser, mesanet's conjugate-gradient solve): every position's Ā_t, C̄_t from the sums entering the chunk,
# x_t = M(Ā_t) q_t by the layer's own preconditioner, autodiff through a checkpointed scan over chunks.


def stats_args(m, name, T, seed=0, b=B):
    """q, k, v, params, time-varying gates / β, and a reachable initial state (rls_forgetting: P SPD; mesanet: the
    Gram sum PSD), float64."""
    q, k, v, params, inputs, state = args_for(m, name, T, seed=seed, b=b)
    rng = np.random.default_rng(seed + 2)
    M = rng.standard_normal((b, H, K, K))
    gram = 0.3 * M @ np.swapaxes(M, -1, -2)
    if name == "rls_forgetting":
        state = m.State(state[0], np.linalg.inv(gram + np.eye(K)))
    if name == "mesanet":
        state = m.State(state[0], gram)
    return q, k, v, params, inputs, state


def symmetric_state_grads(out):
    """The gradient of a symmetric state field (rls_forgetting's P = Ā⁻¹) as its symmetric part: only symmetric
    perturbations are meaningful, and the recurrent form's autodiff reads P as a general matrix while the chunked
    form reads it through a symmetric solve."""
    (vals, grads) = out
    state_g = grads[5]
    if "P" in state_g._fields:
        state_g = state_g._replace(P=(state_g.P + jnp.swapaxes(state_g.P, -1, -2)) / 2)
    return vals, grads[:5] + (state_g,)


# rls_forgetting: the recurrent form's Sherman–Morrison steps divide P by α at every token and carry their rounding
# (the chunked form solves each Ā_t afresh), so the two agree to the ridge family's 1e-10 (measured ≤ 2e-12).
STATS_TOL = {"gd": RTOL, "rls_forgetting": RIDGE_TOL, "mesanet": RTOL}
STATS_CASES = {"gd": ((70, (16,)), (7, (16,))),                     # (T, chunk sizes): T = 1, 7, 70 and C = 16, 64
               "rls_forgetting": ((70, (16, 64)), (1, (64,))),        # spread over the specs (suite time); T ≤ C is
               "mesanet": ((70, (64,)),)}                             # the template's one-chunk path


@pytest.mark.parametrize("name", STATS)
def test_stats_chunked_equals_recurrent_with_every_gradient(gen, x64, name):
    """Outputs, final state and the gradients of q, k, v, the parameters (η, λ), gates g, importance β and the
    initial state agree with the recurrent form to ≤ 1e-12 relative in float64: T = 70 in chunks of 16 (four and
    a padded tail) and 64 (one and a tail), T = 7 and T = 1 (one short chunk); random time-varying gates and β,
    a reachable nonzero initial state (rls_forgetting to 1e-10, see STATS_TOL). For rls_forgetting, whose λ acts through the default initial state only,
    also the gradients from that state."""
    m = gen[name]
    for T, sizes in STATS_CASES[name]:
        q, k, v, params, inputs, state = stats_args(m, name, T)
        want = symmetric_state_grads(value_and_grads(m, "recurrent", q, k, v, params, inputs, state))
        acting = want[1][:3] + want[1][3 + (name == "rls_forgetting"):]   # rls_forgetting's λ: default state only
        assert all(float(np.max(np.abs(g))) > 0 for g in jax.tree.leaves(acting))
        for C in sizes:
            got = symmetric_state_grads(value_and_grads(m, "chunked", q, k, v, params, inputs, state, chunk_size=C))
            assert_close(got, want, (name, T, C), rtol=STATS_TOL[name])
    if name != "rls_forgetting":
        return
    q, k, v, params, inputs, _ = stats_args(m, name, 7, seed=4)        # T = 7, C = 16: from the default state

    def loss(form, **kw):
        return lambda q, k, v, p, i: jnp.sum(jnp.sin(m.forward(q, k, v, p, form=form, **kw, **i)[0]))

    want = jax.grad(loss("recurrent"), argnums=(0, 1, 2, 3, 4))(q, k, v, params, inputs)
    assert float(np.max(np.abs(want[3]["lam"]))) > 0
    assert_close(jax.grad(loss("chunked", chunk_size=16), argnums=(0, 1, 2, 3, 4))(q, k, v, params, inputs), want,
                 (name, "default state"), rtol=STATS_TOL[name])


def test_stats_chunked_vmap_and_causality_with_several_chunks(gen, x64):
    """T = 5 in chunks of 2 (several chunks, a padded tail; tests/test_transforms.py and tests/test_nonfinite.py
    cover every transformation, continuing from a final state and the causality guard for every spec and form
    with one chunk). gd: vmap of per-example calls (η unbatched) and grad of the vmapped loss equal the recurrent
    form. rls_forgetting: NaN in k at position 3 leaves the outputs before it, and the gradients of a loss on them, finite
    and equal to a clean run's."""
    m = gen["gd"]
    q, k, v, params, inputs, state = stats_args(m, "gd", 5, seed=11, b=3)
    kw = dict(form="chunked", chunk_size=2)

    def one(q, k, v, inputs, state):
        o, fin = m.forward(q[None], k[None], v[None], params, initial_state=jax.tree.map(lambda x: x[None], state),
                           output_final_state=True, **kw, **{n: x[None] for n, x in inputs.items()})
        return o[0], jax.tree.map(lambda x: x[0], fin)

    want = m.forward(q, k, v, params, initial_state=state, output_final_state=True, **inputs)
    assert_close(jax.vmap(one)(q, k, v, inputs, state), want, "vmap")

    def loss_vmap(q, k, v, inputs):
        return jnp.sum(jax.vmap(one)(q, k, v, inputs, state)[0] ** 2)

    def loss_rec(q, k, v, inputs):
        return jnp.sum(m.forward(q, k, v, params, initial_state=state, **inputs)[0] ** 2)

    assert_close(jax.grad(loss_vmap, (0, 1, 2, 3))(q, k, v, inputs), jax.grad(loss_rec, (0, 1, 2, 3))(q, k, v, inputs),
                 "grad of vmap")

    m = gen["rls_forgetting"]
    q, k, v, params, inputs, state = stats_args(m, "rls_forgetting", 5, seed=11, b=1)
    dirty = np.array(k)
    dirty[0, 3, 0, 1] = np.nan
    w = np.random.default_rng(2).standard_normal(q.shape[:3] + (V,))
    w[:, 3:] = 0

    def loss_nan(q, kk, v):
        o = m.forward(q, kk, v, params, initial_state=state, **kw, **inputs)[0]
        return jnp.sum(w * o), o

    (g, o), (g_clean, o_clean) = (jax.grad(loss_nan, (0, 1, 2), has_aux=True)(q, kk, v) for kk in (dirty, k))
    np.testing.assert_allclose(o[:, :3], o_clean[:, :3], rtol=1e-12, atol=0)
    assert not bool(jnp.all(jnp.isfinite(o[0, 3:])))
    for a, b in zip(g, g_clean):
        assert bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-300)


def test_stats_chunked_strong_gates(gen, x64):
    """rls_forgetting with log gates uniform in [−5, 0] over T = 70 from a random initial state, C = 64: a chunk's
    cumulative log gate reaches about −160, where a factorised form's exp(−b_i) would reach 1e69 (float32: inf);
    every weight here is exp of a number ≤ 0. Outputs, final state and every gradient equal the closed form's
    (the explicit solve per position) to 1e-10 in float64; float32 stays finite and within 1e-3 of it. The
    recurrent form is not the reference here: its Sherman–Morrison steps divide P by α ≈ e⁻⁵ and diverge from
    the exact solution (measured: 0.66 relative error in o at T = 70)."""
    m = gen["rls_forgetting"]
    q, k, v, params, inputs, state = stats_args(m, "rls_forgetting", 70)
    inputs = {"g": -np.random.default_rng(4).uniform(0.0, 5.0, inputs["g"].shape)}
    want = value_and_grads(m, "closed_form", q, k, v, params, inputs, state)
    assert_close(value_and_grads(m, "chunked", q, k, v, params, inputs, state, chunk_size=64), want, "strong gates",
                 rtol=RIDGE_TOL)
    f32 = lambda x: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), x)  # noqa: E731
    o, fin = m.forward(*f32((q, k, v)), f32(params), initial_state=f32(state), output_final_state=True,
                       form="chunked", **f32(inputs))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in (o, *fin))
    assert rel(o, want[0][0]) <= 1e-3


def test_stats_chunked_backward_memory_grows_without_per_token_states(gen):
    """gd (the form's memory does not depend on the preconditioner; the cheapest to compile): temporary bytes of the
    compiled fwd+bwd at T = 1024 and 2048 (B = H = 1, K = V = 32, C = 64, float32) grow by less than half a state,
    (K² + K·V)·4 bytes, per token — only the statistics entering each chunk are kept — and stay within 1.5× of the
    recurrent form's. Measured (XLA:CPU): 1.77 and 2.54 MiB (0.75 kB per token, against 8 kB for a state), recurrent
    1.62 MiB at T = 1024; rls_forgetting 3.07 / 3.71 MiB."""
    m = gen["gd"]
    K, C = 32, 64

    def temp(T, form, **kw):
        q, k, v, params, _ = make_inputs(0, "gd", b=1, t=T, h=1, k=K, v=K, dtype=np.float32)
        return _temp_bytes(lambda q, k, v: jnp.sum(m.forward(q, k, v, params, form=form, **kw)[0]), q, k, v)

    c1024, c2048 = (temp(T, "chunked", chunk_size=C) for T in (1024, 2048))
    slope = (c2048 - c1024) / 1024
    assert 0 < slope < (K * K + K * K) * 4 / 2, (c1024, c2048)
    assert c1024 < 1.5 * temp(1024, "recurrent"), c1024

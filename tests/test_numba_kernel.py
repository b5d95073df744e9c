"""The Numba CPU modules of the kernel-regression layers (softmax, forgetting_attn; docs/family.md §9).

Forward outputs and final KV caches against the float64 reference (mesagen.reference.attention, the cache entering
as leading tokens: numba_cases.reference_kernel) to 1e-10; every gradient of ``backward`` (q, k, v, the gate, the
initial cache) against reverse-mode autodiff of the generated JAX module (itself checked against finite differences
of the reference in tests/test_kernel_attention.py) to 1e-10; T = 1 and T = 7; step == forward; continuation through
the cache; logits ~ 1e3 in float32; non-finite inputs stay causal; cu_seqlens == separate calls. The CUDA modules
run the same checks in the simulator (tests/cuda/sim_checks.py) against this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numba_cases import KERNEL_LAYERS, B, H, K, V, close, module, reference_kernel


def _data(name, seed, t=7, big=1.0):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, B, t, H, K))
    v, do = rng.standard_normal((2, B, t, H, V))
    ins = {"g": np.log(rng.uniform(0.3, 1.0, (B, t, H)))} if name == "forgetting_attn" else {}
    return q * big, k, v, do, ins


def _prefix_cache(m, q, k, v, ins, s=3, capacity=2):
    """The KV cache after forward on s tokens from an empty cache of the given capacity (slack slots included)."""
    st0 = m.init_state(B, H, K, V, {}, np.float64, capacity=capacity)
    return m.forward(q[:, :s], k[:, :s], v[:, :s], {}, initial_state=st0, output_final_state=True,
                     **{n: x[:, :s] for n, x in ins.items()})[1]


@pytest.mark.parametrize("t", [7, 1], ids=["T7", "T1"])
@pytest.mark.parametrize("name", KERNEL_LAYERS)
def test_forward_matches_reference(name, t):
    """o and the final cache equal the float64 reference, from an empty cache and from a filled one."""
    m = module(name, "numba_cpu")
    q, k, v, _, ins = _data(name, 1, t)
    o, st = m.forward(q, k, v, {}, output_final_state=True, **ins)
    ro, rst = reference_kernel(q, k, v, ins.get("g"))
    close(o, ro)
    for f in st._fields:
        close(getattr(st, f), rst[f])
    assert o.dtype == np.float64 and st.length.dtype == np.int32 and st.k.shape == (B, H, t, K)
    cache = _prefix_cache(m, *_data(name, 2)[:3], _data(name, 2)[4])
    o, st = m.forward(q, k, v, {}, initial_state=cache, output_final_state=True, **ins)
    ro, rst = reference_kernel(q, k, v, ins.get("g"), initial_state=cache._asdict())
    close(o, ro)
    for f in st._fields:
        close(getattr(st, f), rst[f])


@pytest.mark.parametrize("name", KERNEL_LAYERS)
def test_step_and_continuation(name):
    """step token by token == forward (outputs and cache); forward on a prefix then on the rest from its cache ==
    one forward; a full cache is refused; the final cache equals layer_jax.py's."""
    m, jm = module(name, "numba_cpu"), module(name, "jax")
    q, k, v, _, ins = _data(name, 3)
    o, fin = m.forward(q, k, v, {}, output_final_state=True, **ins)
    st = m.init_state(B, H, K, V, {}, np.float64, capacity=7)
    for t in range(7):
        o_t, st = m.step(st, q[:, t], k[:, t], v[:, t], {}, **{n: x[:, t] for n, x in ins.items()})
        close(o_t, o[:, t], rtol=1e-12)
    for a, b in zip(st, fin):
        close(a, b, rtol=1e-12)
    with pytest.raises(ValueError, match="KV cache is full"):
        m.step(st, q[:, 0], k[:, 0], v[:, 0], {}, **{n: x[:, 0] for n, x in ins.items()})
    s1 = _prefix_cache(m, q, k, v, ins)
    o2, s2 = m.forward(q[:, 3:], k[:, 3:], v[:, 3:], {}, initial_state=s1, output_final_state=True,
                       **{n: x[:, 3:] for n, x in ins.items()})
    o1 = m.forward(q[:, :3], k[:, :3], v[:, :3], {}, **{n: x[:, :3] for n, x in ins.items()})[0]
    close(np.concatenate([o1, o2], 1), o, rtol=1e-12)
    assert s2.k.shape[2] == 2 + 7 and list(s2.length) == [7] * B
    with jax.enable_x64(True):
        jo, jfin = jm.forward(jnp.asarray(q), k, v, {}, output_final_state=True, **ins)
    close(o, jo)
    for a, b in zip(fin, jfin):
        close(a, b)


def _jax_grads(name, q, k, v, do, ins, cache):
    """Autodiff of L = Σ o ⊙ do + ½ Σ ‖final k, v, g‖² through layer_jax.py (float64): (dq, dk, dv, dins, dcache)."""
    jm = module(name, "jax")
    with jax.enable_x64(True):
        def loss(q, k, v, ins, kc, vc, gc):
            st = jm.State(kc, vc, gc, jnp.asarray(cache.length))
            o, fin = jm.forward(q, k, v, {}, initial_state=st, output_final_state=True, **ins)
            return jnp.sum(o * do) + sum(jnp.sum(x * x) for x in fin[:3]) / 2

        args = [jnp.asarray(x) for x in (q, k, v)] + [{n: jnp.asarray(x) for n, x in ins.items()}]
        args += [jnp.asarray(x) for x in cache[:3]]
        return [jax.tree.map(np.asarray, g) for g in jax.grad(loss, argnums=tuple(range(7)))(*args)]


@pytest.mark.parametrize("t", [7, 1], ids=["T7", "T1"])
@pytest.mark.parametrize("name", KERNEL_LAYERS)
def test_backward_matches_jax_autodiff(name, t):
    """Every gradient (q, k, v, the gate, the initial cache's k, v, g) with a given cache and a final-cache
    cotangent, float64 to 1e-10; an empty initial cache gives a zero-capacity dinitial_state."""
    m = module(name, "numba_cpu")
    q, k, v, do, ins = _data(name, 4, t)
    cache = _prefix_cache(m, *_data(name, 5)[:3], _data(name, 5)[4])
    _, fin = m.forward(q, k, v, {}, initial_state=cache, output_final_state=True, **ins)
    got = m.backward(q, k, v, {}, do, initial_state=cache, dfinal_state=fin, **ins)
    dq, dk, dv, dins, dk0, dv0, dg0 = _jax_grads(name, q, k, v, do, ins, cache)
    close(got["dq"], dq)
    close(got["dk"], dk)
    close(got["dv"], dv)
    if ins:
        close(got["dg"], dins["g"])
    for a, b in zip(got["dinitial_state"][:3], (dk0, dv0, dg0)):
        close(a, b)
    plain = m.backward(q, k, v, {}, do, **ins)
    assert plain["dinitial_state"].k.shape == (B, H, 0, K) and sorted(plain) == sorted(got)


@pytest.mark.parametrize("name", KERNEL_LAYERS)
def test_large_logits_and_float32(name):
    """Logits ~ 1e3 (exp overflows float32 at 88): float32 outputs and gradients are finite, the outputs close to
    the float64 reference; unit-scale float32 within 2e-5 of it (README, Numerics); T = 1 gives v."""
    m = module(name, "numba_cpu")
    q, k, v, do, ins = _data(name, 6, big=300.0)
    assert np.abs(np.einsum("bthk,bshk->bhts", q, k) * K ** -0.5).max() > 500
    ro, _ = reference_kernel(q, k, v, ins.get("g"))
    f32 = {n: x.astype(np.float32) for n, x in ins.items()}
    o, _ = m.forward(q.astype(np.float32), k, v, {}, **f32)
    assert o.dtype == np.float32 and np.all(np.isfinite(o))
    np.testing.assert_allclose(o, ro, rtol=0, atol=2e-3)
    g = m.backward(q.astype(np.float32), k, v, {}, do, **f32)
    assert all(np.all(np.isfinite(x)) for n, x in g.items() if n != "dinitial_state")
    q, k, v, do, ins = _data(name, 7)
    ro, _ = reference_kernel(q, k, v, ins.get("g"))
    o, _ = m.forward(q.astype(np.float32), k, v, {}, **{n: x.astype(np.float32) for n, x in ins.items()})
    close(o, ro, rtol=2e-5)
    o1, _ = m.forward(q[:, :1].astype(np.float32), k[:, :1], v[:, :1], {}, **{n: x[:, :1] for n, x in ins.items()})
    np.testing.assert_allclose(o1, v[:, :1], atol=1e-6)


@pytest.mark.parametrize("name", KERNEL_LAYERS)
def test_nonfinite_inputs_stay_causal(name):
    """NaN / ±inf at position s leave outputs at t < s and the gradients of Σ_{t<s} o_t at t < s unchanged (and
    exact zeros at t ≥ s); a gate of −inf decays every earlier key to exactly 0."""
    m = module(name, "numba_cpu")
    q, k, v, do, ins = _data(name, 8)
    s = 4
    qn, kn, vn = q.copy(), k.copy(), v.copy()
    qn[:, s] = np.nan
    kn[:, s, 1, 0] = -np.inf
    vn[:, s + 1, 0, 1] = np.inf
    insn = {n: x.copy() for n, x in ins.items()}
    for x in insn.values():
        x[:, s + 1] = np.nan
    o = m.forward(qn, kn, vn, {}, **insn)[0]
    close(o[:, :s], m.forward(q, k, v, {}, **ins)[0][:, :s])
    dom = do.copy()
    dom[:, s:] = 0
    g, g0 = m.backward(qn, kn, vn, {}, dom, **insn), m.backward(q, k, v, {}, dom, **ins)
    for n in ("dq", "dk", "dv") + tuple("d" + x for x in ins):
        close(g[n][:, :s], g0[n][:, :s])
        assert np.all(g[n][:, s:] == 0), n
    if ins:
        gate = ins["g"].copy()
        gate[:, 3] = -np.inf
        o = m.forward(q, k, v, {}, g=gate)[0]
        assert np.all(np.isfinite(o))
        cut = np.where(np.isfinite(gate), gate, 0)[:, 3:]  # log α_3 decays only keys before 3: none in the slice
        close(o[:, 3:], reference_kernel(q[:, 3:], k[:, 3:], v[:, 3:], cut)[0])


@pytest.mark.parametrize("name", KERNEL_LAYERS)
def test_cu_seqlens_equals_separate_calls(name):
    """Packed sequences (cu_seqlens) give the outputs, caches and gradients of separate calls."""
    m = module(name, "numba_cpu")
    q, k, v, do, ins = _data(name, 9, t=7)
    q, k, v, do = (x[:1] for x in (q, k, v, do))
    ins = {n: x[:1] for n, x in ins.items()}
    cu = np.array([0, 3, 7])
    o, fin = m.forward(q, k, v, {}, cu_seqlens=cu, output_final_state=True, **ins)
    g = m.backward(q, k, v, {}, do, cu_seqlens=cu, dfinal_state=fin, **ins)
    assert fin.k.shape == (2, H, 7, K) and list(fin.length) == [3, 4]
    for n, (a, b) in enumerate(((0, 3), (3, 7))):
        part = {x: y[:, a:b] for x, y in ins.items()}
        o1, f1 = m.forward(q[:, a:b], k[:, a:b], v[:, a:b], {}, output_final_state=True, **part)
        close(o[:, a:b], o1, rtol=0)
        close(fin.k[n:n + 1, :, :b - a], f1.k, rtol=0)
        g1 = m.backward(q[:, a:b], k[:, a:b], v[:, a:b], {}, do[:, a:b], dfinal_state=f1, **part)
        for x in ("dq", "dk", "dv") + tuple("d" + y for y in ins):
            close(g[x][:, a:b], g1[x], rtol=0)


def test_arguments_are_checked():
    """Errors name the argument: params, form, dtype, gate domain, initial_state, capacity, scale."""
    m = module("forgetting_attn", "numba_cpu")
    q, k, v, do, ins = _data("forgetting_attn", 10)
    with pytest.raises(ValueError, match="params must be an empty dict"):
        m.forward(q, k, v, {"x": 1.0}, **ins)
    with pytest.raises(ValueError, match="unknown form"):
        m.forward(q, k, v, {}, form="chunked", **ins)
    with pytest.raises(ValueError, match="must be float32 or float64"):
        m.forward(q.astype(np.int32), k, v, {}, **ins)
    with pytest.raises(ValueError, match="outside its domain"):
        m.forward(q, k, v, {}, g=-ins["g"] + 0.1)
    with pytest.raises(ValueError, match="inputs must be exactly"):
        m.forward(q, k, v, {})
    with pytest.raises(ValueError, match="initial_state must be a State"):
        m.forward(q, k, v, {}, initial_state=(1, 2), **ins)
    with pytest.raises(ValueError, match=r"initial_state.length must lie in"):
        st = m.init_state(B, H, K, V, {}, np.float64, capacity=1)
        m.forward(q, k, v, {}, initial_state=st._replace(length=np.array([2, 0])), **ins)
    with pytest.raises(ValueError, match="capacity must be"):
        m.init_state(B, H, K, V, {}, np.float64, capacity=-1)
    with pytest.raises(ValueError, match="scale must be"):
        m.forward(q, k, v, {}, scale=float("nan"), **ins)
    with pytest.raises(ValueError, match="do must have shape"):
        m.backward(q, k, v, {}, do[..., :2], **ins)
    o, _ = m.forward(q, k, v, {}, scale=0.7, **ins)
    close(o, reference_kernel(q, k, v, ins["g"], scale=0.7)[0])

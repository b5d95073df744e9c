"""Every JAX transformation composes with every generated layer (issue 7, item 3).

For every shipped spec and form, in float64, against per-example Python loops of the same calls: jit; vmap of
per-example ``forward(q[None], ...)`` with parameters batched (in_axes 0) and unbatched (None), N = T and
N ≠ T; grad and vjp of vmap for every argument (q, k, v, parameters, per-token inputs, initial state); jvp;
``jax.checkpoint`` around forward; a ``lax.scan`` over chunks carrying the state; ``step`` under jit and vmap;
and the issue's exact case (grad of vmap of ridge, H=1, K=V=2, λ unbatched, N=2 T=3 and N=T=3).

Suite time: the vmapped calls, their vjp and the grads run under jax.jit, one XLA program per spec × form and
check, shared by the tests that need it (``jitted``); the per-example references stay eager, and the issue's
case runs eagerly throughout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import KERNEL, SHIPPED, load_generated, make_inputs

pytestmark = pytest.mark.usefixtures("x64")

CASES = [(n, f) for n in SHIPPED for f in load_generated(n).FORMS]
RTOL = 1e-10
H, K, V = 2, 2, 3  # tiny: the matrix is about composition, not size


def real(x):
    """Whether a leaf holds real numbers (not an integer -- the kernel layers' cache length -- nor its float0
    cotangent / tangent)."""
    return jnp.issubdtype(np.asarray(x).dtype, jnp.floating)


def tangent_like(x, draw):
    """A random tangent or cotangent of leaf ``x``: ``draw(shape)``; float0 zeros for an integer leaf."""
    return draw(np.shape(x)) if real(x) else np.zeros(np.shape(x), jax.dtypes.float0)


def rel(a, b):
    """Largest absolute difference of two pytrees, relative to the largest entry of ``b`` (integer leaves and their
    float0 derivatives are compared exactly)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la, (len(la), len(lb))
    for x, y in zip(la, lb):
        if not (real(x) and real(y)):
            assert np.asarray(x).dtype == np.asarray(y).dtype, (np.asarray(x).dtype, np.asarray(y).dtype)
            if np.asarray(x).dtype != jax.dtypes.float0:
                np.testing.assert_array_equal(x, y)
    la, lb = zip(*[(x, y) for x, y in zip(la, lb) if real(x) and real(y)])
    num = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0)) for x, y in zip(la, lb))
    den = max(float(np.max(np.abs(np.asarray(y)), initial=0.0)) for y in lb)
    return num / max(den, 1e-300)


def example_args(m, name, N, T, seed=0, batched_params=False):
    """N examples: q, k, v [N, T, H, ·], params ([H] or [N, H]), inputs {n: [N, T, H]}, state ([N, H, ...])."""
    q, k, v, params, inputs = make_inputs(seed, name, b=N, t=T, h=H, k=K, v=V)
    rng = np.random.default_rng(seed + 100)
    if batched_params:
        params = {n: x[None] * (1 - 0.1 * rng.random((N,) + (1,) * x.ndim)) for n, x in params.items()}  # stays in (0, 1] too
    if name in KERNEL:  # a reachable KV cache: 2 random tokens in a cache with one free slot (capacity 3)
        pre = make_inputs(seed + 200, name, b=N, t=2, h=H, k=K, v=V)
        empty = m.init_state(N, H, K, V, {}, jnp.float64, capacity=1)
        state = m.forward(*pre[:4], initial_state=empty, output_final_state=True, **pre[4])[1]
        return q, k, v, params, inputs, jax.tree.map(np.asarray, state)
    base = m.init_state(N, H, K, V, {n: (x[0] if batched_params else x) for n, x in params.items()}, jnp.float64)
    state = type(base)(*(np.asarray(x) + 0.1 * rng.standard_normal(x.shape) for x in base))
    if name in ("ridge", "rls_forgetting"):  # P must stay symmetric positive definite: a small symmetric perturbation of I/λ
        P = np.asarray(base.P)
        eps = 0.05 * rng.standard_normal(P.shape)
        state = state._replace(P=P + 0.5 * (eps + np.swapaxes(eps, -1, -2)) * 0.1)
    if name == "mesanet":  # the Gram sum H stays symmetric positive semi-definite: a reachable state
        E = 0.3 * rng.standard_normal(np.shape(base.kk))
        state = state._replace(kk=np.asarray(base.kk) + E @ np.swapaxes(E, -1, -2))
    return q, k, v, params, inputs, state


def per_example(m, form):
    """forward on one example (no batch axis): (q, k, v, params, inputs, state) -> (o [T, H, V], final)."""

    def f(q, k, v, params, inputs, state):
        o, final = m.forward(q[None], k[None], v[None], params, initial_state=jax.tree.map(lambda x: x[None], state),
                             output_final_state=True, form=form, **{n: x[None] for n, x in inputs.items()})
        return o[0], jax.tree.map(lambda x: x[0], final)

    return f


def loop(f, args, batched_params):
    """Stack f over the leading axis of every argument (params shared unless batched_params): a Python loop."""
    q = args[0]
    outs = []
    for i in range(q.shape[0]):
        a = [x if j == 3 and not batched_params else jax.tree.map(lambda y: y[i], x) for j, x in enumerate(args)]
        outs.append(f(*a))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def axes(batched_params):
    return (0, 0, 0, 0 if batched_params else None, 0, 0)


#: Jitted transformations of one spec × form, built once per module and shared by the tests that need them (one XLA
#: compile serves several tests: each compile of a layer's forward costs about a second, the checks themselves
#: milliseconds). The references -- the per-example Python loops -- stay eager calls.
_JITTED: dict = {}


def jitted(kind, m, name, form, batched_params=False):
    """``kind`` "vmap": jit of ``[args, args_b] -> [vmap(per_example)(*args), the same with batched parameters]``;
    "vjp": jit of ``(args, ct) -> (vmap(per_example)(*args), its vjp applied to ct)``, where ``ct`` holds the real
    cotangent leaves and None for an integer leaf (its float0 cotangent is made inside: jit takes no float0
    argument)."""
    key = (kind, name, form, batched_params)
    if key not in _JITTED:
        vf = jax.vmap(per_example(m, form), in_axes=axes(batched_params))
        if kind == "vmap":
            vfs = [jax.vmap(per_example(m, form), in_axes=axes(b)) for b in (False, True)]
            _JITTED[key] = jax.jit(lambda all_args: [g(*a) for g, a in zip(vfs, all_args)])
        else:
            def run(args, ct):
                out, pull = jax.vjp(vf, *args)
                ct = jax.tree.map(lambda c, o: np.zeros(o.shape, jax.dtypes.float0) if c is None else c, ct, out,
                                  is_leaf=lambda c: c is None)
                return out, pull(ct)
            _JITTED[key] = jax.jit(run)
    return _JITTED[key]


@pytest.fixture(autouse=True, scope="module")
def _drop_jitted():
    """Forget the jitted functions at the end of the module (conftest then drops their executables)."""
    yield
    _JITTED.clear()


def real_or_none(tree):
    """``tree`` with its integer / float0 leaves replaced by None (for :func:`jitted`'s ``ct``)."""
    return jax.tree.map(lambda x: x if real(x) else None, tree)


@pytest.mark.parametrize("name,form", CASES)
def test_jit_and_vmap_equal_the_loop(gen, name, form):
    """jit of a per-example call, and vmap of per-example calls with N = T, parameters unbatched and batched
    (test_vjp_of_vmap checks the vmapped outputs with N ≠ T)."""
    m = gen[name]
    f = per_example(m, form)
    cases = [(3, 3, False), (3, 3, True)]
    all_args = [example_args(m, name, N, T, seed=N, batched_params=batched) for N, T, batched in cases]
    got = jitted("vmap", m, name, form)(all_args)  # both vmaps in one XLA program
    for (N, T, batched), args, out in zip(cases, all_args, got):
        assert rel(out, loop(f, args, batched)) <= RTOL, (N, T, batched)
    one = [jax.tree.map(lambda y: y[0], x) for x in args]  # the last args have batched parameters
    assert rel(jax.jit(f)(*one), f(*one)) <= RTOL


@pytest.mark.parametrize("name,form", CASES)
@pytest.mark.parametrize("batched_params,N,T", [(False, 2, 3), (True, 4, 3)],
                         ids=["params_unbatched-N!=T", "params_batched-N!=T"])
def test_vjp_of_vmap(gen, name, form, batched_params, N, T):
    """vjp of vmap w.r.t. every argument equals the per-example loop's, for a random cotangent of the outputs and
    the final state (grad is this vjp with the loss's cotangent: see the issue case and the checkpoint test)."""
    m = gen[name]
    args = example_args(m, name, N, T, seed=N * 10 + T, batched_params=batched_params)
    f = per_example(m, form)
    lf = lambda *a: loop(f, a, batched_params)  # noqa: E731
    out_l, pull_l = jax.vjp(lf, *args)
    ct = jax.tree.map(lambda x: tangent_like(x, np.random.default_rng(1).standard_normal), out_l)
    out, grads = jitted("vjp", m, name, form, batched_params)(args, real_or_none(ct))
    assert rel(out, out_l) <= RTOL
    names = ("q", "k", "v", "params", "inputs", "initial_state")
    for n, a, b in zip(names, grads, pull_l(ct)):
        if jax.tree.leaves(b):  # delta has no parameters, the others no inputs
            assert rel(a, b) <= RTOL, n


@pytest.mark.parametrize("name,form", CASES)
def test_jvp_of_vmap_forward_mode(gen, name, form):
    """Forward mode: jvp of vmap equals the loop's jvp, and ⟨jvp(t), c⟩ = ⟨t, vjp(c)⟩."""
    m = gen[name]
    args = example_args(m, name, 2, 3, seed=3)
    f = per_example(m, form)
    vf = jax.vmap(f, in_axes=axes(False))
    rng = np.random.default_rng(4)
    tangents = jax.tree.map(lambda x: tangent_like(x, rng.standard_normal), args)
    if name == "ridge" and form in ("recurrent", "chunked"):
        # the implicit-differentiation backwards are custom VJPs: forward mode is refused, with JAX's message
        # (documented in docs/layers.md; form="closed_form" has forward mode)
        with pytest.raises(TypeError, match="custom_vjp"):
            jax.jvp(vf, args, tangents)
        return
    out, tan = jax.jvp(vf, args, tangents)
    out_l, tan_l = jax.jvp(lambda *a: loop(f, a, False), args, tangents)
    assert rel(out, out_l) <= RTOL and rel(tan, tan_l) <= RTOL
    ct = jax.tree.map(lambda x: tangent_like(x, rng.standard_normal), out)
    pulled = jitted("vjp", m, name, form)(args, real_or_none(ct))[1]  # test_vjp_of_vmap's program (N=2, T=3)
    dot = lambda a, b: sum(float(jnp.sum(x * y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))  # noqa
                           if real(x) and real(y))
    lhs, rhs = dot(tan, ct), dot(tangents, pulled)
    assert abs(lhs - rhs) <= RTOL * max(1.0, abs(lhs))


@pytest.mark.parametrize("name,form", CASES)
def test_grad_of_vmap_and_of_checkpoint(gen, name, form):
    """grad of a loss of vmap, and grad of vmap of jax.checkpoint(forward), both under one jit, equal the loop's
    (eager) grad. The loss weighs the outputs and the final state's real leaves (the loop's backward is then the
    one test_vjp_of_vmap compiled for the same shapes, N = 2, T = 3)."""
    m = gen[name]
    args = example_args(m, name, 2, 3, seed=5)
    f = per_example(m, form)
    rng = np.random.default_rng(6)
    w = rng.standard_normal((2, 3, H, V))
    final_shape = jax.eval_shape(jax.vmap(f, in_axes=axes(False)), *args)[1]
    u = [rng.standard_normal(x.shape) if jnp.issubdtype(x.dtype, jnp.floating) else None
         for x in jax.tree.leaves(final_shape)]

    def weigh(out):
        o, final = out
        return jnp.sum(w * o) + sum(jnp.sum(a * x) for a, x in zip(u, jax.tree.leaves(final)) if a is not None)

    def loss(fn):
        return lambda *a: weigh(jax.vmap(fn, in_axes=axes(False))(*a))

    kw = {"allow_int": True}  # the kernel layers' cache length is an int32 leaf (its gradient: float0)
    g, g_ck = jax.jit(lambda *a: (jax.grad(loss(f), argnums=tuple(range(6)), **kw)(*a),
                                  jax.grad(loss(jax.checkpoint(f)), argnums=tuple(range(6)), **kw)(*a)))(*args)
    g_loop = jax.grad(lambda *a: weigh(loop(f, a, False)), argnums=tuple(range(6)), **kw)(*args)
    for a, b, c in zip(g, g_ck, g_loop):
        if jax.tree.leaves(c):
            assert rel(a, c) <= RTOL and rel(b, c) <= RTOL


@pytest.mark.parametrize("name,form", CASES)
def test_scan_over_chunks_carries_the_state(gen, name, form):
    """lax.scan over 2 chunks of 2 tokens, carrying initial_state, gives one call's outputs and final state. A kernel
    layer's cache grows by each call's tokens (capacity N + T), so no scan can carry it: there the chunks run in a
    Python loop of jitted calls."""
    m = gen[name]
    q, k, v, params, inputs, state = example_args(m, name, 2, 4, seed=7)
    chunk = lambda x: jnp.swapaxes(jnp.reshape(x, (x.shape[0], 2, 2) + x.shape[2:]), 0, 1)  # noqa: E731
    unchunk = lambda x: jnp.reshape(jnp.swapaxes(x, 0, 1), (x.shape[1], 4) + x.shape[3:])  # noqa: E731

    def body(carry, xs):
        qc, kc, vc, ic = xs
        o, final = m.forward(qc, kc, vc, params, initial_state=carry, output_final_state=True, form=form, **ic)
        return final, o

    xs = (chunk(q), chunk(k), chunk(v), {n: chunk(x) for n, x in inputs.items()})
    if name in KERNEL:
        final, os = state, []
        for c in range(2):
            final, o_c = jax.jit(body)(final, jax.tree.map(lambda x: x[c], xs))
            os.append(o_c)
        o = jnp.stack(os)
    else:
        final, o = jax.lax.scan(body, state, xs)
    want = m.forward(q, k, v, params, initial_state=state, output_final_state=True, form=form, **inputs)
    assert rel((unchunk(o), final), want) <= RTOL


@pytest.mark.parametrize("name", SHIPPED)
def test_step_under_jit_and_vmap(gen, name):
    m = gen[name]
    q, k, v, params, inputs, state = example_args(m, name, 3, 1, seed=9)
    ins_t = {n: x[:, 0] for n, x in inputs.items()}
    want = m.step(state, q[:, 0], k[:, 0], v[:, 0], params, **ins_t)
    assert rel(jax.jit(m.step)(state, q[:, 0], k[:, 0], v[:, 0], params, **ins_t), want) <= RTOL

    def one(s, q_t, k_t, v_t, i_t):
        o, new = m.step(jax.tree.map(lambda x: x[None], s), q_t[None], k_t[None], v_t[None], params,
                        **{n: x[None] for n, x in i_t.items()})
        return o[0], jax.tree.map(lambda x: x[0], new)

    assert rel(jax.vmap(one)(state, q[:, 0], k[:, 0], v[:, 0], ins_t), want) <= RTOL
    g = jax.grad(lambda q_t: jnp.sum(jax.vmap(one)(state, q_t, k[:, 0], v[:, 0], ins_t)[0] ** 2))(q[:, 0])
    g_loop = jax.grad(lambda q_t: sum(jnp.sum(one(jax.tree.map(lambda x: x[i], state), q_t[i], k[i, 0], v[i, 0],
                                                  {n: x[i] for n, x in ins_t.items()})[0] ** 2)
                                      for i in range(3)))(q[:, 0])
    assert rel(g, g_loop) <= RTOL


@pytest.mark.parametrize("form", load_generated("ridge").FORMS)
@pytest.mark.parametrize("N,T", [(2, 3), (3, 3)])
def test_issue_case_grad_of_vmap_ridge(gen, form, N, T):
    """The issue's input: per-example ridge calls vmapped with λ unbatched, H=1, K=V=2. It raised TypeError
    (N=2, T=3) or gave dq off by ≈1 relative and dλ 0.2636 instead of 0.2711 (N=T=3)."""
    m = gen["ridge"]
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((N, T, 1, 2))) for _ in range(3))
    lam = jnp.array([0.7])

    def f(q, k, v, lam):
        return m.forward(q[None], k[None], v[None], {"lam": lam}, form=form)[0].sum() ** 2

    g_vmap = jax.grad(lambda q, lam: jax.vmap(f, in_axes=(0, 0, 0, None))(q, k, v, lam).sum(), argnums=(0, 1))(q, lam)
    g_loop = jax.grad(lambda q, lam: sum(f(q[i], k[i], v[i], lam) for i in range(N)), argnums=(0, 1))(q, lam)
    assert rel(g_vmap[0], g_loop[0]) <= RTOL
    assert rel(g_vmap[1], g_loop[1]) <= RTOL

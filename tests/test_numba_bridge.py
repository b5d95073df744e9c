"""mesagen.runtime.numba_bridge: a Numba CPU layer inside JAX matches the JAX layer, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesagen.runtime.numba_bridge import numba_layer
from numba_cases import B, H, K, LAYERS, V, close, data, module, params_inputs


@pytest.mark.parametrize("name", LAYERS)
def test_bridge_matches_jax_layer(name):
    q, k, v, do, beta = data(8)
    params, inputs = params_inputs(name, beta)
    nm, jm = module(name, "numba_cpu"), module(name, "jax")
    apply = numba_layer(nm)
    with jax.enable_x64(True):
        def loss_numba(q, k, v, params, inputs):
            st = nm.init_state(B, H, K, V, {n: np.asarray(x) for n, x in params.items()}, np.float64) \
                if not params else jm.init_state(B, H, K, V, params, jnp.float64)
            o, fin = apply(q, k, v, params, st, inputs)
            return jnp.sum(o * do) + sum(jnp.sum(x * x) for x in fin) / 2

        def loss_jax(q, k, v, params, inputs):
            o, fin = jm.forward(q, k, v, params, output_final_state=True, **inputs)
            return jnp.sum(o * do) + sum(jnp.sum(x * x) for x in fin) / 2

        args = (q, k, v, params, inputs)
        vn, gn = jax.value_and_grad(loss_numba, argnums=(0, 1, 2, 3, 4))(*args)
        vj, gj = jax.value_and_grad(loss_jax, argnums=(0, 1, 2, 3, 4))(*args)
        close(vn, vj)
        for a, b in zip(jax.tree.leaves(gn), jax.tree.leaves(gj)):
            close(a, b)
        assert len(jax.tree.leaves(gn)) == 3 + len(params) + len(inputs)
        # under jit as well
        close(jax.jit(jax.grad(loss_numba))(*args), gj[0])


@pytest.mark.parametrize("name", ["ridge", "delta"])
def test_numba_cpu_layer_matches_jax_module_with_default_state(name, x64):
    """NumbaCpuLayer: the JAX contract on top of numba_cpu; gradients reach λ through P₀ = I/λ."""
    from mesagen.runtime.numba_bridge import NumbaCpuLayer
    from numba_cases import data, module, params_inputs

    jmod, nmod = module(name, "jax"), module(name, "numba_cpu")
    layer = NumbaCpuLayer(nmod, jmod)
    q, k, v, do, beta = data()
    params, inputs = params_inputs(name, beta)

    def loss(mod, q, params, inputs):
        o, _ = mod.forward(q, k, v, params, **inputs)
        return jnp.sum(o * do)

    got = jax.grad(lambda q, p, i: loss(layer, q, p, i), argnums=(0, 1, 2))(q, params, inputs)
    want = jax.grad(lambda q, p, i: loss(jmod, q, p, i), argnums=(0, 1, 2))(q, params, inputs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="offers"):
        layer.forward(q, k, v, params, form="closed_form", **inputs)


@pytest.mark.parametrize("name", ["gd", "delta"])
def test_bridge_dtype_policy(name):
    """q's dtype is the compute dtype (float32 / float64, else ValueError); other arguments are cast to it."""
    from mesagen.runtime.numba_bridge import NumbaCpuLayer

    jm, nm = module(name, "jax"), module(name, "numba_cpu")
    layer = NumbaCpuLayer(nm, jm)
    q, k, v, do, beta = data(9)
    params, inputs = params_inputs(name, beta)
    for bad in (jnp.float16, jnp.bfloat16, jnp.int32, jnp.bool_):
        with pytest.raises(ValueError, match=rf"^{name}: q has dtype {jnp.dtype(bad).name}.*float32 or float64"):
            layer.forward(jnp.asarray(q).astype(bad), k, v, params, **inputs)
    with pytest.raises(ValueError, match=rf"^{name}: k has dtype int32; it must be a real floating array"):
        layer.forward(jnp.asarray(q, jnp.float32), jnp.asarray(k).astype(jnp.int32), v, params, **inputs)
    q32 = jnp.asarray(q, jnp.float32)
    p16 = {n: jnp.asarray(x, jnp.float16) for n, x in params.items()}
    i16 = {n: jnp.asarray(x, jnp.float16) for n, x in inputs.items()}

    def loss(q, k, v):
        o, fin = layer.forward(q, k, v, p16, output_final_state=True, **i16)
        assert o.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in fin)
        return jnp.sum(o * do.astype(np.float32))

    grads = jax.grad(loss, argnums=(0, 1, 2))(q32, jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.float16))
    assert [g.dtype for g in grads] == [jnp.float32, jnp.bfloat16, jnp.float16]  # cotangents match primals
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)

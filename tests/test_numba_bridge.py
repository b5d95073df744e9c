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

"""The dtype policy of the generated JAX layers (issue 7, item 7; docs/layers.md "Dtypes").

q's dtype is the compute dtype and must be float32 or float64; k, v, parameters, per-token inputs and the
initial state must be real floating of any width and are cast to it; outputs and the final state come back in
it. Anything else is a ValueError naming the layer, the argument, the dtype and the fix. Before: a float16 or
bfloat16 q made the closed form fail with an internal KeyError.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import KERNEL, SHIPPED, init_state_kw, load_generated, make_inputs

pytestmark = pytest.mark.usefixtures("x64")

CASES = [(n, f) for n in SHIPPED for f in load_generated(n).FORMS]
B, T, H, K, V = 1, 3, 2, 3, 2


def floats(state):
    """The floating fields of a state (the kernel layers' KV cache also holds length [B], int32 by design)."""
    return [x for x in state if jnp.issubdtype(x.dtype, jnp.floating)]


def as_float32(state):
    """``state`` with its floating fields cast to float32 (an integer length stays as it is)."""
    return tuple(x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x for x in state)


def args(name, dtype=np.float64):
    q, k, v, params, inputs = make_inputs(0, name, b=B, t=T, h=H, k=K, v=V, dtype=dtype)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), params, inputs


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.int32, jnp.bool_, jnp.complex64],
                         ids=["float16", "bfloat16", "int32", "bool", "complex64"])
@pytest.mark.parametrize("name,form", CASES)
def test_unsupported_q_dtype_is_a_clear_error(gen, name, form, dtype):
    m = gen[name]
    q, k, v, params, inputs = args(name)
    want = rf"^{name}: q has dtype {jnp.dtype(dtype).name}, .* must be float32 or float64; cast with q.astype\(jnp.float32\)$"
    with pytest.raises(ValueError, match=want):
        m.forward(q.astype(dtype), k, v, params, form=form, **inputs)
    state = m.init_state(B, H, K, V, params, jnp.float64)
    with pytest.raises(ValueError, match=want):
        m.step(state, q[:, 0].astype(dtype), k[:, 0], v[:, 0], params, **{n: x[:, 0] for n, x in inputs.items()})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name,form", CASES)
def test_float32_float64_in_same_dtype_out(gen, name, form, dtype):
    m = gen[name]
    q, k, v, params, inputs = args(name, np.dtype(dtype))
    # a kernel layer's step needs a free slot in the cache: start from one with room for the step below
    start = m.init_state(B, H, K, V, params, jnp.float64, **init_state_kw(name, 1)) if name in KERNEL else None
    o, final = m.forward(q, k, v, params, form=form, initial_state=start, output_final_state=True, **inputs)
    assert o.dtype == dtype and all(x.dtype == dtype for x in floats(final)) and floats(final)
    o_t, new = m.step(final, q[:, 0], k[:, 0], v[:, 0], params, **{n: x[:, 0] for n, x in inputs.items()})
    assert o_t.dtype == dtype and all(x.dtype == dtype for x in floats(new))


@pytest.mark.parametrize("name,form", CASES)
def test_mixed_widths_compute_in_q_dtype(gen, name, form):
    """q float32 with k, v, parameters, inputs and state in float64 (or float16): float32 out, equal to an
    all-float32 call."""
    m = gen[name]
    q, k, v, params, inputs = args(name)
    state = m.init_state(B, H, K, V, params, jnp.float64)
    o, final = m.forward(q.astype(jnp.float32), k, v.astype(jnp.float16), params, form=form, initial_state=state,
                         output_final_state=True, **inputs)
    assert o.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in floats(final))
    f32 = lambda d: {n: x.astype(np.float32) for n, x in d.items()}  # noqa: E731
    o32, _ = m.forward(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float16).astype(jnp.float32),
                       f32(params), form=form, initial_state=as_float32(state), **f32(inputs))
    np.testing.assert_array_equal(o, o32)


@pytest.mark.parametrize("name", SHIPPED)
def test_other_arguments_must_be_real_floating(gen, name):
    m = gen[name]
    q, k, v, params, inputs = args(name)
    with pytest.raises(ValueError, match=rf"^{name}: k must be a real floating-point array .* got int32$"):
        m.forward(q, k.astype(jnp.int32), v, params, **inputs)
    with pytest.raises(ValueError, match=rf"^{name}: v must be a real floating-point array .* got complex64$"):
        m.forward(q, k, v.astype(jnp.complex64), params, **inputs)
    for n in params:
        bad = {**params, n: params[n].astype(np.int32)}
        with pytest.raises(ValueError, match=rf"^{name}: parameter '{n}' must be a real floating-point array"):
            m.forward(q, k, v, bad, **inputs)
    for n in inputs:
        bad = {**inputs, n: inputs[n] > 0.5}
        with pytest.raises(ValueError, match=rf"^{name}: input '{n}' must be a real floating-point array .* bool$"):
            m.forward(q, k, v, params, **bad)
    state = m.init_state(B, H, K, V, params, jnp.float64)
    bad_state = type(state)(*(x.astype(jnp.int32) for x in state))
    with pytest.raises(ValueError, match=rf"^{name}: initial_state.{state._fields[0]} must be a real floating"):
        m.forward(q, k, v, params, initial_state=bad_state, **inputs)

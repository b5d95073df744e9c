"""The dtype policy of the generated Numba CPU modules (issue 7 item 7; the CUDA modules: tests/cuda/).

The compute dtype is q's dtype and must be float32 or float64; any other q dtype is a ValueError naming the
layer, the dtype and the fix. k, v, parameters, per-token inputs, the initial state and the cotangents must
be real floating and are cast to the compute dtype; outputs, states and gradients come back in it. "Computed
in float32" is checked on Numba's own typing: no variable of any compiled body or driver is float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba.core import types

from numba_cases import LAYERS, K, V, close, data, module, params_inputs

BAD_Q = [np.float16, np.int32, np.int64, np.bool_, np.complex64, np.complex128]


def _call(name, what, dtype_q=np.float64, dtype_k=np.float64, dtype_param=np.float64, dtype_input=np.float64):
    q, k, v, do, beta = data(3)
    params, inputs = params_inputs(name, beta)
    m = module(name, "numba_cpu")
    q, k = q.astype(dtype_q), k.astype(dtype_k)
    params = {n: x.astype(dtype_param) for n, x in params.items()}
    inputs = {n: x.astype(dtype_input) for n, x in inputs.items()}
    if what == "forward":
        return m.forward(q, k, v, params, output_final_state=True, **inputs)
    if what == "step":
        st = m.init_state(q.shape[0], q.shape[2], K, V, params, np.float64)
        return m.step(st, q[:, 0], k[:, 0], v[:, 0], params, **{n: x[:, 0] for n, x in inputs.items()})
    return m.backward(q, k, v, params, do, **inputs)


@pytest.mark.parametrize("what", ["forward", "step", "backward"])
@pytest.mark.parametrize("dtype", BAD_Q, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", LAYERS)
def test_unsupported_q_dtype_is_a_clear_error(name, dtype, what):
    with pytest.raises(ValueError, match=rf"^{name}: q has dtype {np.dtype(dtype).name}.*float32 or float64.*cast q"):
        _call(name, what, dtype_q=dtype)


@pytest.mark.parametrize("name", LAYERS)
def test_non_floating_k_parameters_inputs_and_states_are_errors(name):
    with pytest.raises(ValueError, match=rf"^{name}: k has dtype int32; it must be a real floating array"):
        _call(name, "forward", dtype_k=np.int32)
    with pytest.raises(ValueError, match=rf"^{name}: k has dtype complex128"):
        _call(name, "backward", dtype_k=np.complex128)
    m = module(name, "numba_cpu")
    q, k, v, do, beta = data(3)
    params, inputs = params_inputs(name, beta)
    assert params or inputs
    if params:
        with pytest.raises(ValueError, match=rf"^{name}: parameter '\w+' has dtype int64"):
            _call(name, "forward", dtype_param=np.int64)
    if inputs:
        with pytest.raises(ValueError, match=rf"^{name}: input '{next(iter(inputs))}' has dtype bool"):
            _call(name, "forward", dtype_input=np.bool_)
    st = m.forward(q, k, v, params, output_final_state=True, **inputs)[1]
    with pytest.raises(ValueError, match=rf"^{name}: initial_state\.\w+ has dtype int64"):
        m.forward(q, k, v, params, initial_state=type(st)(*(x.astype(np.int64) for x in st)), **inputs)
    with pytest.raises(ValueError, match=rf"^{name}: do has dtype int64"):
        m.backward(q, k, v, params, do.astype(np.int64), **inputs)
    with pytest.raises(ValueError, match=rf"^{name}: init_state dtype float16 is not supported"):
        m.init_state(1, 2, K, V, params, np.float16)


def _float_leaks(disp, seen):
    """(function, variable, type) of every float64-typed variable in the compiled overloads reachable from disp."""
    out = []
    if id(disp) in seen:
        return out
    seen.add(id(disp))
    for cres in disp.overloads.values():
        for var, t in cres.fndesc.typemap.items():
            if isinstance(t, types.Dispatcher):
                out += _float_leaks(t.dispatcher, seen)
            elif "float64" in str(t) and not var.startswith("$const"):  # literals are converted at compile time
                out.append((disp.py_func.__name__, var, str(t)))
    return out


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_outputs_states_and_gradients_have_q_dtype(name, dtype):
    """Mixed k/v/param dtypes are cast to q's dtype; everything returned is in it; float32 is computed in float32."""
    q, k, v, do, beta = data(4)
    params, inputs = params_inputs(name, beta)
    m = module(name, "numba_cpu")
    other = np.float64 if dtype == np.float32 else np.float32
    args = (q.astype(dtype), k.astype(other), v.astype(np.float16))
    ps = {n: x.astype(other) for n, x in params.items()}
    ins = {n: x.astype(other) for n, x in inputs.items()}
    o, st = m.forward(*args, ps, output_final_state=True, **ins)
    g = m.backward(*args, ps, do.astype(other), dfinal_state=st, **ins)
    st1 = m.step(st, *(a[:, 0] for a in args), ps, **{n: x[:, 0] for n, x in ins.items()})
    arrays = [o, *st, st1[0], *st1[1]] + [x for n, d in g.items() for x in (d if n == "dinitial_state" else [d])]
    assert {a.dtype for a in arrays} == {np.dtype(dtype)}
    f64 = lambda d: {n: x.astype(np.float64) for n, x in d.items()}  # noqa: E731  (the same values, in float64)
    o64, _ = m.forward(*(a.astype(np.float64) for a in args), f64(ps), output_final_state=True, **f64(ins))
    close(o, o64, rtol=1e-5 if dtype == np.float32 else 1e-10)
    if dtype == np.float32:
        leaks = sorted(set(sum((_float_leaks(d, set()) for d in m._build(K, V, "float32")), [])))
        assert not leaks, f"float64 arithmetic in the float32 build: {leaks[:6]}"

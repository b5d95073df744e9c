"""Numba-CUDA layers under the CUDA simulator (run in its own process by tests/test_numba_cuda.py).

Sets ``NUMBA_ENABLE_CUDASIM=1`` before numba is imported and shortens the interpreter's switch interval so
``syncthreads`` barriers are cheap. Tiny prime shapes; float64 to 1e-10 against the references (forward)
and against the CPU module's adjoint (backward), which tests/test_numba_cpu.py ties to JAX autodiff.
"""

from __future__ import annotations

import os
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
sys.setswitchinterval(1e-5)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numba import cuda  # noqa: E402

from numba_cases import LAYERS, B, H, K, T, V, close, data, module, params_inputs, reference  # noqa: E402


def test_simulator_is_active():
    assert cuda.simulator_enabled if hasattr(cuda, "simulator_enabled") else os.environ["NUMBA_ENABLE_CUDASIM"]
    assert "simulator" in type(cuda.to_device(np.zeros(1))).__module__


@pytest.mark.parametrize("name", LAYERS)
def test_forward_and_backward(name):
    q, k, v, do, beta = data(6)
    params, inputs = params_inputs(name, beta)
    m, c = module(name, "numba_cuda"), module(name, "numba_cpu")
    o, st = m.forward(q, k, v, params, output_final_state=True, **inputs)
    ro, rst = reference(name, q, k, v, params, inputs)
    close(o, ro)
    for n in m.State._fields:
        close(getattr(st, n), rst[n])
    g = m.backward(q, k, v, params, do, dfinal_state=st, **inputs)
    gc = c.backward(q, k, v, params, do, dfinal_state=st, **inputs)
    for n in sorted(gc):
        pairs = zip(g[n], gc[n]) if n == "dinitial_state" else [(g[n], gc[n])]
        for a, b in pairs:
            close(a, b)


@pytest.mark.parametrize("name", LAYERS)
def test_given_state_step_and_device_arrays(name):
    q, k, v, do, beta = data(7)
    params, inputs = params_inputs(name, beta)
    m = module(name, "numba_cuda")
    st0 = m.forward(q[:, :2], k[:, :2], v[:, :2], params, output_final_state=True,
                    **{n: x[:, :2] for n, x in inputs.items()})[1]
    o, st = m.forward(q, k, v, params, initial_state=st0, output_final_state=True, **inputs)
    ro, rst = reference(name, q, k, v, params, inputs, initial_state=st0._asdict())
    close(o, ro)
    o_t, st1 = m.step(st0, q[:, 0], k[:, 0], v[:, 0], params, **{n: x[:, 0] for n, x in inputs.items()})
    close(o_t, o[:, 0])
    dev = [cuda.to_device(x) for x in (q, k, v)]
    od, std = m.forward(*dev, params, initial_state=st0, output_final_state=True,
                        **{n: cuda.to_device(x) for n, x in inputs.items()})
    assert hasattr(od, "copy_to_host")  # device in -> device out
    close(od.copy_to_host(), o)
    gd = m.backward(*dev, params, cuda.to_device(do), initial_state=st0, **inputs)
    gh = m.backward(q, k, v, params, do, initial_state=st0, **inputs)
    close(gd["dq"].copy_to_host(), gh["dq"])


def test_two_widths_in_one_process():
    m = module("ridge", "numba_cuda")
    for seed, (kk, vv) in enumerate([(3, 5), (2, 7), (3, 5)]):
        q, k, v, _, _ = data(20 + seed, b=1, t=5, k=kk, v=vv)
        params = {"lam": np.array([0.7, 1.9])}
        close(m.forward(q, k, v, params)[0], reference("ridge", q, k, v, params, {})[0])
    assert (B, T, H, K, V) == (2, 7, 2, 3, 5)

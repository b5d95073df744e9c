"""cu_seqlens of the Numba-CUDA modules under the simulator (run in its own process by tests/test_varlen.py).

One small case: gated_delta (a gate and a step size), three packed sequences of lengths 2, 3, 1, float64. The
packed forward and backward equal separate calls (numpy inputs) and the Numba CPU module's packed call; device
inputs give device results with the same values.
"""

from __future__ import annotations

import os

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

from conftest import load_generated, make_inputs  # noqa: E402

CU = (0, 2, 5, 6)


def test_cuda_packed_equals_separate_and_cpu():
    m, c = load_generated("gated_delta", "numba_cuda"), load_generated("gated_delta", "numba_cpu")
    q, k, v, params, inputs = make_inputs(3, "gated_delta", b=1, t=CU[-1], h=2, k=3, v=2)
    rng = np.random.default_rng(4)
    st = m.State(rng.standard_normal((3, 2, 3, 2)) * 0.3)
    cu = np.asarray(CU, np.int32)
    o, f = m.forward(q, k, v, params, initial_state=st, output_final_state=True, cu_seqlens=cu, **inputs)
    oc, fc = c.forward(q, k, v, params, initial_state=st, output_final_state=True, cu_seqlens=cu, **inputs)
    np.testing.assert_allclose(o, oc, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(f[0], fc[0], rtol=1e-10, atol=1e-12)
    do = rng.standard_normal(o.shape)
    g = m.backward(q, k, v, params, do, initial_state=st, cu_seqlens=cu, **inputs)
    gc = c.backward(q, k, v, params, do, initial_state=st, cu_seqlens=cu, **inputs)
    for key in ("dq", "dk", "dv", "dbeta", "dg"):
        np.testing.assert_allclose(g[key], gc[key], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g["dinitial_state"][0], gc["dinitial_state"][0], rtol=1e-10, atol=1e-12)
    for n, (s, e) in enumerate(zip(CU, CU[1:])):
        o_n, f_n = m.forward(q[:, s:e], k[:, s:e], v[:, s:e], params, initial_state=m.State(st[0][n:n + 1]),
                             output_final_state=True, **{i: x[:, s:e] for i, x in inputs.items()})
        np.testing.assert_array_equal(o[:, s:e], o_n)
        np.testing.assert_array_equal(f[0][n:n + 1], f_n[0])
    od, fd = m.forward(*(cuda.to_device(x) for x in (q, k, v)), params, initial_state=st, output_final_state=True,
                       cu_seqlens=cu, **{i: cuda.to_device(x) for i, x in inputs.items()})
    assert hasattr(od, "copy_to_host") and hasattr(fd[0], "copy_to_host")
    np.testing.assert_array_equal(od.copy_to_host(), o)

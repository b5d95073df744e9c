"""Causality of the Numba CPU layers for non-finite inputs (issue 7 item 4; the CUDA modules: tests/cuda/).

Issue input: B = H = 1, T = 6, K = 3, V = 4, the loss on t < 3 only and a NaN at t = 3 made dk and dv at
t < 3 NaN (0 · NaN in the adjoint sweep). Outputs and gradients at t may depend only on positions ≤ t and on
nonzero cotangents: with a NaN / ±inf at position p in q, k, v or a per-token input, the outputs before p
and every gradient of a loss on positions before p must equal, bit for bit, those of the clean run, and the
gradients of positions ≥ p must be exact zeros.
"""

from __future__ import annotations

import numpy as np
import pytest

from numba_cases import LAYERS, module, params_inputs

B, H, T, K, V = 1, 1, 6, 3, 4


def issue_data(seed=11):
    """(q, k, v, do, inputs-maker) of the issue's shape."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((B, T, H, K)), rng.standard_normal((B, T, H, K)) / np.sqrt(K)
    v, do = rng.standard_normal((B, T, H, V)), rng.standard_normal((B, T, H, V))
    return q, k, v, do, rng.uniform(0.1, 0.9, (B, T, H))


def targets(name):
    """q, k, v and every per-token input of the layer (gates and step sizes)."""
    return ("q", "k", "v") + tuple(params_inputs(name, np.full((B, T, H), 0.5), h=H)[1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("pos", [3, 5, 0])
@pytest.mark.parametrize("name", LAYERS)
def test_non_finite_input_does_not_reach_earlier_positions(name, pos, bad):
    m = module(name, "numba_cpu")
    q, k, v, do, beta = issue_data()
    params, inputs = params_inputs(name, beta, h=H)
    do = do.copy()
    do[:, pos:] = 0.0  # the loss sees positions < pos only
    clean_o = m.forward(q, k, v, params, **inputs)[0]
    clean_g = m.backward(q, k, v, params, do, **inputs)
    for target in targets(name):
        arrays = {"q": q.copy(), "k": k.copy(), "v": v.copy(), **{n: x.copy() for n, x in inputs.items()}}
        arrays[target][:, pos] = bad
        ins = {n: arrays[n] for n in inputs}
        o = m.forward(arrays["q"], arrays["k"], arrays["v"], params, **ins)[0]
        np.testing.assert_array_equal(o[:, :pos], clean_o[:, :pos], err_msg=f"{target}: output before {pos}")
        g = m.backward(arrays["q"], arrays["k"], arrays["v"], params, do, **ins)
        for n, x in g.items():
            if n == "dinitial_state":
                for a, c in zip(x, clean_g[n]):
                    np.testing.assert_array_equal(a, c, err_msg=f"{target}: {n}")
            elif x.ndim >= 3:  # per-position gradients [B, T, H, ...]
                np.testing.assert_array_equal(x[:, :pos], clean_g[n][:, :pos], err_msg=f"{target}: {n} before {pos}")
                np.testing.assert_array_equal(x[:, pos:], 0.0, err_msg=f"{target}: {n} from {pos} on")
            else:  # parameter gradients [H]
                np.testing.assert_array_equal(x, clean_g[n], err_msg=f"{target}: {n}")
        assert all(np.all(np.isfinite(x)) for n, x in g.items() if n != "dinitial_state")


@pytest.mark.parametrize("name", LAYERS)
def test_final_state_cotangent_still_reaches_every_position(name):
    """With do = 0 but a nonzero final-state cotangent the sweep covers all of T (no position left at zero)."""
    m = module(name, "numba_cpu")
    q, k, v, do, beta = issue_data(12)
    params, inputs = params_inputs(name, beta, h=H)
    st = m.forward(q, k, v, params, output_final_state=True, **inputs)[1]
    g = m.backward(q, k, v, params, np.zeros_like(do), dfinal_state=st, **inputs)
    for n in ("dk", "dv"):
        assert np.all(np.abs(g[n]).max(axis=-1) > 0) and np.all(np.isfinite(g[n])), n
    g1 = m.backward(q, k, v, params, np.where(np.arange(T)[None, :, None, None] == T - 1, do, 0.0), **inputs)
    assert np.all(np.abs(g1["dv"]).max(axis=-1) > 0)  # the last position's cotangent alone reaches t = 0

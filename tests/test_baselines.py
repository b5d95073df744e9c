"""Baselines land on the paper's reference values (docs/paper.md §4) on freshly sampled data, and agree with direct solves."""

import jax
import numpy as np

from mesagen.data import DynamicsConfig, sample_states
from mesagen.runtime.baselines import (baseline_losses, fit_baselines, gd1, predict_zero, ridge)


def test_reference_values():
    cfg = DynamicsConfig()
    tune = np.asarray(sample_states(jax.random.PRNGKey(11), cfg, 256))
    ev = np.asarray(sample_states(jax.random.PRNGKey(12), cfg, 1024))
    fitted = fit_baselines(tune)
    assert 0.02 < fitted["gd1_eta"] < 0.04 and fitted["ridge_lambda"] <= 1e-2
    y = ev[:, 1:]
    preds = {"predict_zero": predict_zero(ev), "gd1": gd1(ev, fitted["gd1_eta"]),
             "ridge": ridge(ev, fitted["ridge_lambda"])}
    for name, ref in (("predict_zero", 1.676), ("gd1", 0.899), ("ridge", 0.184)):
        per_seq = 0.5 * np.sum((preds[name] - y) ** 2, -1).mean(1)    # mean over t, per sequence
        se = per_seq.std() / np.sqrt(len(per_seq))
        # 4 standard errors of the 1024-sequence mean, plus 1% for the paper's own sampling error.
        assert abs(per_seq.mean() - ref) < 4 * se + 0.01 * ref, (name, per_seq.mean(), se)
    losses = baseline_losses(ev, fitted)
    assert losses["ridge"][10:].max() < 0.01                               # below 0.01 from t = 10
    assert np.argmin(losses["gd1"]) in range(20, 46)                      # U-shape, minimum near t = 30-40
    assert losses["gd1"][49] > losses["gd1"].min() * 1.05


def test_ridge_matches_direct_solve():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 9, 3))
    lam = 0.37
    out = ridge(s, lam)
    for b in range(2):
        for t in range(8):
            x, y = s[b, :t], s[b, 1:t + 1]                 # pairs i < t
            phi = np.linalg.solve(x.T @ x + lam * np.eye(3), x.T @ y).T
            np.testing.assert_allclose(out[b, t], phi @ s[b, t], rtol=1e-10, atol=1e-12)
    g = gd1(s, 1.0)
    np.testing.assert_allclose(g[1, 4], sum(s[1, i + 1] * (s[1, i] @ s[1, 4]) for i in range(4)), rtol=1e-12)


def test_softmax_kernel_regression_matches_direct_sum_and_its_limits():
    from mesagen.runtime.baselines import fit_softmax_kernel_beta, softmax_kernel
    rng = np.random.default_rng(1)
    s = 3.0 * rng.normal(size=(2, 9, 3))             # large scores: the max-shift must keep it finite
    beta = 4.0
    out = softmax_kernel(s, beta)
    assert np.all(np.isfinite(out)) and np.all(out[:, 0] == 0)        # t = 0: no pairs, prediction 0
    for b in range(2):
        for t in range(1, 8):
            x, y = s[b, :t], s[b, 1:t + 1]                 # pairs i < t
            w = np.exp(beta * x @ s[b, t] - np.max(beta * x @ s[b, t]))
            np.testing.assert_allclose(out[b, t], (w / w.sum()) @ y, rtol=1e-10, atol=1e-12)
    # β = 0 averages the context's targets; the line search returns a grid point no worse than β = 0
    np.testing.assert_allclose(softmax_kernel(s, 0.0)[1, 5], s[1, 1:6].mean(0), rtol=1e-12)
    cfg = DynamicsConfig()
    tune = np.asarray(sample_states(jax.random.PRNGKey(11), cfg, 64))
    best = fit_softmax_kernel_beta(tune, grid=(0.0, 1.0, 10.0))
    loss = lambda b: 0.5 * np.sum((softmax_kernel(tune, b) - tune[:, 1:]) ** 2, -1).mean()  # noqa: E731
    assert best in (0.0, 1.0, 10.0) and loss(best) <= min(loss(0.0), loss(1.0), loss(10.0))
    import pytest
    with pytest.raises(ValueError, match="beta"):
        softmax_kernel(s, -1.0)

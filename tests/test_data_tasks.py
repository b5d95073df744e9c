"""Paper tasks: shapes, statistics of the teachers and noise, key discipline, tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesagen.data import (DynamicsConfig, RegressionConfig, constructed_tokens, interleave, raw_tokens,
                          sample_regression, sample_states, sample_system)

KINDS = ["fully_observed", "partially_observed", "contracting", "nonlinear", "fixed_teacher"]


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_clip(kind):
    cfg = DynamicsConfig(kind=kind, seq_len=13, clip=2.0 if kind == "contracting" else 10.0)
    w, s = sample_system(jax.random.PRNGKey(0), cfg, 7)
    assert w.shape == (7, cfg.latent_dim, cfg.latent_dim)
    assert s.shape == (7, 14, cfg.observed_dim) and s.dtype == jnp.float32
    assert np.all(np.isfinite(s))
    if kind != "partially_observed":
        assert np.abs(s).max() <= cfg.clip


def test_teachers_are_haar_orthogonal():
    w, _ = sample_system(jax.random.PRNGKey(1), DynamicsConfig(seq_len=2), 4000)
    w = np.asarray(w, np.float64)
    np.testing.assert_allclose(np.einsum("bji,bjk->bik", w, w), np.broadcast_to(np.eye(10), w.shape), atol=1e-5)
    # Haar on O(10): E[W_ij^2] = 1/10, E[tr W] = 0, det = +-1 with equal probability.
    assert abs(np.mean(w ** 2) - 0.1) < 0.005
    assert abs(np.mean(np.trace(w, axis1=1, axis2=2))) < 5 / np.sqrt(4000)
    assert abs(np.mean(np.linalg.det(w) > 0) - 0.5) < 5 * 0.5 / np.sqrt(4000)


def test_noise_level_and_initial_state():
    cfg = DynamicsConfig()
    w, s = sample_system(jax.random.PRNGKey(2), cfg, 512)
    w, s = np.asarray(w, np.float64), np.asarray(s, np.float64)
    resid = s[:, 1:] - np.einsum("bij,btj->bti", w, s[:, :-1])
    assert abs(resid.std() - 0.01) < 0.0005 and abs(resid.mean()) < 0.0005
    s1 = s[:, 0]
    assert s1.min() >= -1 and s1.max() <= 1 and abs(np.mean(s1 ** 2) - 1 / 3) < 0.02


def test_independent_across_batch_and_reproducible():
    cfg = DynamicsConfig(seq_len=5)
    w, s = sample_system(jax.random.PRNGKey(3), cfg, 2000)
    w = np.asarray(w).reshape(2000, -1)
    corr = np.corrcoef(w[::2].ravel(), w[1::2].ravel())[0, 1]          # neighbouring sequences
    assert abs(corr) < 5 / np.sqrt(w[::2].size)
    assert len({tuple(np.round(x, 6)) for x in np.asarray(s[:, 0])}) == 2000
    np.testing.assert_array_equal(s, sample_states(jax.random.PRNGKey(3), cfg, 2000))
    assert not np.allclose(s, sample_states(jax.random.PRNGKey(4), cfg, 2000))


def test_config_change_takes_effect_without_stale_jit():
    key = jax.random.PRNGKey(5)
    stds = []
    for noise in (0.01, 0.3, 0.01):
        w, s = sample_system(key, DynamicsConfig(noise_std=noise, seq_len=20), 256)
        stds.append(float(np.std(np.asarray(s[:, 1:]) - np.einsum("bij,btj->bti", w, s[:, :-1]))))
    assert abs(stds[0] - 0.01) < 1e-3 and abs(stds[1] - 0.3) < 0.02 and stds[2] == stds[0]


def test_fixed_teacher_shared_and_contracting_spectrum():
    w, _ = sample_system(jax.random.PRNGKey(6), DynamicsConfig(kind="fixed_teacher", seq_len=2), 5)
    assert np.allclose(w, w[:1])
    w2, _ = sample_system(jax.random.PRNGKey(7), DynamicsConfig(kind="fixed_teacher", seq_len=2), 5)
    np.testing.assert_array_equal(w, w2)                       # same teacher_seed -> same teacher
    wc, _ = sample_system(jax.random.PRNGKey(8), DynamicsConfig(kind="contracting", clip=2.0, seq_len=2), 50)
    eig = np.sort(np.abs(np.linalg.eigvals(np.asarray(wc, np.float64))), axis=1)
    assert np.all(eig > 0.3 - 1e-3) and np.all(eig < 0.9 + 1e-3)
    np.testing.assert_allclose(eig[:, -1], 0.9, atol=1e-3)


def test_tokens():
    s = sample_states(jax.random.PRNGKey(9), DynamicsConfig(seq_len=6, state_dim=3), 2)
    e, y = constructed_tokens(s)
    assert e.shape == (2, 6, 12) and y.shape == (2, 6, 3)
    np.testing.assert_array_equal(e[..., :3], 0)
    np.testing.assert_array_equal(e[..., 3:6], s[:, :-1])
    np.testing.assert_array_equal(e[..., 6:9], s[:, :-1])
    np.testing.assert_array_equal(e[:, 0, 9:], 0)
    np.testing.assert_array_equal(e[:, 1:, 9:], s[:, :-2])
    np.testing.assert_array_equal(y, s[:, 1:])
    x, y2 = raw_tokens(s)
    np.testing.assert_array_equal(x, s[:, :-1])
    np.testing.assert_array_equal(y2, y)


def test_regression_task():
    cfg = RegressionConfig(dim=4, num_pairs=9, noise_std=0.0)
    x, y = sample_regression(jax.random.PRNGKey(10), cfg, 3)
    assert x.shape == y.shape == (3, 9, 4)
    w = np.linalg.lstsq(np.asarray(x[0], np.float64), np.asarray(y[0], np.float64), rcond=None)[0].T
    np.testing.assert_allclose(w @ w.T, np.eye(4), atol=1e-4)       # orthogonal teacher, no noise
    p = interleave(x, y)
    assert p.shape == (3, 18, 4)
    np.testing.assert_array_equal(p[:, 0::2], x)
    np.testing.assert_array_equal(p[:, 1::2], y)

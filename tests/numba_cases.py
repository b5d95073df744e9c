"""Shared cases for the Numba backend tests: the shipped layers, their references and small prime-sized data.

Sizes are small distinct primes (B=2, T=7, H=2, K=3, V=5) so a transposed axis cannot go unnoticed.
Imported by the in-process CPU tests and by the CUDA checks that run in their own processes.
"""

from __future__ import annotations

import importlib

import numpy as np

from mesagen import reference as ref

B, T, H, K, V = 2, 7, 2, 3, 5
LAYERS = ("linear", "gd", "delta", "ridge")


def module(name: str, backend: str):
    """The committed generated module ``generated/<name>/layer_<backend>.py``."""
    return importlib.import_module(f"generated.{name}.layer_{backend}")


def data(seed: int = 20230911, b=B, t=T, h=H, k=K, v=V):
    """(q, k, v, do, beta) float64 arrays; beta in (0.05, 0.9)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, t, h, k)), rng.standard_normal((b, t, h, k)), rng.standard_normal((b, t, h, v)),
            rng.standard_normal((b, t, h, v)), rng.uniform(0.05, 0.9, (b, t, h)))


def params_inputs(name: str, beta, h=H):
    """(params, inputs) for layer ``name`` with distinct per-head values."""
    params = {"linear": {"eta": np.array([0.31, 0.77, 0.5, 0.2])[:h]}, "delta": {},
              "gd": {"eta": np.array([0.11, 0.23, 0.17, 0.05])[:h]},
              "ridge": {"lam": np.array([0.7, 1.9, 1.3, 0.4])[:h]}}[name]
    return params, ({"beta": beta} if name == "delta" else {})


def reference(name: str, q, k, v, params, inputs, initial_state=None):
    """The float64 reference (o, state dict) of layer ``name``."""
    if name == "linear":
        return ref.linear(q, k, v, params["eta"], initial_state)
    if name == "gd":
        return ref.gd(q, k, v, params["eta"], steps=3, initial_state=initial_state)
    if name == "delta":
        return ref.delta(q, k, v, inputs["beta"], initial_state)
    return ref.ridge(q, k, v, params["lam"], initial_state)


def close(a, b, rtol=1e-10):
    """Assert ``a == b`` to ``rtol`` relative to the largest entry of ``b``, shapes equal and ``a`` finite."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.all(np.isfinite(a)), "non-finite entries (an unwritten NaN-poisoned output?)"
    err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"

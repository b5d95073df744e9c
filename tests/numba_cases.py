"""Shared cases for the Numba backend tests: the shipped layers, their references and small prime-sized data.

Sizes are small distinct primes (B=2, T=7, H=2, K=3, V=5) so a transposed axis cannot go unnoticed.
Imported by the in-process CPU tests and by the CUDA checks that run in their own processes.

The v1 layers are checked against mesagen.reference (forward) and JAX autodiff (backward); the v2 layers of
contract v2 (``simple_gla`` ... ``kda``) against the independent float64 references of
mesagen.reference.gated, forwards and hand-derived VJPs alike (:func:`reference_vjp`); the layers of the exact and
implicit solvers (``implicit_delta``, ``rls_forgetting``, ``mesanet``: SOLVER_LAYERS) against
mesagen.reference.solvers (forward; mesanet with the same conjugate-gradient settings as its spec) and JAX
autodiff of the generated JAX module (backward).
"""

from __future__ import annotations

import importlib

import numpy as np

from mesagen import reference as ref
from mesagen.reference import gated, solvers

B, T, H, K, V = 2, 7, 2, 3, 5
V1_LAYERS = ("linear", "gd", "delta", "ridge")
V2_LAYERS = ("simple_gla", "retention", "gla", "gated_delta", "kda")
SOLVER_LAYERS = ("implicit_delta", "rls_forgetting", "mesanet")
CORE_LAYERS = V1_LAYERS + V2_LAYERS
LAYERS = CORE_LAYERS + SOLVER_LAYERS
#: The kernel-regression layers (softmax / forgetting attention): their state is a KV cache State(k, v, g, length),
#: their Numba modules have their own frame (tests/test_numba_kernel.py, the kernel checks of tests/cuda/).
KERNEL_LAYERS = ("softmax", "forgetting_attn")
#: mesanet's conjugate-gradient settings (specs/mesanet.yaml): max_iterations, tolerance.
MESANET_CG = (30, 1e-6)


def module(name: str, backend: str):
    """The committed generated module ``generated/<name>/layer_<backend>.py``."""
    return importlib.import_module(f"generated.{name}.layer_{backend}")


def data(seed: int = 20230911, b=B, t=T, h=H, k=K, v=V):
    """(q, k, v, do, beta) float64 arrays; beta in (0.05, 0.9)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, t, h, k)), rng.standard_normal((b, t, h, k)), rng.standard_normal((b, t, h, v)),
            rng.standard_normal((b, t, h, v)), rng.uniform(0.05, 0.9, (b, t, h)))


def gates(beta, k=K):
    """Random time-varying log-space gates g = log α ≤ 0 derived from ``beta`` [B, T, H] (so every caller of
    :func:`params_inputs` gets them without another seed): (scalar g [B, T, H], per-key-channel g [B, T, H, k]),
    α in (0.55, 1)."""
    u = (np.asarray(beta)[..., None] * (7.31 * np.arange(1, k + 2) + 1.7) + 0.37) % 1.0
    alpha = 0.55 + 0.45 * u
    return np.log(alpha[..., 0]), np.log(alpha[..., 1:])


def params_inputs(name: str, beta, h=H, k=K):
    """(params, inputs) for layer ``name`` with distinct per-head values; ``beta`` [B, T, H] in (0, 1)."""
    params = {"linear": {"eta": np.array([0.31, 0.77, 0.5, 0.2])[:h]},
              "gd": {"eta": np.array([0.11, 0.23, 0.17, 0.05])[:h]},
              "ridge": {"lam": np.array([0.7, 1.9, 1.3, 0.4])[:h]},
              "retention": {"gamma": np.array([0.96875, 0.8, 0.9, 0.6])[:h]},
              "rls_forgetting": {"lam": np.array([0.7, 1.9, 1.3, 0.4])[:h]},
              "mesanet": {"lam": 0.3 + 1.7 * ((0.37 * np.arange(1, h * k + 1)) % 1.0).reshape(h, k)}}.get(name, {})
    g_head, g_chan = gates(beta, k)
    inputs = {"delta": {"beta": beta}, "simple_gla": {"g": g_head}, "gla": {"g": g_chan},
              "gated_delta": {"g": g_head, "beta": beta}, "kda": {"g": g_chan, "beta": beta},
              "implicit_delta": {"beta": beta}, "rls_forgetting": {"g": g_head},
              "mesanet": {"g": g_head, "beta": beta}}.get(name, {})
    return params, inputs


def _gated_args(name, params, inputs):
    if name == "retention":
        return (params["gamma"],)
    return tuple(inputs[n] for n in (("g", "beta") if name in ("gated_delta", "kda") else ("g",)))


def reference(name: str, q, k, v, params, inputs, initial_state=None, scale=None):
    """The float64 reference (o, state dict) of layer ``name``; ``scale`` (v2 layers only) None = K ** -0.5."""
    if name in V2_LAYERS:
        st = None if initial_state is None else dict(initial_state)
        return getattr(gated, name)(q, k, v, *_gated_args(name, params, inputs), scale=scale, initial_state=st)
    if name == "implicit_delta":
        return solvers.implicit_delta(q, k, v, inputs["beta"], initial_state=initial_state)
    if name == "rls_forgetting":
        return solvers.rls_forgetting(q, k, v, inputs["g"], params["lam"], initial_state=initial_state)
    if name == "mesanet":
        return solvers.mesanet(q, k, v, inputs["g"], inputs["beta"], params["lam"], initial_state=initial_state,
                               solve="cg", max_iterations=MESANET_CG[0], tolerance=MESANET_CG[1])[:2]
    if name == "linear":
        return ref.linear(q, k, v, params["eta"], initial_state)
    if name == "gd":
        return ref.gd(q, k, v, params["eta"], steps=3, initial_state=initial_state)
    if name == "delta":
        return ref.delta(q, k, v, inputs["beta"], initial_state)
    return ref.ridge(q, k, v, params["lam"], initial_state)


def reference_vjp(name: str, q, k, v, params, inputs, do, initial_state=None, dfinal_state=None, scale=None):
    """The hand-derived float64 VJP of a v2 layer, keyed like the Numba ``backward``: dq, dk, dv, d<param>,
    d<input> and dinitial_state (a dict of the state fields)."""
    st = None if initial_state is None else dict(initial_state)
    dst = None if dfinal_state is None else dict(dfinal_state)
    r = getattr(gated, f"{name}_vjp")(q, k, v, *_gated_args(name, params, inputs), do, dfinal_state=dst,
                                      scale=scale, initial_state=st)
    out = {"dq": r["q"], "dk": r["k"], "dv": r["v"], "dinitial_state": r["initial_state"]}
    out.update({"d" + n: r[n] for n in list(params) + list(inputs)})
    return out


def close(a, b, rtol=1e-10, floor=1e-300):
    """Assert ``a == b`` to ``rtol`` relative to the largest entry of ``b`` (at least ``floor``: a gradient that is
    exactly zero, e.g. of a gate that only multiplies a zero initial state, is compared at that scale), shapes
    equal and ``a`` finite."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.all(np.isfinite(a)), "non-finite entries (an unwritten NaN-poisoned output?)"
    if a.size == 0:
        return
    err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), floor)
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def reference_kernel(q, k, v, g=None, initial_state=None, scale=None):
    """Float64 reference (o, final KV cache as a dict) of the kernel layers from mesagen.reference.attention.

    A given cache (dict k, v, g, length with one length for the whole batch) enters as n0 tokens before the call:
    its keys and values, and log-gates whose suffix sums are the cache's log weights g (g_c − g_{c+1} for slot
    c + 1); their own outputs are dropped. The final cache is built from its definition (capacity N + T, slot
    length + i for token i, log weights log Π_{j>i} α_j, the old slots' g plus the call's total log gate).
    """
    from mesagen import reference as ref

    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, K = q.shape
    sc = K ** -0.5 if scale is None else scale
    lg = np.zeros((B, T, H)) if g is None else np.asarray(g, np.float64)
    if initial_state is None:
        st = {"k": np.zeros((B, H, 0, K)), "v": np.zeros((B, H, 0, v.shape[3])), "g": np.zeros((B, H, 0)),
              "length": np.zeros(B, np.int64)}
    else:
        st = {n: np.asarray(x) for n, x in initial_state.items()}
    n0 = int(st["length"][0])
    assert np.all(np.asarray(st["length"]) == n0), "reference_kernel: one cache length for the whole batch"
    ck, cv, cg = (np.moveaxis(st[n][:, :, :n0], 2, 1) for n in ("k", "v", "g"))  # [B, n0, H, ...]
    vg = np.zeros((B, n0, H))
    vg[:, 1:] = cg[:, :-1] - cg[:, 1:]
    qa = np.concatenate([np.zeros_like(ck), q], axis=1)
    ka, va = np.concatenate([ck, k], axis=1), np.concatenate([cv, v], axis=1)
    o = ref.softmax_attention(qa, ka, va, sc, np.concatenate([vg, lg], axis=1))[:, n0:]
    N = st["k"].shape[2]
    fin = {n: np.concatenate([np.asarray(st[n], np.float64), np.zeros(st[n].shape[:2] + (T,) + st[n].shape[3:])],
                             axis=2) for n in ("k", "v", "g")}
    total = np.log(np.prod(np.exp(lg), axis=1))  # [B, H]
    fin["g"][:, :, :n0] += total[:, :, None]
    fin["g"][:, :, n0:N] = 0
    for i in range(T):
        fin["k"][:, :, n0 + i] = k[:, i]
        fin["v"][:, :, n0 + i] = v[:, i]
        fin["g"][:, :, n0 + i] = np.log(np.prod(np.exp(lg[:, i + 1:]), axis=1))
    fin["length"] = np.asarray(st["length"]) + T
    return o, fin

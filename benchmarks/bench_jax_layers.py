"""Benchmark the generated JAX layers against autodiff through a plain ``lax.scan`` of the same recurrence.

Run: ``python3 benchmarks/bench_jax_layers.py [--T 1024] [--repeats 5]`` (CPU, float32, B=8, H=4, K=V=32).
Prints, for each generated layer and form, forward and forward+backward wall time (median of repeats) and
the ratio generated / plain scan, measured side by side in one run; then the ridge / delta ratio (the FLOP
floor of a K×K Sherman–Morrison update next to a K×V delta update puts it near 2 for K = V).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from timing import median_seconds

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    path = ROOT / "generated" / name / "layer_jax.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- plain lax.scan baselines (hand-written, autodiff stores every state)
def plain_linear(q, k, v, p, i):
    def body(S, x):
        q_t, k_t, v_t = x
        S = S + jnp.einsum("bhk,bhv->bhkv", k_t, v_t)
        return S, p["eta"][None, :, None] * jnp.einsum("bhkv,bhk->bhv", S, q_t)
    B, T, H, K = q.shape
    S0 = jnp.zeros((B, H, K, v.shape[-1]), q.dtype)
    _, o = lax.scan(body, S0, (q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1)))
    return o.swapaxes(0, 1)


def plain_delta(q, k, v, p, i):
    def body(S, x):
        q_t, k_t, v_t, b_t = x
        e = v_t - jnp.einsum("bhkv,bhk->bhv", S, k_t)
        S = S + b_t[..., None, None] * jnp.einsum("bhk,bhv->bhkv", k_t, e)
        return S, jnp.einsum("bhkv,bhk->bhv", S, q_t)
    B, T, H, K = q.shape
    S0 = jnp.zeros((B, H, K, v.shape[-1]), q.dtype)
    _, o = lax.scan(body, S0, (q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), i["beta"].swapaxes(0, 1)))
    return o.swapaxes(0, 1)


def plain_ridge(q, k, v, p, i):
    def body(c, x):
        S, P = c
        q_t, k_t, v_t = x
        Pk = jnp.einsum("bhij,bhj->bhi", P, k_t)
        s = 1 + jnp.einsum("bhk,bhk->bh", k_t, Pk)
        P = P - jnp.einsum("bhi,bhj->bhij", Pk, Pk) / s[..., None, None]
        e = v_t - jnp.einsum("bhkv,bhk->bhv", S, k_t)
        S = S + jnp.einsum("bhk,bhv->bhkv", Pk / s[..., None], e)
        return (S, P), jnp.einsum("bhkv,bhk->bhv", S, q_t)
    B, T, H, K = q.shape
    S0 = jnp.zeros((B, H, K, v.shape[-1]), q.dtype)
    P0 = jnp.broadcast_to(jnp.eye(K, dtype=q.dtype) / p["lam"][:, None, None], (B, H, K, K))
    _, o = lax.scan(body, (S0, P0), (q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1)))
    return o.swapaxes(0, 1)


PLAIN = {"linear": plain_linear, "delta": plain_delta, "ridge": plain_ridge}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--V", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    B, T, H, K, V = a.B, a.T, a.H, a.K, a.V
    q = jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, H, K)) / np.sqrt(K), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.float32)
    inputs = {"beta": jnp.asarray(rng.uniform(0.1, 0.9, (B, T, H)), jnp.float32)}
    print(f"# JAX {jax.__version__} on {jax.devices()[0].platform}, float32, B={B} H={H} T={T} K={K} V={V}, "
          f"median of {a.repeats}")
    print(f"{'layer':8s} {'form':12s} {'fwd ms':>9s} {'plain fwd':>10s} {'ratio':>6s} {'f+b ms':>9s} "
          f"{'plain f+b':>10s} {'ratio':>6s}")
    rec = {}
    for name in ("linear", "delta", "ridge"):
        m = load(name)
        params = m.init_params(H, K, V, jnp.float32)
        ins = {n: inputs[n] for n in m.INPUTS}
        plain = PLAIN[name]
        pf = jax.jit(lambda q, k, v: plain(q, k, v, params, ins))
        pg = jax.jit(jax.grad(lambda q, k, v: jnp.sum(plain(q, k, v, params, ins) ** 2), argnums=(0, 1, 2)))
        t_pf = median_seconds(lambda: jax.block_until_ready(pf(q, k, v)), a.repeats)
        t_pg = median_seconds(lambda: jax.block_until_ready(pg(q, k, v)), a.repeats)
        for form in m.FORMS:
            gf = jax.jit(lambda q, k, v, form=form: m.forward(q, k, v, params, form=form, **ins)[0])
            gg = jax.jit(jax.grad(lambda q, k, v, form=form: jnp.sum(m.forward(q, k, v, params, form=form,
                                                                                **ins)[0] ** 2), argnums=(0, 1, 2)))
            np.testing.assert_allclose(gf(q, k, v), pf(q, k, v), rtol=2e-3, atol=2e-3)
            t_f = median_seconds(lambda: jax.block_until_ready(gf(q, k, v)), a.repeats)
            t_g = median_seconds(lambda: jax.block_until_ready(gg(q, k, v)), a.repeats)
            rec[(name, form)] = (t_f, t_g)
            print(f"{name:8s} {form:12s} {1e3 * t_f:9.1f} {1e3 * t_pf:10.1f} {t_f / t_pf:6.2f} {1e3 * t_g:9.1f} "
                  f"{1e3 * t_pg:10.1f} {t_g / t_pg:6.2f}")
    rf, rg = rec[("ridge", "recurrent")]
    df, dg = rec[("delta", "recurrent")]
    print(f"ridge/delta (recurrent): fwd {rf / df:.2f}, fwd+bwd {rg / dg:.2f}  (FLOP floor ≈ 2)")


if __name__ == "__main__":
    main()

"""CPU benchmark: numba_cpu forward and fwd+bwd vs the JAX recurrent form and batched numpy; decode latency.

Shape B = 8, H = 4, T = 1024, K = V = 32, float32 (ridge, delta, linear). Prints one table of median wall
times (after one warm-up call that includes compilation) and ratios to numba_cpu. Run:
    PYTHONPATH=. python3 benchmarks/numba_cpu_bench.py [--layers ridge,delta] [--T 1024] [--reps 3]
"""

from __future__ import annotations

import argparse
import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds


def numpy_batched(name, q, k, v, params, inputs):
    """The recurrent form in numpy, batched over (B, H) with einsum per token (no gradients)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = np.empty((B, T, H, V), q.dtype)
    S = np.zeros((B, H, K, V), q.dtype)
    P = np.broadcast_to(np.eye(K, dtype=q.dtype) / params.get("lam", np.ones(H, q.dtype))[:, None, None],
                        (B, H, K, K)).copy()
    for t in range(T):
        qt, kt, vt = q[:, t], k[:, t], v[:, t]
        if name == "linear":
            S += kt[..., :, None] * vt[..., None, :]
            o[:, t] = params["eta"][None, :, None] * np.einsum("bhkv,bhk->bhv", S, qt)
        elif name == "delta":
            e = vt - np.einsum("bhkv,bhk->bhv", S, kt)
            S += inputs["beta"][:, t, :, None, None] * kt[..., :, None] * e[..., None, :]
            o[:, t] = np.einsum("bhkv,bhk->bhv", S, qt)
        else:
            Pk = np.einsum("bhij,bhj->bhi", P, kt)
            s = 1 + np.einsum("bhk,bhk->bh", kt, Pk)
            P -= Pk[..., :, None] * Pk[..., None, :] / s[..., None, None]
            e = vt - np.einsum("bhkv,bhk->bhv", S, kt)
            S += (Pk / s[..., None])[..., :, None] * e[..., None, :]
            o[:, t] = np.einsum("bhkv,bhk->bhv", S, qt)
    return o


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="ridge,delta,linear")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    B, H, T, K, V = a.B, a.H, a.T, a.K, a.K
    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((B, T, H, K)).astype(np.float32) / np.sqrt(K) for _ in range(2))
    v, do = (rng.standard_normal((B, T, H, V)).astype(np.float32) for _ in range(2))
    beta = rng.uniform(0.05, 0.9, (B, T, H)).astype(np.float32)
    print(f"B={B} H={H} T={T} K=V={K} float32, median of {a.reps}; ratio = time / numba_cpu time "
          f"(jax {jax.__version__} on {jax.devices()[0].platform})")
    print(f"{'layer':7} {'what':10} {'numba_cpu':>10} {'jax recur':>10} {'numpy':>10} {'jax/nb':>7} {'np/nb':>7}")
    for name in a.layers.split(","):
        nm = importlib.import_module(f"generated.{name}.layer_numba_cpu")
        jm = importlib.import_module(f"generated.{name}.layer_jax")
        params = nm.init_params(H, K, V, np.float32)
        inputs = {"beta": beta} if name == "delta" else {}
        jf = jax.jit(lambda q, k, v, p, i: jm.forward(q, k, v, p, **i)[0])
        jg = jax.jit(jax.grad(lambda q, k, v, p, i: jnp.sum(jm.forward(q, k, v, p, **i)[0] * do), argnums=(0, 1, 2)))
        t_nf = median_seconds(lambda: nm.forward(q, k, v, params, **inputs), a.reps)
        t_jf = median_seconds(lambda: jf(q, k, v, params, inputs).block_until_ready(), a.reps)
        t_np = median_seconds(lambda: numpy_batched(name, q, k, v, params, inputs), 1)
        t_nb = median_seconds(lambda: (nm.forward(q, k, v, params, **inputs),
                                       nm.backward(q, k, v, params, do, **inputs)), a.reps)
        t_jb = median_seconds(lambda: jax.block_until_ready(jg(q, k, v, params, inputs)), a.reps)
        print(f"{name:7} {'forward':10} {t_nf:10.4f} {t_jf:10.4f} {t_np:10.4f} {t_jf / t_nf:7.2f} {t_np / t_nf:7.2f}")
        print(f"{name:7} {'fwd+bwd':10} {t_nb:10.4f} {t_jb:10.4f} {'-':>10} {t_jb / t_nb:7.2f} {'-':>7}")
        st = nm.init_state(B, H, K, V, params, np.float32)
        ins_t = {n: x[:, 0] for n, x in inputs.items()}
        n_tok = 200
        t0 = time.perf_counter()
        for t in range(n_tok):
            _, st = nm.step(st, q[:, t], k[:, t], v[:, t], params, **ins_t)
        dt = (time.perf_counter() - t0) / n_tok
        jstep = jax.jit(lambda s, qt, kt, vt, p, i: jm.step(s, qt, kt, vt, p, **i))
        js = jm.init_state(B, H, K, V, params, jnp.float32)
        jax.block_until_ready(jstep(js, q[:, 0], k[:, 0], v[:, 0], params, ins_t))
        t0 = time.perf_counter()
        for t in range(n_tok):
            _, js = jstep(js, q[:, t], k[:, t], v[:, t], params, ins_t)
        jax.block_until_ready(js)
        jdt = (time.perf_counter() - t0) / n_tok
        print(f"{name:7} {'decode/tok':10} {dt * 1e6:8.1f}us {jdt * 1e6:8.1f}us {'-':>10} {jdt / dt:7.2f} {'-':>7}")


if __name__ == "__main__":
    main()

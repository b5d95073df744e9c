"""GPU check (needs a CUDA GPU; run by benchmarks/gpu_check.sh): CUDA kernels vs the JAX outputs, and timings.

For each shipped layer at B = 8, H = 4, T = 1024, K = V = 32, float32: the numba_cuda forward output and
dq against JAX (jax[cuda] on the same GPU if present, else JAX on CPU) to 1e-4 relative, then median
wall times of numba_cuda (device arrays in and out) and JAX-on-GPU, forward and fwd+bwd.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
from numba import cuda

from timing import median_seconds


def main() -> None:
    assert cuda.is_available(), "no CUDA GPU visible to numba"
    B, H, T, K = 8, 4, 1024, 32
    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((B, T, H, K)).astype(np.float32) / np.sqrt(K) for _ in range(2))
    v, do = (rng.standard_normal((B, T, H, K)).astype(np.float32) for _ in range(2))
    beta = rng.uniform(0.05, 0.9, (B, T, H)).astype(np.float32)
    print(f"numba-cuda on {cuda.get_current_device().name}; jax on {jax.devices()[0]}")
    for name in ("ridge", "delta", "linear"):
        cm = importlib.import_module(f"generated.{name}.layer_numba_cuda")
        jm = importlib.import_module(f"generated.{name}.layer_jax")
        params = cm.init_params(H, K, K, np.float32)
        inputs = {"beta": beta} if name == "delta" else {}
        o = cm.forward(q, k, v, params, **inputs)[0]
        g = cm.backward(q, k, v, params, do, **inputs)
        oj = np.asarray(jm.forward(q, k, v, params, **inputs)[0])
        jg = jax.jit(jax.grad(lambda q, k, v, p, i: jnp.sum(jm.forward(q, k, v, p, **i)[0] * do), argnums=(0, 1, 2)))
        gq = np.asarray(jg(q, k, v, params, inputs)[0])
        for what, a, b in (("o", o, oj), ("dq", g["dq"], gq)):
            err = np.max(np.abs(a - b)) / np.max(np.abs(b))
            print(f"{name:7} {what:3} relative error vs JAX {err:.2e}")
            assert err < 1e-4, (name, what, err)
        dev = [cuda.to_device(x) for x in (q, k, v, do)]
        dins = {n: cuda.to_device(x) for n, x in inputs.items()}
        sync = cuda.synchronize
        t_cf = median_seconds(lambda: (cm.forward(*dev[:3], params, **dins), sync()))
        t_cb = median_seconds(lambda: (cm.forward(*dev[:3], params, **dins), cm.backward(*dev[:3], params, dev[3], **dins),
                            sync()))
        jf = jax.jit(lambda q, k, v, p, i: jm.forward(q, k, v, p, **i)[0])
        jq, jk, jv = (jnp.asarray(x) for x in (q, k, v))
        t_jf = median_seconds(lambda: jf(jq, jk, jv, params, inputs).block_until_ready())
        t_jb = median_seconds(lambda: jax.block_until_ready(jg(jq, jk, jv, params, inputs)))
        print(f"{name:7} forward  numba_cuda {t_cf * 1e3:8.2f} ms  jax {t_jf * 1e3:8.2f} ms  ratio {t_jf / t_cf:6.2f}")
        print(f"{name:7} fwd+bwd  numba_cuda {t_cb * 1e3:8.2f} ms  jax {t_jb * 1e3:8.2f} ms  ratio {t_jb / t_cb:6.2f}")


if __name__ == "__main__":
    main()

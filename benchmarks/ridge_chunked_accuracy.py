"""float32 accuracy of the ridge layer's chunked form next to its recurrent form, against a float64 reference.

Run: ``python3 benchmarks/ridge_chunked_accuracy.py [--T 256] [--K 32] [--chunk 64]``.

For λ ∈ {1e-3, 1e-1, 1} (unit-variance keys scaled by 1/√K, so ‖k‖ ≈ 1) it prints one Markdown row: κ = max_t
cond(Ā_t), and for each float32 form the largest error of the outputs and of the gradients (q, k, v, λ of a
random linear loss on the outputs, from the default initial state), each relative to the largest magnitude of
the float64 recurrent form's value.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import mesagen  # noqa: E402,F401 -- before jax (mesagen._xla_cpu)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)
from conftest import load_generated, make_inputs  # noqa: E402


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-300)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=64)
    args = ap.parse_args()
    m = load_generated("ridge")
    B, H, T, K = 2, 2, args.T, args.K
    print(f"B={B}, H={H}, T={T}, K=V={K}, chunk_size={args.chunk}; errors relative to the largest magnitude")
    print()
    print("| λ | κ | recurrent f32: o | recurrent f32: worst gradient | chunked f32: o | chunked f32: worst gradient |")
    print("|---|---|---|---|---|---|")
    for lam in (1e-3, 1e-1, 1.0):
        q, k, v, _, _ = make_inputs(0, "ridge", b=B, t=T, h=H, k=K, v=K)
        params = {"lam": np.full(H, lam)}
        do = np.random.default_rng(1).standard_normal((B, T, H, K))
        A = np.cumsum(np.einsum("bthk,bthj->bthkj", k, k), axis=1) + lam * np.eye(K)
        kappa = float(np.max(np.linalg.cond(A)))

        def run(dtype, form, **kw):
            c = lambda x: jnp.asarray(x, dtype)  # noqa: E731
            f = lambda q, k, v, lam: jnp.sum(c(do) * m.forward(q, k, v, {"lam": lam}, form=form, **kw)[0])  # noqa
            o = m.forward(c(q), c(k), c(v), {"lam": c(params["lam"])}, form=form, **kw)[0]
            return o, jax.grad(f, (0, 1, 2, 3))(c(q), c(k), c(v), c(params["lam"]))

        o64, g64 = run(jnp.float64, "recurrent")
        row = [f"{lam:g}", f"{kappa:.1e}"]
        for form, kw in (("recurrent", {}), ("chunked", {"chunk_size": args.chunk})):
            o, g = run(jnp.float32, form, **kw)
            row += [f"{rel(o, o64):.1e}", f"{max(rel(a, b) for a, b in zip(g, g64)):.1e}"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()

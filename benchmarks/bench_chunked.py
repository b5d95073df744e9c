"""Speed and backward memory of the chunked form next to the recurrent form, every layer that offers it, one run.

Run: ``python3 benchmarks/bench_chunked.py [--B 8] [--H 4] [--T 1024] [--K 32] [--chunks 64 16] [--repeats 3]
[--specs gated_delta kda]``.

For each spec in ``generated/`` whose JAX module offers ``form="chunked"`` it prints one Markdown row
per chunk size (float32, K = V, random time-varying gates and step sizes; the delta-rule family's chunked form is
the WY / UT one, the ridge layer's the exact prefix-Woodbury one): the forward wall time and the forward+backward wall time
(``jax.grad`` of a sum of the outputs with respect to q, k, v and the per-token inputs) of the recurrent and
the chunked form, both jitted, medians of ``--repeats`` calls after a warm-up, with chunked ÷ recurrent
ratios (what carries across machines), and the temporary memory XLA reports for the compiled
forward+backward of each form (``compile().memory_analysis().temp_size_in_bytes``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import mesagen  # noqa: E402,F401 -- before jax (mesagen._xla_cpu)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from conftest import SHIPPED, make_inputs  # noqa: E402
from timing import median_seconds  # noqa: E402


def load(name: str):
    path = ROOT / "generated" / name / "layer_jax.py"
    spec = importlib.util.spec_from_file_location(f"bench_chunked_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure(m, form, args, repeats, **kw):
    """(forward seconds, forward+backward seconds, forward+backward temporary bytes) of one form."""
    q, k, v, params, inputs = args
    fwd = jax.jit(lambda q, k, v, i: m.forward(q, k, v, params, form=form, **kw, **i)[0])
    loss = lambda q, k, v, i: jnp.sum(m.forward(q, k, v, params, form=form, **kw, **i)[0])  # noqa: E731
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    t_f = median_seconds(lambda: jax.block_until_ready(fwd(q, k, v, inputs)), repeats)
    t_b = median_seconds(lambda: jax.block_until_ready(bwd(q, k, v, inputs)), repeats)
    mem = bwd.lower(q, k, v, inputs).compile().memory_analysis().temp_size_in_bytes
    return t_f, t_b, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--chunks", type=int, nargs="+", default=[64, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--specs", nargs="+", default=None, help="only these specs (default: every one with a chunked form)")
    args = ap.parse_args()
    B, H, T, K = args.B, args.H, args.T, args.K
    print(f"B={B}, H={H}, T={T}, K=V={K}, float32, {jax.devices()[0].device_kind}")
    print()
    print("| spec | chunk_size | recurrent fwd | chunked fwd | fwd ratio | recurrent fwd+bwd | chunked fwd+bwd | fwd+bwd ratio "
          "| bwd temp memory recurrent / chunked |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.specs or SHIPPED:
        if name not in SHIPPED:
            raise SystemExit(f"--specs: unknown spec {name!r} (shipped: {SHIPPED})")
        if not (ROOT / "generated" / name / "layer_jax.py").exists():
            continue
        m = load(name)
        if "chunked" not in m.FORMS:
            continue
        data = make_inputs(1, name, b=B, t=T, h=H, k=K, v=K, dtype=np.float32)
        rf, rb, rm = measure(m, "recurrent", data, args.repeats)
        for C in args.chunks:
            cf, cb, cm = measure(m, "chunked", data, args.repeats, chunk_size=C)
            print(f"| {name} | {C} | {1e3 * rf:.1f} ms | {1e3 * cf:.1f} ms | {cf / rf:.3f} | {1e3 * rb:.1f} ms | "
                  f"{1e3 * cb:.1f} ms | {cb / rb:.3f} | {rm / 2**20:.1f} MiB / {cm / 2**20:.1f} MiB |", flush=True)


if __name__ == "__main__":
    main()

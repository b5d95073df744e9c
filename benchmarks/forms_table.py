"""Every shipped spec in every form at the shapes of issue 10: speed, memory, the fraction of sgemm, decode latency.

Run: ``python3 benchmarks/forms_table.py [--T 1024 4096] [--K 32 64] [--B 8] [--H 4] [--repeats 1]
[--specs ridge gated_delta] [--forms chunked numba_cpu numpy] [--max-temp-gib 3] [--no-numba]``.

One run, everything side by side (float32, CPU, K = V, random time-varying gates and step sizes from
``tests/conftest.make_inputs``; rls_forgetting and mesanet get mild gates −U(0.001, 0.01) because strong forgetting
over thousands of tokens winds their regulariser down to a numerically singular system, docs/numerics.md). For
each (T, K) and each spec it prints one Markdown row per form of the JAX module, plus one for the Numba CPU
module (recurrent):

* **fwd / fwd+bwd ms**: median wall time of the jitted forward and of ``jax.grad`` of a weighted sum of the
  outputs with respect to q, k, v, the parameters and the per-token inputs (Numba: ``forward`` / ``forward`` +
  ``backward``), after a warm-up call that compiles;
* **tokens/s**: B·T / (fwd+bwd time);
* **temp MiB**: the temporary memory XLA reports for the compiled forward+backward
  (``jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes``); a form whose estimate exceeds
  ``--max-temp-gib`` is compiled but not run (closed forms at T = 4096 store a T × T mask or a K × K matrix
  per position);
* **% sgemm**: the useful FLOPs of the forward+backward (:func:`useful_flops`: the cheapest exact recurrence
  of the layer's family, times 3 for forward+backward) divided by the time, as a fraction of this machine's
  sgemm rate measured at the start of the run (the larger of XLA's and numpy's 2048 × 2048 float32 matmul);
* **numpy batched recurrent** (linear, delta, ridge only): the recurrence in plain numpy, batched over
  (batch, head) with one einsum per token (``numba_cpu_bench.numpy_batched``), forward only: the baseline of
  issue 10's "Numba CPU forward ≥ 5× batched numpy";
* **decode µs**: one jitted ``step`` for a batch of B at position T (after a forward of T tokens; the KV-cache
  layers attend over T cached tokens), per token and layer.

The load average at the start and end is printed: on a shared machine only ratios within one run carry over.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import mesagen  # noqa: E402,F401 -- before jax (mesagen._xla_cpu)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from conftest import SHIPPED, load_generated, make_inputs  # noqa: E402
from numba_cpu_bench import numpy_batched  # noqa: E402
from timing import median_seconds  # noqa: E402

LINEAR = ("linear", "simple_gla", "retention", "gla")
DELTA = ("delta", "gated_delta", "kda", "implicit_delta")
EXACT = ("ridge", "rls_forgetting", "mesanet")
KERNEL = ("softmax", "forgetting_attn")
#: Specs that numba_cpu_bench.numpy_batched implements.
NUMPY = ("linear", "delta", "ridge")


def useful_flops(name: str, B: int, T: int, H: int, K: int, V: int) -> float:
    """Forward FLOPs of the cheapest exact recurrence of ``name``'s family (a multiply-add counts 2).

    Per token and head: linear family 4KV (state update, readout); delta family 6KV (Sᵀk, update, readout); the
    exact ridge family 2(3K² + 2KV) (Sherman–Morrison: Pk, the rank-one update of P, the update of S, the
    readout through P and S; mesanet counted as if it were solved this way); gd with s steps 2((s + 1)K² + 2KV)
    (running sums, s Horner products, readout); softmax attention 2(K + V) per (query, key) pair, T(T + 1)/2
    pairs per sequence and head.
    """
    if name in KERNEL:
        return 2.0 * (K + V) * B * H * T * (T + 1) / 2
    per = {**{n: 4 * K * V for n in LINEAR}, **{n: 6 * K * V for n in DELTA},
           **{n: 2 * (3 * K * K + 2 * K * V) for n in EXACT}, "gd": 2 * (4 * K * K + 2 * K * V)}[name]
    return float(per) * B * T * H


def sgemm_flops_per_s(n: int = 2048) -> float:
    """This machine's float32 matmul rate: the larger of XLA's (jitted ``jnp.dot``) and numpy's, FLOP/s."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    xa = jnp.asarray(a)
    dot = jax.jit(jnp.dot)
    t_xla = median_seconds(lambda: dot(xa, xa).block_until_ready(), 3)
    t_np = median_seconds(lambda: a @ a, 3)
    return 2.0 * n ** 3 / min(t_xla, t_np)


def load(name: str, backend: str):
    """generated/NAME/layer_BACKEND.py imported (``conftest.load_generated``), or None when it does not exist."""
    return load_generated(name, backend) if (ROOT / "generated" / name / f"layer_{backend}.py").exists() else None


def arguments(name: str, B: int, T: int, H: int, K: int):
    """float32 numpy (q, k, v [B, T, H, K], params, inputs) of ``tests/conftest.make_inputs`` with V = K; mild
    gates for rls_forgetting and mesanet (see the module docstring)."""
    q, k, v, params, inputs = make_inputs(0, name, b=B, t=T, h=H, k=K, v=K, dtype=np.float32)
    if name in ("rls_forgetting", "mesanet"):
        inputs["g"] = -np.random.default_rng(1).uniform(0.001, 0.01, (B, T, H)).astype(np.float32)
    return q, k, v, params, inputs


def jax_arguments(name: str, B: int, T: int, H: int, K: int):
    """:func:`arguments` as JAX arrays (params and inputs as dicts of arrays)."""
    return tuple({n: jnp.asarray(y) for n, y in x.items()} if isinstance(x, dict) else jnp.asarray(x)
                 for x in arguments(name, B, T, H, K))


def jax_row(m, name, form, B, T, H, K, repeats, max_temp):
    """(fwd s, fwd+bwd s, XLA temp bytes) of one JAX form; the times are None when the temp estimate exceeds
    ``max_temp`` bytes (compiled, not run)."""
    q, k, v, params, inputs = jax_arguments(name, B, T, H, K)
    w = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, H, K)).astype(np.float32))

    def fwd(q, k, v, params, inputs):
        return m.forward(q, k, v, params, form=form, **inputs)[0]

    def loss(q, k, v, params, inputs):
        return jnp.sum(w * fwd(q, k, v, params, inputs))

    f = jax.jit(fwd)
    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    temp = g.lower(q, k, v, params, inputs).compile().memory_analysis().temp_size_in_bytes
    if temp > max_temp:
        return None, None, temp
    t_f = median_seconds(lambda: f(q, k, v, params, inputs).block_until_ready(), repeats)
    t_g = median_seconds(lambda: jax.block_until_ready(g(q, k, v, params, inputs)), repeats)
    return t_f, t_g, temp


def decode_us(m, name, B, T, H, K, repeats):
    """One jitted ``step`` at position T for a batch of B, microseconds."""
    q, k, v, params, inputs = jax_arguments(name, B, T + 1, H, K)
    kw = {"capacity": T + 1} if name in KERNEL else {}
    state = m.init_state(B, H, K, K, params, jnp.float32, **kw)
    _, state = m.forward(q[:, :T], k[:, :T], v[:, :T], params, initial_state=state, output_final_state=True,
                         **{n: x[:, :T] for n, x in inputs.items()})
    step = jax.jit(lambda st, qt, kt, vt, ins: m.step(st, qt, kt, vt, params, **ins))
    ins = {n: x[:, T] for n, x in inputs.items()}
    t = median_seconds(lambda: jax.block_until_ready(step(state, q[:, T], k[:, T], v[:, T], ins)), max(repeats, 5))
    return t * 1e6


def numba_row(nm, name, B, T, H, K, repeats):
    """(forward s, forward + backward s) of the Numba CPU module, numpy float32 in and out."""
    q, k, v, params, inputs = arguments(name, B, T, H, K)
    do = np.random.default_rng(2).standard_normal((B, T, H, K)).astype(np.float32)
    t_f = median_seconds(lambda: nm.forward(q, k, v, params, **inputs), repeats)
    t_g = median_seconds(lambda: nm.backward(q, k, v, params, do, **inputs), repeats)
    return t_f, t_f + t_g


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--K", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--specs", nargs="+", default=list(SHIPPED))
    ap.add_argument("--max-temp-gib", type=float, default=3.0)
    ap.add_argument("--no-numba", action="store_true")
    ap.add_argument("--forms", nargs="+", default=None,
                    help="rows to run: JAX forms (recurrent, closed_form, chunked), numba_cpu, numpy (default: all)")
    a = ap.parse_args(argv)
    want = lambda row: a.forms is None or row in a.forms  # noqa: E731
    unknown = sorted(set(a.specs) - set(SHIPPED))
    if unknown:
        ap.error(f"unknown spec(s) {unknown}; shipped: {', '.join(SHIPPED)}")
    sgemm = sgemm_flops_per_s()
    print(f"jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} cores, sgemm {sgemm / 1e9:.1f} GFLOP/s "
          f"(measured), load average at start {os.getloadavg()[0]:.1f}; B={a.B} H={a.H} K=V, float32\n", flush=True)
    print("| spec | T | K | form | fwd ms | fwd+bwd ms | tokens/s | temp MiB | % sgemm | decode µs |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    t0 = time.perf_counter()
    for T in a.T:
        for K in a.K:
            for name in a.specs:
                m = load(name, "jax")
                flops = 3 * useful_flops(name, a.B, T, a.H, K, K)
                dec = decode_us(m, name, a.B, T, a.H, K, a.repeats)
                for form in filter(want, m.FORMS):
                    t_f, t_g, temp = jax_row(m, name, form, a.B, T, a.H, K, a.repeats, a.max_temp_gib * 2 ** 30)
                    if t_f is None:
                        print(f"| {name} | {T} | {K} | {form} | not run: XLA temp {temp / 2 ** 30:.1f} GiB | | | "
                              f"{temp / 2 ** 20:.0f} | | |", flush=True)
                        continue
                    print(f"| {name} | {T} | {K} | {form} | {t_f * 1e3:.1f} | {t_g * 1e3:.1f} | {a.B * T / t_g:,.0f} | "
                          f"{temp / 2 ** 20:.0f} | {100 * flops / t_g / sgemm:.2f} | {dec:.0f} |", flush=True)
                nm = None if a.no_numba or not want("numba_cpu") else load(name, "numba_cpu")
                if nm is not None:
                    t_f, t_g = numba_row(nm, name, a.B, T, a.H, K, a.repeats)
                    print(f"| {name} | {T} | {K} | numba_cpu recurrent | {t_f * 1e3:.1f} | {t_g * 1e3:.1f} | "
                          f"{a.B * T / t_g:,.0f} | – | {100 * flops / t_g / sgemm:.2f} | – |", flush=True)
                if name in NUMPY and want("numpy"):
                    q, k, v, params, inputs = arguments(name, a.B, T, a.H, K)
                    t_f = median_seconds(lambda: numpy_batched(name, q, k, v, params, inputs), a.repeats)
                    print(f"| {name} | {T} | {K} | numpy batched recurrent | {t_f * 1e3:.1f} | – | – | – | "
                          f"{100 * flops / 3 / t_f / sgemm:.2f} (fwd) | – |", flush=True)
    print(f"\nwall {time.perf_counter() - t0:.0f} s; load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

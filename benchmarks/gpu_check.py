"""GPU check (needs a CUDA GPU; run by benchmarks/gpu_check.sh): every shipped layer's CUDA kernels against JAX on
the same GPU, repeatability of the CUDA kernels (the race check), and JAX timings of every form.

Part 1, per spec (B = 4, H = 4, T = 256, K = V = 32, float32, random time-varying gates and step sizes): the
numba_cuda forward output, final state and backward (dq, dk, dv) against JAX autodiff on the GPU, relative to
the largest entry (bound 1e-3 for the exact solvers, whose float32 conditioning is weaker, 1e-4 otherwise); and
three forward/backward runs that must be bit-identical (a data race shows up as run-to-run differences).

Part 2, per spec and form (B = 8, H = 4, T = 2048, K = V = 64, float32; the issue-10 shapes): JAX forward and
forward+backward median wall times on the GPU, and tokens/s; the chunked form's output against the recurrent
form's.

Prints one Markdown table per part; a failing spec is reported in its row and the script goes on (exit 1 at the
end if any check failed). Everything is measured in this one run.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from timing import median_seconds

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXACT = ("ridge", "rls_forgetting", "mesanet")


def specs() -> list[str]:
    return sorted(p.name for p in (ROOT / "generated").iterdir() if (p / "layer_jax.py").exists())


def make(name, jm, B, T, H, K, V, rng):
    """q, k, v, do, params, inputs in float32 for one spec (gates mild and time-varying, step sizes in (0.05, 0.9))."""
    q, k = (rng.standard_normal((B, T, H, K)).astype(np.float32) / np.sqrt(K) for _ in range(2))
    v, do = (rng.standard_normal((B, T, H, V)).astype(np.float32) for _ in range(2))
    params = {n: np.asarray(x) for n, x in jm.init_params(H, K, V, jnp.float32).items()}
    inputs = {}
    for n, spec in jm.INPUTS.items():
        shape = (B, T, H) + ((K,) if spec["shape"][-1] == "K" else (V,) if spec["shape"][-1] == "V" else ())
        if spec["role"] == "gate":
            x = -rng.uniform(0.01, 0.3, shape)
            inputs[n] = (x if spec["space"] == "log" else np.exp(x)).astype(np.float32)
        else:
            inputs[n] = rng.uniform(0.05, 0.9, shape).astype(np.float32)
    return q, k, v, do, params, inputs


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def part1(names, failures) -> None:
    from numba import cuda

    assert cuda.is_available(), "no CUDA GPU visible to numba"
    print(f"\nnumba-cuda on {cuda.get_current_device().name}; jax {jax.__version__} on {jax.devices()[0]}\n")
    print("| spec | o vs JAX | final state vs JAX | dq, dk, dv vs JAX | repeatable (3 runs) |")
    print("|---|---|---|---|---|")
    B, T, H, K, V = 4, 256, 4, 32, 32
    for name in names:
        try:
            jm = importlib.import_module(f"generated.{name}.layer_jax")
            cm = importlib.import_module(f"generated.{name}.layer_numba_cuda")
            q, k, v, do, params, inputs = make(name, jm, B, T, H, K, V, np.random.default_rng(0))
            o, st = cm.forward(q, k, v, params, output_final_state=True, **inputs)
            g = cm.backward(q, k, v, params, do, **inputs)
            oj, sj = jm.forward(q, k, v, params, output_final_state=True, **inputs)
            loss = lambda q, k, v: jnp.sum(jm.forward(q, k, v, params, **inputs)[0] * do)  # noqa: E731
            gj = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
            e_o = rel(o, oj)
            e_s = max(rel(getattr(st, f) if hasattr(st, f) else st[f], getattr(sj, f)) for f in sj._fields)
            e_g = max(rel(g[n], x) for n, x in zip(("dq", "dk", "dv"), gj))
            runs = [(np.asarray(cm.forward(q, k, v, params, **inputs)[0]),
                     np.asarray(cm.backward(q, k, v, params, do, **inputs)["dq"])) for _ in range(3)]
            same = all(np.array_equal(r[0], runs[0][0]) and np.array_equal(r[1], runs[0][1]) for r in runs)
            bound = 1e-3 if name in EXACT else 1e-4
            ok = max(e_o, e_s, e_g) < bound and same
            if not ok:
                failures.append(f"{name}: cuda vs jax {max(e_o, e_s, e_g):.1e} (bound {bound:.0e}), repeatable {same}")
            print(f"| {name} | {e_o:.1e} | {e_s:.1e} | {e_g:.1e} | {'yes' if same else 'NO'} |")
        except Exception as exc:  # report and go on
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"| {name} | error: {type(exc).__name__}: {str(exc)[:80]} | | | |")
            traceback.print_exc(file=sys.stderr)


def part2(names, failures, deadline) -> None:
    B, T, H, K, V = 8, 2048, 4, 64, 64
    print(f"\nJAX on {jax.devices()[0]}, B={B} T={T} H={H} K=V={K} float32 (median of 5 after a warm-up)\n")
    print("| spec | form | forward ms | fwd+bwd ms | forward Mtok/s | chunked vs recurrent |")
    print("|---|---|---|---|---|---|")
    for name in names:
        jm = importlib.import_module(f"generated.{name}.layer_jax")
        q, k, v, do, params, inputs = make(name, jm, B, T, H, K, V, np.random.default_rng(1))
        q, k, v, do = (jnp.asarray(x) for x in (q, k, v, do))
        inputs = {n: jnp.asarray(x) for n, x in inputs.items()}
        ref = None
        for form in jm.FORMS:
            if time.monotonic() > deadline:
                print(f"| {name} | {form} | skipped (time) | | | |")
                continue
            try:
                fwd = jax.jit(lambda q, k, v, i: jm.forward(q, k, v, params, form=form, **i)[0])
                loss = lambda q, k, v, i: jnp.sum(jm.forward(q, k, v, params, form=form, **i)[0] * do)  # noqa: E731
                bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                out = np.asarray(fwd(q, k, v, inputs))
                t_f = median_seconds(lambda: fwd(q, k, v, inputs).block_until_ready())
                t_b = median_seconds(lambda: jax.block_until_ready(bwd(q, k, v, inputs)))
                if form == "recurrent":
                    ref = out
                cmp = f"{rel(out, ref):.1e}" if form == "chunked" and ref is not None else ""
                print(f"| {name} | {form} | {t_f * 1e3:.2f} | {t_b * 1e3:.2f} | {B * T / t_f / 1e6:.2f} | {cmp} |")
            except Exception as exc:
                failures.append(f"{name}/{form}: {type(exc).__name__}: {exc}")
                print(f"| {name} | {form} | error: {type(exc).__name__}: {str(exc)[:80]} | | | |")


def main() -> int:
    names = specs()
    failures: list[str] = []
    start = time.monotonic()
    part1(names, failures)
    part2(names, failures, start + float(os.environ.get("GPU_CHECK_SECONDS", "420")))  # part 2's time budget
    print(f"\nwall time {time.monotonic() - start:.0f} s")
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

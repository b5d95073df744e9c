"""Accuracy and speed of every shipped layer, side by side in one run: the table of the closing notes and the README.

Run: ``python3 benchmarks/family_table.py [--T 1024] [--B 8] [--H 4] [--K 32] [--repeats 3]``.

For each spec in ``generated/`` it prints one Markdown row:

* **float64 error**: max relative error of the generated JAX layer (every form) against the independent float64
  reference (``mesagen.reference``) on B=2, T=63, H=2, K=3, V=5 with random, time-varying gates;
* **float32 error**: the same with float32 inputs (the reference stays float64);
* **timings** (float32, B, H, T, K = V as given, CPU): recurrent-forward wall time of the JAX module and of the
  Numba CPU module (median of ``--repeats`` after a warm-up), the JAX parallel form where one exists, and each
  time relative to ``linear`` in the same run (ratios are what carries across machines).
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
from conftest import SHIPPED, make_inputs, reference  # noqa: E402
from timing import median_seconds  # noqa: E402


def load(name: str, backend: str):
    path = ROOT / "generated" / name / f"layer_{backend}.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"family_{name}_{backend}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def accuracy(m, name: str) -> tuple[float, float]:
    """(float64 error, float32 error) of every form against the float64 reference, T = 63."""
    q, k, v, params, inputs = make_inputs(0, name, t=63)
    want = reference(name, q, k, v, params, inputs)[0]
    with jax.enable_x64(True):
        e64 = max(rel(m.forward(q, k, v, params, form=f, **inputs)[0], want) for f in m.FORMS)
    c = lambda x: np.asarray(x, np.float32)  # noqa: E731
    e32 = max(rel(m.forward(c(q), c(k), c(v), {n: c(x) for n, x in params.items()}, form=f,
                            **{n: c(x) for n, x in inputs.items()})[0], want) for f in m.FORMS)
    return e64, e32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    B, T, H, K = args.B, args.T, args.H, args.K
    names = [n for n in SHIPPED if (ROOT / "generated" / n / "layer_jax.py").exists()]
    rows, base = [], {}
    for name in names:
        m = load(name, "jax")
        e64, e32 = accuracy(m, name)
        q, k, v, params, inputs = make_inputs(1, name, b=B, t=T, h=H, k=K, v=K, dtype=np.float32)
        times = {}
        for form in m.FORMS:
            if form == "closed_form" and T > 2048:
                continue
            run = jax.jit(lambda q, k, v, p, i, form=form: m.forward(q, k, v, p, form=form, **i)[0])
            times[f"jax {form}"] = median_seconds(
                lambda run=run: jax.block_until_ready(run(q, k, v, params, inputs)), args.repeats)
        nb = load(name, "numba_cpu")
        if nb is not None:
            times["numba_cpu recurrent"] = median_seconds(lambda: nb.forward(q, k, v, params, **inputs), args.repeats)
        if name == "linear":
            base = dict(times)
        rows.append((name, m.FORMS, e64, e32, times))
    print(f"B={B}, T={T}, H={H}, K=V={K}, float32, CPU ({jax.devices()[0].device_kind}); accuracy at T=63, K=3, V=5")
    print()
    print("| spec | forms | float64 error | float32 error | JAX recurrent fwd | JAX parallel fwd | Numba CPU fwd |")
    print("|---|---|---|---|---|---|---|")

    def cell(times, key):
        if key not in times:
            return "–"
        ratio = f" ({times[key] / base[key]:.2f}× linear)" if key in base and base[key] else ""
        return f"{1e3 * times[key]:.1f} ms{ratio}"

    for name, forms, e64, e32, times in rows:
        print(f"| {name} | {', '.join(forms)} | {e64:.1e} | {e32:.1e} | {cell(times, 'jax recurrent')} | "
              f"{cell(times, 'jax closed_form')} | {cell(times, 'numba_cpu recurrent')} |")


if __name__ == "__main__":
    main()

"""Speed, backward memory and float32 accuracy of the chunked form over the running statistics (gd,
rls_forgetting, mesanet) next to the recurrent and closed forms, one run.

Run: ``python3 benchmarks/stats_chunked.py [--B 8] [--H 4] [--T 1024] [--K 32] [--chunk 64] [--repeats 3]
[--specs gd rls_forgetting mesanet] [--forms recurrent closed_form chunked] [--acc-B 2]``.

For each spec it prints one Markdown row per form (float32, K = V, the random inputs of tests/conftest.py's
make_inputs: time-varying gates and importance weights, default initial state): the forward and
forward+backward wall times (``jax.grad`` of a sum of the outputs with respect to q, k, v and the per-token
inputs; jitted; medians of ``--repeats`` calls after a warm-up), the temporary memory XLA reports for the
compiled forward+backward (``compile().memory_analysis().temp_size_in_bytes``), and the float32 error of the
outputs and of the worst gradient (q, k, v, parameters, inputs, of a random linear loss) against the float64
recurrent form, each relative to the largest magnitude of the float64 value, on the first ``--acc-B`` batch rows
(the float64 reference is slow), with κ = max_t cond(Ā_t + Λ) of the systems solved there (float64; "—" for gd,
which solves none).

rls_forgetting's gates are −U(0.001, 0.01) here, a memory of a few hundred tokens, far more than K keys:
with make_inputs' −U(0.01, 0.3) the regulariser λ Γ_t decays to about e⁻¹⁶⁰ by T = 1024 while the last few
keys span only a few of the K directions, so Ā_t is numerically singular (κ ≈ 1e69; RLS with forgetting
"winds up") and every form's gradients of k, g and λ are meaningless (1e55 in float64).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import mesagen  # noqa: E402,F401 -- before jax (mesagen._xla_cpu)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)
from conftest import load_generated, make_inputs  # noqa: E402
from bench_chunked import measure  # noqa: E402


def rel(a, b):
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-300)


def value_and_grads(m, form, data, w, **kw):
    """o and the gradients of ⟨w, o⟩ with respect to q, k, v, parameters and inputs."""
    q, k, v, params, inputs = data

    def f(q, k, v, p, i):
        o = m.forward(q, k, v, p, form=form, **kw, **i)[0]
        return jnp.sum(o * w), o

    g, o = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))(q, k, v, params, inputs)
    return o, jax.tree.leaves(g)


def condition(m, name, data):
    """max_t cond(Ā_t + Λ) over batch, heads and positions (float64, numpy, from the default initial state), as a
    string; "—" for a layer that solves no system (gd)."""
    if name == "gd":
        return "—"
    q, k, v, params, inputs = data
    lam = np.asarray(params["lam"], np.float64)
    a = np.exp(np.asarray(inputs["g"], np.float64))                   # [B, T, H]
    beta = np.asarray(inputs.get("beta", np.ones_like(a)), np.float64)
    kk = np.asarray(k, np.float64)
    if name == "mesanet":                                               # φ = L2 normalisation
        kk = kk / np.linalg.norm(kk, axis=-1, keepdims=True)
    K = kk.shape[-1]
    A = np.zeros(kk.shape[:1] + kk.shape[2:3] + (K, K))
    reg = lam[None, :, None, None] * np.eye(K) if name == "rls_forgetting" else np.zeros_like(A)
    worst = 0.0
    for t in range(kk.shape[1]):
        A = a[:, t, :, None, None] * A + beta[:, t, :, None, None] * np.einsum("bhk,bhj->bhkj", kk[:, t], kk[:, t])
        reg = a[:, t, :, None, None] * reg if name == "rls_forgetting" else reg
        sys_t = A + (reg if name == "rls_forgetting" else np.einsum("hk,kj->hkj", lam, np.eye(K))[None])
        worst = max(worst, float(np.max(np.linalg.cond(sys_t))))
    return f"{worst:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--acc-B", type=int, default=2)
    ap.add_argument("--specs", nargs="+", default=["gd", "rls_forgetting", "mesanet"])
    ap.add_argument("--forms", nargs="+", default=["recurrent", "closed_form", "chunked"])
    args = ap.parse_args()
    B, H, T, K, C = args.B, args.H, args.T, args.K, args.chunk
    print(f"B={B}, H={H}, T={T}, K=V={K}, chunk_size={C}, float32, {jax.devices()[0].device_kind}; accuracy on "
          f"B={args.acc_B}")
    print()
    print("| spec | form | fwd | fwd+bwd | bwd temp memory | κ | f32 error: o | f32 error: worst gradient |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.specs:
        m = load_generated(name)
        if "chunked" not in m.FORMS:
            raise SystemExit(f"--specs: {name!r} has no chunked form")
        data32 = make_inputs(1, name, b=B, t=T, h=H, k=K, v=K, dtype=np.float32)
        if name == "rls_forgetting":                                   # a memory ≫ K (see the module docstring)
            data32[4]["g"] = -np.random.default_rng(3).uniform(0.001, 0.01, (B, T, H)).astype(np.float32)
        small = jax.tree.map(lambda a: np.asarray(a)[: args.acc_B] if np.ndim(a) >= 3 else a, data32)
        data64 = jax.tree.map(lambda a: np.asarray(a, np.float64), small)
        w = np.random.default_rng(2).standard_normal(small[0].shape[:3] + (K,))
        o64, g64 = value_and_grads(m, "recurrent", data64, w)
        kappa = condition(m, name, data64)
        for form in args.forms:
            kw = {"chunk_size": C} if form == "chunked" else {}
            t_f, t_b, mem = measure(m, form, data32, args.repeats, **kw)
            o32, g32 = value_and_grads(m, form, small, w.astype(np.float32), **kw)
            eg = max(rel(a, b) for a, b in zip(g32, g64))
            print(f"| {name} | {form} | {1e3 * t_f:.0f} ms | {1e3 * t_b:.0f} ms | {mem / 2**20:.1f} MiB | "
                  f"{kappa} | {rel(o32, o64):.1e} | {eg:.1e} |", flush=True)


if __name__ == "__main__":
    main()

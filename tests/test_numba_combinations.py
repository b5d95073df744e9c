"""Every combination the spec schema admits builds for every backend and runs; docs/specs.md §4 agrees.

The combinations come from the schema itself (tests/spec_combinations.py), so the documentation table, the
validator and the backends cannot drift apart: each admitted combination is described by exactly one row
of the table with the forms its JAX module offers, each row is realised by an admitted combination, and
each built layer runs once on a tiny input with the Numba CPU module (forward and adjoint) equal to the JAX
module (every form; reverse-mode autodiff) in float64, and the CUDA module equal to the Numba CPU module in
the CUDA simulator (a child process, tests/cuda/run_layer.py, under the race detector).

The v2 combinations (gates of every shape and space, importance weights, feature maps with a readout scale,
per-value-channel and default step sizes: ``supported_v2``) are each built for every backend and checked
through the JAX module (every form) against the rule's own float64 numpy solution (``SolverRule.float_target``,
written independently of the derivation) with the feature map, scale and exp of a log-space gate applied here.
A covering subset (every option and every solver at least once; all with ``MESAGEN_ALL_COMBINATIONS=1``) also
runs the Numba CPU module: forward against that solution, backward against central finite differences of the
forward, continuation from a state; and the CUDA module against the CPU module in the simulator.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesagen.pipeline import compile_spec
from mesagen.spec import schema
from numba_cases import close
from mesagen.reference import finite_difference_grad
from mesagen.symbolic.rules import rule_for
from spec_combinations import STEPS_MAX, STEPS_MIN, candidates, doc_rows, supported, supported_v2, v2_candidates

SUPPORTED = supported()


SUPPORTED_V2 = supported_v2()
V2_PARAMS = [pytest.param(c, id=c.id) for c in SUPPORTED_V2]


def test_schema_and_docs_table_agree():
    rows = doc_rows()
    assert len(rows) >= 6, "docs/specs.md §4 table not found or unparsable"
    for c in SUPPORTED:
        hits = [r for r in rows if r.matches(c)]
        assert len(hits) == 1, f"{c.id}: admitted by the schema but described by {len(hits)} rows of §4"
    for r in rows:
        assert any(r.matches(c) for c in SUPPORTED), f"docs §4 lists a combination the schema refuses: {r.text}"
        for kind in r.step_sizes:
            assert any(r.matches(c) and c.step_size == kind for c in SUPPORTED), (r.text, kind)
        if r.steps is not None:  # the row's step range lies inside the schema's bounds
            assert STEPS_MIN <= r.steps.start and r.steps.stop - 1 <= STEPS_MAX, r.text


def test_refused_candidates_are_refused_with_a_reason():
    """The enumeration is not vacuous: it also produces combinations the rules refuse (e.g. gd + input)."""
    admitted = SUPPORTED + supported_v2()
    refused = [c for c in candidates() + v2_candidates() if c not in admitted]
    assert refused and SUPPORTED and SUPPORTED_V2
    for c in refused:
        try:
            spec = schema.Spec.model_validate(c.doc)
        except Exception:
            continue
        assert schema.semantic_errors(spec), c.id


def _load(path, tag):
    name = f"_combo_{tag}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def build(c, tmp_path):
    """Compile ``c`` for every backend, write the files under ``tmp_path`` and return {backend: module}."""
    spec = schema.Spec.model_validate(c.doc)
    compiled = compile_spec(spec, "tests/combo.yaml")
    out = {}
    for rel, text in compiled.files.items():
        p = tmp_path / rel.replace("/", "_")
        p.write_text(text, encoding="utf-8")
        if p.suffix == ".py":
            out[p.stem.split("layer_", 1)[1]] = _load(p, re.sub(r"\W", "_", c.id))
    return out


def tiny(c, seed=5, b=1, t=5, h=2, k=3, v=2):
    """(q, k, v, do, params, inputs) float64 for combination ``c``; step sizes small enough to be stable."""
    rng = np.random.default_rng(seed)
    q, kk, vv, do = (rng.standard_normal((b, t, h, d)) for d in (k, k, v, v))
    params = {"lam": np.array([0.8, 1.7])[:h]} if c.regularizer == "ridge" else {}
    inputs = {}
    if c.step_size == "parameter":
        params["eta"] = np.array([0.3, 0.45])[:h]
    elif c.step_size == "input":
        inputs["eta"] = rng.uniform(0.1, 0.9, (b, t, h))
    return q, kk / np.sqrt(k), vv, do, params, inputs


@pytest.mark.parametrize("c", SUPPORTED, ids=[c.id for c in SUPPORTED])
def test_combination_builds_and_runs_on_every_backend(c, tmp_path, x64):
    mods = build(c, tmp_path)
    assert sorted(mods) == ["jax", "numba_cpu", "numba_cuda"]
    row = next(r for r in doc_rows() if r.matches(c))
    assert set(mods["jax"].FORMS) == row.forms, (mods["jax"].FORMS, row.text)
    q, k, v, do, params, inputs = tiny(c)
    nb, jm = mods["numba_cpu"], mods["jax"]
    o, st = nb.forward(q, k, v, params, output_final_state=True, **inputs)
    for form in jm.FORMS:
        jo, jst = jm.forward(q, k, v, params, output_final_state=True, form=form, **inputs)
        close(o, jo)
        for a, b in zip(st, jst):
            close(a, b)

    def loss(q, k, v, params, inputs):
        o, fin = jm.forward(q, k, v, params, output_final_state=True, **inputs)
        return jnp.sum(o * do) + sum(jnp.sum(x * x) for x in fin) / 2

    gq, gk, gv, gp, gi = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, params, inputs)
    g = nb.backward(q, k, v, params, do, dfinal_state=st, **inputs)
    for a, b in ((g["dq"], gq), (g["dk"], gk), (g["dv"], gv)):
        close(a, b)
    for n in params:
        close(g["d" + n], gp[n])
    for n in inputs:
        close(g["d" + n], gi[n])

    case = {"q": q, "k": k, "v": v, "do": do, "o": o, **{f"state_{i}": x for i, x in enumerate(st)}}
    case.update({f"param_{n}": x for n, x in params.items()})
    case.update({f"input_{n}": x for n, x in inputs.items()})
    case.update({f"grad_{n}": x for n, x in g.items() if n != "dinitial_state"})
    np.savez(tmp_path / "case.npz", **case)
    runner = Path(__file__).resolve().parent / "cuda" / "run_layer.py"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, str(runner), str(tmp_path / "combo_layer_numba_cuda.py"),
                           str(tmp_path / "case.npz")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def tiny_v2(c, seed=5, b=1, t=5, h=2, k=3, v=2):
    """(q, k, v, do, params, inputs) float64 for a v2 combination, from its spec document: gates α in (0.6, 0.97)
    (log or linear space as declared), step sizes in (0.1, 0.9), importance weights in (0.2, 0.9) or (0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    q, kk, vv, do = (rng.standard_normal((b, t, h, d)) for d in (k, k, v, v))
    per_head = {"lam": np.array([0.8, 1.7]), "eta": np.array([0.3, 0.45]), "alpha": np.array([0.9, 0.75])}
    params = {n: per_head[n][:h] for n in c.doc["parameters"]}
    for n, x in c.doc["parameters"].items():  # a ridge coefficient per key channel [H, K]
        if x["shape"] == ["heads", "d_k"]:
            params[n] = params[n][:, None] * (0.6 + 0.35 * np.arange(k))
    inputs = {}
    width = {"d_k": k, "d_v": v}
    for n, x in c.doc["inputs"].items():
        shape = (b, t, h) + tuple(width[a] for a in x["shape"][3:])
        if x["domain"] in ("nonpositive", "positive_unit_interval"):  # a forget gate
            a = rng.uniform(0.6, 0.97, shape)
            inputs[n] = np.log(a) if x["space"] == "log" else a
        elif x["domain"] == "positive":
            inputs[n] = rng.uniform(0.5, 1.5, shape)
        else:
            inputs[n] = rng.uniform(0.1, 0.9, shape) if n == "eta" else rng.uniform(0.2, 0.9, shape)
    return q, kk / np.sqrt(k), vv, do, params, inputs


def float_reference(c, q, k, v, params, inputs):
    """o [B, T, H, V] from the rule's float64 numpy solution per (batch, head), from the zero / default state,
    with φ and the readout scale applied to q and k and a log-space gate turned into α here."""
    spec = schema.Spec.model_validate(c.doc)
    fm = spec.objective.model.feature_map
    phi = {"identity": lambda x: x, "l2_normalize": lambda x: x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6),
           "elu_plus_one": lambda x: np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))}[fm]
    scale = spec.readout.scale
    scale = q.shape[-1] ** -0.5 if scale == "inverse_sqrt_dk" else scale
    qf, kf = scale * phi(q), phi(k)
    lin = {n: np.exp(x) if spec.inputs[n].space == "log" else x for n, x in inputs.items()}
    B, T, H = q.shape[:3]
    o = np.zeros(v.shape)
    for b in range(B):
        for h in range(H):
            data = {"q": qf[b, :, h], "k": kf[b, :, h], "v": v[b, :, h]}
            data.update({n: float(x[h]) if np.ndim(x[h]) == 0 else x[h] for n, x in params.items()})
            data.update({n: x[b, :, h] for n, x in lin.items()})
            o[b, :, h] = rule_for(spec).float_target(spec, data)
    return o


@pytest.fixture(scope="module")
def v2_built(tmp_path_factory):
    """``get(c)`` -> (folder, {backend: module}): each v2 combination built and loaded once per module, so that the
    JAX test, the Numba CPU test and the CUDA case of one combination share one build and one loaded Numba CPU
    module (Numba compiles a module's functions once per process and dtype signature: loading the file again
    would compile them again, ~10 s of CPU a module)."""
    root, cache = tmp_path_factory.mktemp("v2_combinations"), {}

    def get(c):
        if c.id not in cache:
            d = root / c.id
            d.mkdir()
            cache[c.id] = (d, build(c, d))
        return cache[c.id]

    return get


def _v2_case(c, built) -> tuple[Path, Path]:
    """Save ``c``'s CUDA case (inputs, and the CPU module's outputs and gradients) beside its build (``built``:
    the v2_built fixture)."""
    d, mods = built(c)
    cuda_path, case_path = d / "combo_layer_numba_cuda.py", d / "case.npz"
    if case_path.exists():
        return cuda_path, case_path
    nb = mods["numba_cpu"]
    q, k, v, do, params, inputs = tiny_v2(c)
    o, st = nb.forward(q, k, v, params, output_final_state=True, **inputs)
    g = nb.backward(q, k, v, params, do, dfinal_state=st, **inputs)
    case = {"q": q, "k": k, "v": v, "do": do, "o": o, **{f"state_{i}": x for i, x in enumerate(st)}}
    case.update({f"param_{n}": x for n, x in params.items()})
    case.update({f"input_{n}": x for n, x in inputs.items()})
    case.update({f"grad_{n}": x for n, x in g.items() if n != "dinitial_state"})
    np.savez(case_path, **case)
    return cuda_path, case_path


@pytest.mark.parametrize("c", V2_PARAMS)
def test_v2_combination_builds_and_its_jax_layer_matches_the_rule(c, v2_built, x64):
    """Every v2 combination: derived, verified and printed for every backend (``build``), and the JAX module's
    every form equals the rule's float64 numpy solution (1e-10). Numba CPU runs the subset below. The forms run
    in one jitted function (one XLA compile per combination instead of one per form; the eager entry and its
    argument checks are the same code for every spec and are tested on the shipped layers)."""
    mods = v2_built(c)[1]
    assert sorted(mods) == ["jax", "numba_cpu", "numba_cuda"]
    q, k, v, do, params, inputs = tiny_v2(c)
    want = float_reference(c, q, k, v, params, inputs)
    jm = mods["jax"]
    outs = jax.jit(lambda q, k, v, p, i: [jm.forward(q, k, v, p, form=f, **i)[0] for f in jm.FORMS])(
        q, k, v, params, inputs)
    for form, o in zip(jm.FORMS, outs):
        close(np.asarray(o), want)


def _cover(combos):
    """A subset in which every v2 option and every (regularizer, solver) pair occurs at least once (greedy, in
    order). The Numba modules' per-head bodies are printed per option from the same IR for every combination
    (numba_common.plain_bodies); what a combination adds on top of its options is checked for every combination
    through the JAX module above. The CUDA module's bodies are the CPU module's text; what the simulator adds is
    the CUDA frame (launches, vector inputs, frame kernels, barriers), which this subset exercises for every
    option."""
    seen, out = set(), []
    for c in combos:
        keys = {f"v2:{x}" for x in c.v2} | {f"solver:{c.regularizer}-{c.solver}"}
        if keys - seen:
            out.append(c)
            seen |= keys
    return out


#: Numba CPU runs a covering subset by default (compiling a Numba module costs ~10 s of CPU, and there are over a
#: hundred combinations); ``MESAGEN_ALL_COMBINATIONS=1`` runs every combination.
NUMBA_V2 = SUPPORTED_V2 if os.environ.get("MESAGEN_ALL_COMBINATIONS") == "1" else _cover(SUPPORTED_V2)
#: The CUDA module runs in the simulator for the covering subset (a subset of NUMBA_V2 in both settings).
CUDA_V2 = _cover(SUPPORTED_V2)


@pytest.mark.parametrize("c", [pytest.param(c, id=c.id) for c in NUMBA_V2])
def test_v2_combination_on_numba_cpu_and_cuda_simulator(c, v2_built):
    """Forward = the rule's float64 numpy solution (1e-10); continuation from a state = one forward; backward =
    central finite differences of the forward (q, k, v, every parameter and input; 1e-6). For the covering subset
    CUDA_V2 (every option, every solver; see _cover) the CUDA module then equals this CPU module (forward, final
    state, gradients; 1e-10) in the simulator under the race detector (a child process, tests/cuda/run_layer.py).
    The CUDA case is checked here, beside the CPU checks, because its expected values come from this compiled CPU
    module: compiling it costs 4–13 s of CPU a combination, simulating the CUDA module about 0.3 s."""
    nb = v2_built(c)[1]["numba_cpu"]
    q, k, v, do, params, inputs = tiny_v2(c)
    o, st = nb.forward(q, k, v, params, output_final_state=True, **inputs)
    close(o, float_reference(c, q, k, v, params, inputs))
    cut = {n: x[:, 2:] for n, x in inputs.items()}
    o1, st1 = nb.forward(q[:, :2], k[:, :2], v[:, :2], params, output_final_state=True,
                         **{n: x[:, :2] for n, x in inputs.items()})
    o2, st2 = nb.forward(q[:, 2:], k[:, 2:], v[:, 2:], params, initial_state=st1, output_final_state=True, **cut)
    close(np.concatenate([o1, o2], axis=1), o)
    for a, b in zip(st2, st):
        close(a, b)

    def loss(q, k, v, params, inputs):
        o, fin = nb.forward(q, k, v, params, output_final_state=True, **inputs)
        return float(np.sum(o * do) + sum(np.sum(x * x) for x in fin) / 2)

    g = nb.backward(q, k, v, params, do, dfinal_state=st, **inputs)
    args = {"q": q, "k": k, "v": v}
    for n, x in args.items():
        fd = finite_difference_grad(lambda y, n=n: loss(*[y if m == n else args[m] for m in "qkv"], params, inputs), x)
        close(g["d" + n], fd, rtol=1e-6)
    for n, x in params.items():
        fd = finite_difference_grad(lambda y, n=n: loss(q, k, v, {**params, n: y}, inputs), x)
        close(g["d" + n], fd, rtol=1e-6)
    for n, x in inputs.items():
        fd = finite_difference_grad(lambda y, n=n: loss(q, k, v, params, {**inputs, n: y}), x)
        close(g["d" + n], fd, rtol=1e-6)
    if c not in CUDA_V2:
        return
    runner = Path(__file__).resolve().parent / "cuda" / "run_layer.py"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, str(runner), *map(str, _v2_case(c, v2_built))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(": ok") == 1, proc.stdout[-3000:]

"""Every combination the spec schema admits builds for every backend and runs; docs/specs.md §4 agrees.

The combinations come from the schema itself (tests/spec_combinations.py), so the documentation table, the
validator and the backends cannot drift apart: each admitted combination is described by exactly one row
of the table with the forms its JAX module offers, each row is realised by an admitted combination, and
each built layer runs once on a tiny input with the Numba CPU module (forward and adjoint) equal to the JAX
module (every form; reverse-mode autodiff) in float64, and the CUDA module equal to the Numba CPU module in
the CUDA simulator (a child process, tests/cuda/run_layer.py, under the race detector).
"""

from __future__ import annotations

import importlib.util
import os
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
from spec_combinations import STEPS_MAX, STEPS_MIN, candidates, doc_rows, supported

SUPPORTED = supported()


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
    refused = [c for c in candidates() if c not in SUPPORTED]
    assert refused and SUPPORTED
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
            out[p.stem.split("layer_", 1)[1]] = _load(p, c.id.replace("-", "_"))
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

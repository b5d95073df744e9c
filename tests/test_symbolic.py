"""The symbolic stage: derived identities hold, broken rules are caught, passes keep results, graphs check."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import sympy as sp

from mesagen.errors import DerivationError
from mesagen.ir import graph
from mesagen.ir.lower import lower
from mesagen.ir.records import Assign, Recurrence
from mesagen.pipeline import compile_file
from mesagen.spec.loader import load_spec, spec_sha256
from mesagen.symbolic.algebra import Tokens, collect_right, gradient, mat
from mesagen.symbolic.derive import derive, gd_polynomial
from mesagen.symbolic.verify import verify

from conftest import KERNEL, ROOT, SHIPPED

pytestmark = pytest.mark.usefixtures("x64")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_derivations_verify(name):
    if name in KERNEL:  # kernel regression: its own derivation (mesagen.symbolic.kernel, docs/family.md §9)
        from mesagen.symbolic.kernel import derive_kernel, verify_kernel

        checks = [c.name for c in verify_kernel(derive_kernel(load_spec(ROOT / "specs" / f"{name}.yaml")))]
        decay = ["decay"] if name == "forgetting_attn" else []  # the forget gate's identity
        assert checks == ["stationarity", "shift_invariance", *decay, "float64"]
        return
    d = derive(load_spec(ROOT / "specs" / f"{name}.yaml"))
    checks = {c.name for c in verify(d)}
    assert {"gradient", "float64"} <= checks
    assert ("stationarity" in checks) == (name in ("ridge", "rls_forgetting", "mesanet"))  # the exact solvers
    assert ("parallel_form" in checks) == (name in ("linear", "gd", "ridge", "simple_gla", "retention", "gla",
                                                   "rls_forgetting", "mesanet"))
    assert ("chunked_form" in checks) == (name == "ridge")  # the exact chunkwise ridge form (prefix Woodbury)


def test_wrong_chunked_ridge_identity_is_caught(monkeypatch):
    """The float64 check of the chunked ridge form fails when the prefix mask is dropped (every position would
    see its whole chunk): it compares against the kernel form, not against itself."""
    import mesagen.symbolic.verify as verify_module

    d = derive(load_spec(ROOT / "specs" / "ridge.yaml"))
    monkeypatch.setattr(verify_module.np, "triu", lambda a: a)
    with pytest.raises(DerivationError, match="step 'chunked'"):
        verify(d)


def test_gradient_is_term_by_term():
    """sympy 1.14 gives 0 for diff of a sum of traces; the term-by-term gradient does not."""
    tok = Tokens()
    r = tok.v - tok.W * tok.k
    loss = sp.Rational(1, 2) * r.T * r
    assert gradient(loss, tok.W) == sp.expand(tok.W * tok.k * tok.k.T - tok.v * tok.k.T)
    M, R = collect_right(gradient(loss, tok.W), tok.W)
    assert M == tok.k * tok.k.T and R == tok.v * tok.k.T
    with pytest.raises(ValueError, match="right-collect"):
        collect_right(tok.k.T * tok.W.T * tok.W * tok.k.T.T * sp.Identity(1) * tok.k.T, tok.W)  # W not leftmost


def test_gd_polynomial_matches_explicit_iteration():
    """W⁽³⁾ = C Σ_j d_j (I − ηA)ʲ: the coefficients (all η) reproduce the scalar GD iteration exactly."""
    eta, a = sp.Symbol("eta"), sp.Symbol("a")
    coeffs = gd_polynomial(eta, 3)
    assert coeffs == [eta, eta, eta]
    p = sum(c * (1 - eta * a) ** j for j, c in enumerate(coeffs))
    w = sp.Integer(0)
    for _ in range(3):
        w = w - eta * (w * a - 1)
    assert sp.expand(p - w) == 0


@pytest.mark.parametrize("steps", [17, 32])
def test_many_gd_steps_verify(tmp_path, steps):
    """Many GD steps derive, verify in float64 (the stable Horner basis; the recursion and the chunked form over the
    statistics) and build."""
    text = (ROOT / "specs" / "gd.yaml").read_text().replace("steps: 3", f"steps: {steps}")
    p = tmp_path / "gd.yaml"
    p.write_text(text)
    names = [c.name for c in compile_file(p, backends=("jax",)).checks]
    assert names[-2:] == ["float64", "chunked_stats_form"], names


def _ridge():
    return derive(load_spec(ROOT / "specs" / "ridge.yaml"))


def test_wrong_sherman_morrison_update_is_caught():
    d = _ridge()
    P, Pk, s = mat("P", "K", "K"), mat("Pk", "K", 1), mat("s", 1, 1)
    wrong = tuple(Assign(a.target, P - Pk * Pk.T, a.shape, a.doc) if a.target == "P_new" else a
                  for a in d.recurrence.update)  # forgot the 1 / (1 + kᵀPk)
    bad = dataclasses.replace(d, recurrence=dataclasses.replace(d.recurrence, update=wrong))
    with pytest.raises(DerivationError, match="spec 'ridge', step 'closed_form'"):
        verify(bad)
    del s


def test_wrong_gradient_is_caught():
    d = _ridge()
    tok = d.tokens
    bad = dataclasses.replace(d, grad_term=tok.W * tok.k * tok.k.T - 2 * tok.v * tok.k.T)
    with pytest.raises(DerivationError, match="step 'gradient'"):
        verify(bad)


def test_wrong_closed_form_is_caught():
    d = _ridge()
    A, C = mat("A", "K", "K"), mat("C", "V", "K")
    bad = dataclasses.replace(d, closed_form=C * sp.Inverse(A + 2 * d.gram_reg))
    with pytest.raises(DerivationError, match="step 'stationarity'"):
        verify(bad)


def test_wrong_parallel_form_is_caught():
    d = _ridge()
    kf = d.kernel
    q = mat("q", "K", 1)
    bad_kernel = dataclasses.replace(kf, precondition=(Assign("x", 2 * q, ("K", 1)),))
    with pytest.raises(DerivationError, match="step 'closed_form'"):
        verify(dataclasses.replace(d, kernel=bad_kernel))


def test_single_assignment_and_cycles_are_rejected():
    x, y = mat("x", "K", 1), mat("y", "K", 1)
    with pytest.raises(ValueError, match="single assignment"):
        graph.dataflow((Assign("x", y, ("K", 1)), Assign("x", y, ("K", 1))), {"y"})
    with pytest.raises(ValueError, match="never defined"):
        graph.dataflow((Assign("x", mat("z", "K", 1), ("K", 1)),), {"y"})
    with pytest.raises(ValueError, match="cyclic"):
        graph.dataflow((Assign("a", mat("b", "K", 1), ("K", 1)), Assign("b", mat("a", "K", 1), ("K", 1))), set())
    with pytest.raises(ValueError, match="single assignment"):
        Recurrence((), (Assign("o", x, ("K", 1)),), (Assign("o", x, ("K", 1)),))


def test_schedule_is_deterministic_topological():
    a, b = mat("a", "K", 1), mat("b", "K", 1)
    prog = (Assign("c", a + b, ("K", 1)), Assign("b", a, ("K", 1)))
    assert [x.target for x in graph.schedule(prog, {"a"})] == ["b", "c"]


def test_prune_dead_states_drops_unused_gram():
    """One GD step never reads Σ k kᵀ: the pass removes that state; without it the state stays."""
    spec = load_spec(ROOT / "specs" / "linear.yaml")
    d = derive(spec)
    pruned = lower(d, "specs/linear.yaml", spec_sha256(spec))
    kept = lower(d, "specs/linear.yaml", spec_sha256(spec), skip=frozenset({"prune_dead_states"}))
    assert [s.name for s in pruned.recurrence.states] == ["kv"]
    assert [s.name for s in kept.recurrence.states] == ["kv", "kk"]


@pytest.mark.parametrize("name", ["linear"])
def test_pass_keeps_results(tmp_path, name):
    """Generated code with and without the prune pass computes the same outputs."""
    import importlib.util

    from mesagen.backends.jax_backend import JaxBackend

    spec = load_spec(ROOT / "specs" / f"{name}.yaml")
    d = derive(spec)
    outs = []
    for skip in (frozenset(), frozenset({"prune_dead_states"})):
        ir = lower(d, f"specs/{name}.yaml", spec_sha256(spec), skip=skip)
        path = tmp_path / f"m_{len(skip)}.py"
        path.write_text(JaxBackend().emit(ir))
        mspec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((2, 5, 2, s)) for s in (3, 3, 4))
        outs.append(np.asarray(mod.forward(q, k, v, {"eta": np.ones(2)})[0]))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-12)


def test_compile_file_reports_checks_in_derivation_md():
    c = compile_file(ROOT / "specs" / "ridge.yaml")
    md = c.files["ridge/DERIVATION.md"]
    assert "| stationarity | exact |" in md and "| float64 | numeric |" in md
    assert "\\left(" in md or "^{-1}" in md


def test_ir_does_not_import_the_symbolic_stage():
    """Dependencies point one way (spec → symbolic → ir → backends): importing the IR loads no symbolic module."""
    code = ("import sys, mesagen.ir.records, mesagen.ir.passes, mesagen.ir.lower, mesagen.ir.graph; "
            "print(sorted(m for m in sys.modules if m.startswith('mesagen.symbolic')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_unknown_solver_kind_is_a_loud_error():
    """A solver kind without a rule is a DerivationError naming the known kinds, never a silent default."""
    from mesagen.symbolic.rules import RULES, rule_for

    spec = load_spec(ROOT / "specs" / "delta.yaml")
    fake = spec.model_copy(update={"solver": spec.solver.model_copy(update={"kind": "newton"})})
    with pytest.raises(DerivationError, match=r"no rule for solver kind 'newton' \(known: \['closed_form', "
                                              r"'conjugate_gradient', 'gd', 'implicit_online_gd', 'online_gd'\]\)"):
        rule_for(fake)
    assert sorted(RULES) == ["closed_form", "conjugate_gradient", "gd", "implicit_online_gd", "online_gd"]
    for rule in RULES.values():
        assert rule.description and callable(rule.derive) and callable(rule.exact_target) and callable(rule.float_target)


@pytest.mark.parametrize("name", ["simple_gla", "gla", "gated_delta", "kda", "retention"])
def test_wrong_decay_is_caught(name):
    """Verification proves the decay: applying the gate twice (or dropping it) in the recurrence is refused."""
    d = derive(load_spec(ROOT / "specs" / f"{name}.yaml"))
    target = "Wd" if d.spec.solver.kind == "online_gd" else "C_new"
    gate = d.params[d.spec.objective.weights.gate]
    wrong = []
    for a in d.recurrence.update:
        if a.target == target:
            expr = a.expr.xreplace({sp.DiagMatrix(gate): sp.DiagMatrix(gate) * sp.DiagMatrix(gate)}) \
                if isinstance(gate, sp.MatrixSymbol) else a.expr.xreplace({gate: gate ** 2})
            assert expr != a.expr
            a = Assign(a.target, expr, a.shape, a.doc)
        wrong.append(a)
    bad = dataclasses.replace(d, recurrence=dataclasses.replace(d.recurrence, update=tuple(wrong)))
    with pytest.raises(DerivationError, match=f"spec '{name}', step '{d.spec.solver.kind}'"):
        verify(bad)


def test_delta_chunk_identity_is_verified_and_catches_a_wrong_step(monkeypatch):
    """The delta-rule family's chunked (WY) form is checked in float64 against the token recursion; an effective
    step that is not the recursion's (2β instead of β) fails verification."""
    from mesagen.symbolic import delta_chunk
    from mesagen.symbolic.derive import derive
    from mesagen.symbolic.verify import verify

    for name in ("delta", "gated_delta", "kda"):
        d = derive(load_spec(ROOT / "specs" / f"{name}.yaml"))
        assert d.delta_chunk is not None and "delta_chunk" in [c.name for c in verify(d)]
    assert derive(load_spec(ROOT / "specs" / "gla.yaml")).delta_chunk is None
    monkeypatch.setitem(delta_chunk.EFFECTIVE_STEPS, "online_gd", lambda pc: 2 * pc.step)
    d = derive(load_spec(ROOT / "specs" / "gated_delta.yaml"))
    with pytest.raises(DerivationError, match="delta_chunk"):
        verify(d)

"""Verify every derived identity before it reaches code.

Each check evaluates the derived expressions *exactly* (rational matrices, d_k = 2, d_v = 3) and, for the
recurrences, also in float64 at larger random points through sympy's own ``lambdify`` (independent of
mesagen's printers). A failing check raises :class:`~mesagen.errors.DerivationError` naming spec and step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import sympy as sp

from mesagen.errors import DerivationError
from mesagen.symbolic.algebra import evaluate, run_program
from mesagen.symbolic.derive import Derivation

EXACT_DIMS = {"K": 2, "V": 3}
EXACT_T = 4
FLOAT_DIMS = {"K": 4, "V": 3}
FLOAT_T = 11
FLOAT_RTOL = 1e-10


@dataclass(frozen=True)
class Check:
    """One verified identity.

    Attributes:
        name: the identity (e.g. ``closed_form``, ``float64``).
        method: ``exact`` (rational arithmetic) or ``numeric`` (float64 at random points).
        detail: what holds, stated as a fact or a bound. It is written into generated files, so it must be a
            function of the spec and the generator only -- never a measured number (those differ from machine
            to machine and would make a fresh clone see ``generated/`` as stale).
        measured: the measured value behind a numeric check (e.g. the worst relative error), or ``None``.
            Shown by ``mesagen derive`` on stdout only; never written into a file.
    """

    name: str
    method: str
    detail: str
    measured: str | None = None


def _rng_rational(rng: random.Random, lo: int = -5, hi: int = 5, den: int = 4) -> sp.Rational:
    return sp.Rational(rng.randint(lo, hi), rng.randint(1, den))


def _rand_matrix(rng: random.Random, rows: int, cols: int) -> sp.ImmutableMatrix:
    return sp.ImmutableMatrix(rows, cols, [_rng_rational(rng) for _ in range(rows * cols)])


def _param_values(d: Derivation, rng: random.Random) -> dict[str, sp.Rational]:
    vals = {}
    for name, p in d.spec.parameters.items():
        vals[name] = sp.Rational(rng.randint(1, 4), rng.randint(2, 5)) if p.domain != "real" else \
            sp.Rational(rng.choice([-3, -1, 1, 2, 3]), rng.randint(2, 7))
    for name in d.spec.inputs:
        vals[name] = sp.Rational(rng.randint(1, 3), 4)
    return vals


def _tokens(rng: random.Random, T: int, dims: dict[str, int]) -> list[dict[str, sp.ImmutableMatrix]]:
    return [{"k": _rand_matrix(rng, dims["K"], 1), "v": _rand_matrix(rng, dims["V"], 1),
             "q": _rand_matrix(rng, dims["K"], 1)} for _ in range(T)]


def _grad_full(d: Derivation, W, toks, params) -> sp.ImmutableMatrix:
    """Σ_i ∇ℓ_i(W) + ∇R(W), evaluated exactly from the derived per-term gradients."""
    total = evaluate(d.grad_reg, {"W": W, **params}, EXACT_DIMS)
    for tk in toks:
        total = total + evaluate(d.grad_term, {"W": W, **tk, **params}, EXACT_DIMS)
    return total


def _check_gradient(d: Derivation, rng: random.Random, params) -> Check:
    Kd, Vd = EXACT_DIMS["K"], EXACT_DIMS["V"]
    w = sp.Matrix(Vd, Kd, lambda i, j: sp.Symbol(f"w_{i}_{j}"))
    tk = _tokens(rng, 1, EXACT_DIMS)[0]
    env = {"W": sp.ImmutableMatrix(w), **tk, **params}
    f = evaluate(d.loss_term, env, EXACT_DIMS)[0, 0]
    if d.regularizer != 0:
        f += d.regularizer.subs({s: params[s.name] for s in d.regularizer.free_symbols if isinstance(s, sp.Symbol)}
                                ).subs(d.tokens.W, sp.ImmutableMatrix(w)).doit()
    elementwise = sp.Matrix(Vd, Kd, lambda i, j: sp.diff(f, w[i, j]))
    derived = evaluate(d.grad_term, env, EXACT_DIMS) + evaluate(d.grad_reg, env, EXACT_DIMS)
    if sp.simplify(sp.Matrix(derived) - elementwise) != sp.zeros(Vd, Kd):
        raise DerivationError(d.spec.name, "gradient", f"matrix-calculus gradient {d.grad_term} + {d.grad_reg} "
                              "differs from the elementwise derivative")
    return Check("gradient", "exact", f"∇ℓ = {sp.sstr(d.grad_term)}, ∇R = {sp.sstr(d.grad_reg)} equal the "
                 "elementwise derivatives of the objective (symbolic W, rational k, v)")


def _closed_form_at(d: Derivation, toks, params) -> sp.ImmutableMatrix:
    C = sum((tk["v"] * tk["k"].T for tk in toks), sp.ImmutableMatrix.zeros(EXACT_DIMS["V"], EXACT_DIMS["K"]))
    A = sum((tk["k"] * tk["k"].T for tk in toks), sp.ImmutableMatrix.zeros(EXACT_DIMS["K"], EXACT_DIMS["K"]))
    return evaluate(d.closed_form, {"A": A, "C": C, **params}, EXACT_DIMS)


def _check_stationarity(d: Derivation, rng: random.Random, params) -> list[Check]:
    toks = _tokens(rng, EXACT_T, EXACT_DIMS)
    Wstar = _closed_form_at(d, toks, params)
    if _grad_full(d, Wstar, toks, params) != sp.zeros(*Wstar.shape):
        raise DerivationError(d.spec.name, "stationarity", "the closed form does not zero the gradient")
    if _closed_form_at(d, toks[::-1], params) != Wstar:
        raise DerivationError(d.spec.name, "permutation", "the closed form depends on the order of past pairs")
    return [Check("stationarity", "exact", f"∇L(W*) = 0 at W* = {sp.sstr(d.closed_form)} (T = {EXACT_T})"),
            Check("permutation", "exact", "W* is invariant to permuting the past pairs")]


def _init_state(d: Derivation, params) -> dict:
    return {st.name: evaluate(st.init, params, EXACT_DIMS) for st in d.recurrence.states}


def _run_recurrence(d: Derivation, state: dict, toks, params) -> tuple[list, dict]:
    outs = []
    rec = d.recurrence
    for i, tk in enumerate(toks):
        inputs = {n: params[n][i] if isinstance(params.get(n), list) else params[n] for n in params}
        env = run_program(rec.update + rec.readout, {**state, **tk, **inputs}, EXACT_DIMS)
        outs.append(env["o"])
        state = {st.name: env[f"{st.name}_new"] for st in rec.states}
    return outs, state


def _target_outputs(d: Derivation, toks, params) -> list:
    """What the solver must produce at every t, computed from the objective's gradient (not the rule)."""
    solver = d.spec.solver
    outs = []
    Vd, Kd = EXACT_DIMS["V"], EXACT_DIMS["K"]
    W = sp.ImmutableMatrix.zeros(Vd, Kd)
    for t in range(len(toks)):
        if solver.kind == "closed_form":
            W = _closed_form_at(d, toks[: t + 1], params)
        elif solver.kind == "gd":
            W = sp.ImmutableMatrix.zeros(Vd, Kd)
            for _ in range(solver.steps):
                W = W - params[solver.step_size] * _grad_full(d, W, toks[: t + 1], params)
        else:
            beta = params[solver.step_size]
            step_params = {**params, solver.step_size: beta[t]} if isinstance(beta, list) else params
            g = evaluate(d.grad_term, {"W": W, **toks[t], **step_params}, EXACT_DIMS) + \
                evaluate(d.grad_reg, {"W": W, **step_params}, EXACT_DIMS)
            W = W - step_params[solver.step_size] * g
        outs.append(W * toks[t]["q"])
    return outs


def _check_recurrence(d: Derivation, rng: random.Random, params) -> Check:
    toks = _tokens(rng, EXACT_T, EXACT_DIMS)
    if d.spec.solver.kind == "online_gd":  # a different step size per token
        params = {**params, d.spec.solver.step_size: [_rng_rational(rng, 1, 3, 4) for _ in toks]}
    got, _ = _run_recurrence(d, _init_state(d, params), toks, params)
    want = _target_outputs(d, toks, params)
    for t, (g, w) in enumerate(zip(got, want)):
        if g != w:
            raise DerivationError(d.spec.name, d.spec.solver.kind, f"recurrent output differs from the solver's "
                                  f"definition at t = {t}: {list(g)} != {list(w)}")
    what = {"closed_form": "Sherman–Morrison / RLS recursion equals the closed-form ridge solution",
            "gd": f"running sums + Horner readout equal {getattr(d.spec.solver, 'steps', 0)} explicit GD step(s) "
                  "from W⁰ = 0",
            "online_gd": "the recursion equals W − β_t ∇ℓ_t(W) with the derived gradient"}[d.spec.solver.kind]
    return Check(d.spec.solver.kind, "exact", f"{what}, at every t = 0..{EXACT_T - 1}")


def _run_kernel(d: Derivation, state: dict, toks, params) -> tuple[list, dict]:
    kf = d.kernel
    env = run_program(kf.stats_from_state, {**state, **params}, EXACT_DIMS)
    C, A = env["C0"], env.get("A0")
    outs = []
    for tk in toks:
        C = C + tk["v"] * tk["k"].T
        if A is not None:
            A = A + tk["k"] * tk["k"].T
        xenv = run_program(kf.precondition, {"Abar": A, "q": tk["q"], **params} if A is not None else
                           {"q": tk["q"], **params}, EXACT_DIMS)
        outs.append(C * xenv["x"])
    final_env = run_program(kf.state_from_stats, {"Cbar": C, "Abar": A, **params}, EXACT_DIMS)
    return outs, {st.name: final_env[f"{st.name}_new"] for st in d.recurrence.states}


def _check_kernel(d: Derivation, rng: random.Random, params) -> Check:
    warm = _tokens(rng, 2, EXACT_DIMS)
    _, state0 = _run_recurrence(d, _init_state(d, params), warm, params)  # a reachable, non-default state
    toks = _tokens(rng, EXACT_T, EXACT_DIMS)
    want, want_state = _run_recurrence(d, state0, toks, params)
    got, got_state = _run_kernel(d, state0, toks, params)
    if got != want or got_state != want_state:
        raise DerivationError(d.spec.name, "closed_form", "the parallel form differs from the recurrence")
    return Check("parallel_form", "exact", "parallel form o_t = C̄_t M(Ā_t) q_t equals the recurrence at every t, "
                 "outputs and final state, from a non-default initial state")


def _check_float(d: Derivation, seed: int) -> Check:
    """float64 at FLOAT_DIMS through sympy.lambdify: recurrence vs. an explicit numpy computation."""
    rng = np.random.default_rng(seed)
    Kd, Vd = FLOAT_DIMS["K"], FLOAT_DIMS["V"]
    dims = {"K": Kd, "V": Vd}
    rec = d.recurrence
    fns = []
    for a in rec.update + rec.readout:
        syms = sorted((s for s in a.expr.free_symbols if isinstance(s, (sp.MatrixSymbol, sp.Symbol))
                       and s.name not in ("K", "V")), key=lambda s: s.name)
        sub = {sp.Symbol("K", integer=True, positive=True): Kd, sp.Symbol("V", integer=True, positive=True): Vd}
        expr = a.expr.subs(sub)
        syms_c = [s.subs(sub) if isinstance(s, sp.MatrixSymbol) else s for s in syms]
        fns.append((a.target, [s.name for s in syms], sp.lambdify(syms_c, expr, modules="numpy")))
    params = {n: 0.3 + 0.5 * rng.random() for n in list(d.spec.parameters) + list(d.spec.inputs)}
    ks, vs, qs = rng.standard_normal((FLOAT_T, Kd, 1)), rng.standard_normal((FLOAT_T, Vd, 1)), \
        rng.standard_normal((FLOAT_T, Kd, 1))
    solver = d.spec.solver
    if solver.kind == "gd":  # a convergent step (η λ_max < 1): many steps stay well-conditioned on both sides
        coef = d.spec.objective.regularizer.coefficient
        lam_max = np.linalg.eigvalsh(ks[:, :, 0].T @ ks[:, :, 0])[-1] + (params[coef] if coef else 0.0)
        params[solver.step_size] = float(0.9 / lam_max)
    env0 = {st.name: np.asarray(evaluate(st.init, {n: sp.Float(v) for n, v in params.items()}, dims)
                                .evalf(), dtype=np.float64) for st in rec.states}
    state, worst = env0, 0.0
    W = np.zeros((Vd, Kd))
    for t in range(FLOAT_T):
        env = {**state, "k": ks[t], "v": vs[t], "q": qs[t], **params}
        for target, names, fn in fns:
            env[target] = np.asarray(fn(*[env[n] for n in names]), dtype=np.float64)
        state = {st.name: env[f"{st.name}_new"] for st in rec.states}
        Kt, Vt = ks[: t + 1, :, 0], vs[: t + 1, :, 0]
        A, C = Kt.T @ Kt, Vt.T @ Kt
        coef = d.spec.objective.regularizer.coefficient
        lam = params[coef] if coef else 0.0  # R(W) = ½ λ ‖W‖²_F, written out independently of the derivation
        if solver.kind == "closed_form":
            want = np.linalg.solve(A + lam * np.eye(Kd), C.T).T @ qs[t]
        elif solver.kind == "gd":
            Wg = np.zeros((Vd, Kd))
            for _ in range(solver.steps):
                Wg = Wg - params[solver.step_size] * (Wg @ A + lam * Wg - C)
            want = Wg @ qs[t]
        else:
            W = W - params[solver.step_size] * ((W @ ks[t] - vs[t]) @ ks[t].T + lam * W)
            want = W @ qs[t]
        err = float(np.max(np.abs(env["o"] - want)) / max(1.0, float(np.max(np.abs(want)))))
        worst = max(worst, err)
    if not worst <= FLOAT_RTOL:
        raise DerivationError(d.spec.name, "float64", f"recurrence differs from numpy by {worst:.3e} (> {FLOAT_RTOL})")
    return Check("float64", "numeric", f"recurrence (sympy.lambdify) vs. explicit numpy solution over T = {FLOAT_T},"
                 f" d_k = {Kd}, d_v = {Vd}: max relative error ≤ {FLOAT_RTOL:.0e}",
                 measured=f"max relative error {worst:.1e}")


def verify(d: Derivation, seed: int = 0) -> tuple[Check, ...]:
    """Run every check that applies to the derivation.

    Args:
        d: the derivation.
        seed: seed of the random points (fixed: the checks, and so the emitted DERIVATION.md, are deterministic).

    Returns:
        The passed checks, in order.

    Raises:
        DerivationError: the first identity that does not hold (names spec and step).
    """
    rng = random.Random(seed)
    params = _param_values(d, rng)
    checks = [_check_gradient(d, rng, params)]
    if d.closed_form is not None:
        checks += _check_stationarity(d, rng, params)
    checks.append(_check_recurrence(d, rng, params))
    if d.kernel is not None:
        checks.append(_check_kernel(d, rng, params))
    checks.append(_check_float(d, seed))
    return tuple(checks)

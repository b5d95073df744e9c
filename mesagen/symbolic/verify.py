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
from mesagen.symbolic.rules import _reg_weight, _weight, full_gradient, rule_for

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


def _scalar_value(rng: random.Random, domain: str) -> sp.Rational:
    if domain == "real":
        return sp.Rational(rng.choice([-3, -1, 1, 2, 3]), rng.randint(2, 7))
    if domain == "positive_unit_interval":
        return sp.Rational(rng.randint(1, 3), 4)  # a gate α ∈ (0, 1): 1/4 … 3/4, so that it decays
    if domain == "unit_interval":
        return sp.Rational(rng.randint(1, 4), 4)  # a step size in (0, 1]
    return sp.Rational(rng.randint(1, 4), rng.randint(2, 5))


def _values(d: Derivation, rng: random.Random, T: int) -> list[dict]:
    """Per-token values of every parameter (constant over t) and input (time-varying, and per channel where
    the input is), exact rationals. A forget gate holds α ∈ (0, 1] (the programs' linear space)."""
    dims = {"d_k": EXACT_DIMS["K"], "d_v": EXACT_DIMS["V"]}
    params = {name: sp.ImmutableMatrix(dims[p.shape[1]], 1, [_scalar_value(rng, p.domain) for _ in range(dims[p.shape[1]])])
              if len(p.shape) == 2 else _scalar_value(rng, p.domain) for name, p in d.spec.parameters.items()}
    per_token = []
    for _ in range(T):
        vals = dict(params)
        for name, x in d.spec.inputs.items():
            domain = "positive_unit_interval" if x.space == "log" else x.domain  # the program sees α = exp(g)
            if len(x.shape) == 4:
                n = dims[x.shape[3]]
                vals[name] = sp.ImmutableMatrix(n, 1, [_scalar_value(rng, domain) for _ in range(n)])
            else:
                vals[name] = _scalar_value(rng, domain)
        per_token.append(vals)
    return per_token


def _tokens(rng: random.Random, T: int, dims: dict[str, int]) -> list[dict[str, sp.ImmutableMatrix]]:
    return [{"k": _rand_matrix(rng, dims["K"], 1), "v": _rand_matrix(rng, dims["V"], 1),
             "q": _rand_matrix(rng, dims["K"], 1)} for _ in range(T)]


def _check_gradient(d: Derivation, rng: random.Random, vals: dict) -> Check:
    Kd, Vd = EXACT_DIMS["K"], EXACT_DIMS["V"]
    w = sp.Matrix(Vd, Kd, lambda i, j: sp.Symbol(f"w_{i}_{j}"))
    tk = _tokens(rng, 1, EXACT_DIMS)[0]
    env = {"W": sp.ImmutableMatrix(w), **tk, **vals}
    f = evaluate(d.loss_term, env, EXACT_DIMS)[0, 0]
    if d.regularizer != 0:
        f += d.regularizer.subs({s: vals[s.name] for s in d.regularizer.free_symbols
                                 if isinstance(s, (sp.Symbol, sp.MatrixSymbol)) and s.name in vals}
                                ).subs(d.tokens.W, sp.ImmutableMatrix(w)).doit()
    elementwise = sp.Matrix(Vd, Kd, lambda i, j: sp.diff(f, w[i, j]))
    derived = evaluate(d.grad_term, env, EXACT_DIMS) + evaluate(d.grad_reg, env, EXACT_DIMS)
    if sp.simplify(sp.Matrix(derived) - elementwise) != sp.zeros(Vd, Kd):
        raise DerivationError(d.spec.name, "gradient", f"matrix-calculus gradient {d.grad_term} + {d.grad_reg} "
                              "differs from the elementwise derivative")
    return Check("gradient", "exact", f"∇ℓ = {sp.sstr(d.grad_term)}, ∇R = {sp.sstr(d.grad_reg)} equal the "
                 "elementwise derivatives of the objective (symbolic W, rational k, v)")


def _closed_form_at(d: Derivation, toks, vals: list[dict]) -> sp.ImmutableMatrix:
    """W* at the last pair from the sums C = Σ ω β_i v_i k_iᵀ, A = Σ ω β_i k_i k_iᵀ (β_i the importance weight, ω
    the decayed weight; 1 without them); a regulariser that decays with the data enters as ω_{t,0} Λ."""
    imp = d.spec.objective.weights.importance
    t = len(toks) - 1
    w = [_weight(d, vals, t, i, EXACT_DIMS["K"]) * (vals[i][imp] if imp else 1) for i in range(len(toks))]
    C = sum((b * tk["v"] * tk["k"].T for b, tk in zip(w, toks)), sp.ImmutableMatrix.zeros(EXACT_DIMS["V"], EXACT_DIMS["K"]))
    A = sum((b * tk["k"] * tk["k"].T for b, tk in zip(w, toks)), sp.ImmutableMatrix.zeros(EXACT_DIMS["K"], EXACT_DIMS["K"]))
    if d.spec.objective.regularizer.decays_with_data:  # (A + ω_{t,0} Λ) = ω_{t,0} (A/ω_{t,0} + Λ)
        r = _reg_weight(d, vals, t)
        return evaluate(d.closed_form, {"A": A / r, "C": C / r, **vals[t]}, EXACT_DIMS)
    return evaluate(d.closed_form, {"A": A, "C": C, **vals[t]}, EXACT_DIMS)


def _check_stationarity(d: Derivation, rng: random.Random, vals: list[dict]) -> list[Check]:
    toks = _tokens(rng, EXACT_T, EXACT_DIMS)
    Wstar = _closed_form_at(d, toks, vals)
    if full_gradient(d, Wstar, toks, vals, len(toks) - 1) != sp.zeros(*Wstar.shape):
        raise DerivationError(d.spec.name, "stationarity", "the closed form does not zero the gradient")
    checks = [Check("stationarity", "exact", f"∇L(W*) = 0 at W* = {sp.sstr(d.closed_form)} (T = {EXACT_T}"
                    + (", time-varying decayed weights" if d.spec.objective.weights.kind == "decayed" else "") + ")")]
    if d.spec.objective.weights.kind == "uniform":
        if _closed_form_at(d, toks[::-1], vals[::-1]) != Wstar:
            raise DerivationError(d.spec.name, "permutation", "the closed form depends on the order of past pairs")
        checks.append(Check("permutation", "exact", "W* is invariant to permuting the past pairs"))
    return checks


def _init_state(d: Derivation, vals: dict) -> dict:
    return {st.name: evaluate(st.init, vals, EXACT_DIMS) for st in d.recurrence.states}


def _run_recurrence(d: Derivation, state: dict, toks, vals: list[dict]) -> tuple[list, dict]:
    outs = []
    rec = d.recurrence
    for tk, vv in zip(toks, vals):
        env = run_program(rec.update + rec.readout, {**state, **tk, **vv}, EXACT_DIMS)
        outs.append(env[rec.output])
        state = {st.name: env[rec.new(st.name)] for st in rec.states}
    return outs, state


def _check_recurrence(d: Derivation, rng: random.Random, vals: list[dict]) -> Check:
    toks = _tokens(rng, EXACT_T, EXACT_DIMS)
    rule = rule_for(d.spec)
    got, _ = _run_recurrence(d, _init_state(d, vals[0]), toks, vals)
    want = rule.exact_target(d, toks, vals)
    for t, (g, w) in enumerate(zip(got, want)):
        if g != w:
            raise DerivationError(d.spec.name, d.spec.solver.kind, f"recurrent output differs from the solver's "
                                  f"definition at t = {t}: {list(g)} != {list(w)}")
    weights = " with time-varying decayed weights" if d.spec.objective.weights.kind == "decayed" else ""
    return Check(d.spec.solver.kind, "exact", f"the recursion equals the solver's definition ({rule.description})"
                 f"{weights}, at every t = 0..{EXACT_T - 1}")


def _decay_exact(M, a):
    """One token's forgetting of a running sum M: α M, or M Diag(α) for a per-key-channel α (M's K columns)."""
    return M * sp.diag(*a) if isinstance(a, sp.MatrixBase) else a * M


def _run_kernel(d: Derivation, state: dict, toks, vals: list[dict]) -> tuple[list, dict]:
    """The parallel form's definition, token by token: decayed accumulators C̄, Ā; x_t = M(Ā_t) q_t; o_t = C̄_t x_t."""
    kf = d.kernel
    gate = d.spec.objective.weights.gate if kf.decayed else None
    env = run_program(kf.stats_from_state, {**state, **vals[0]}, EXACT_DIMS)
    sums = {"Cbar": env["C0"], "Abar": env.get("A0")}
    outs = []
    for tk, vv in zip(toks, vals):
        for acc in kf.accumulators:
            prev = sums[acc.name] if not acc.decayed else _decay_exact(sums[acc.name], vv[gate])
            sums[acc.name] = prev + evaluate(acc.summand, {**tk, **vv}, EXACT_DIMS)
        xenv = run_program(kf.precondition, {"Abar": sums["Abar"], "q": tk["q"], **vv} if kf.uses_gram else
                           {"q": tk["q"], **vv}, EXACT_DIMS)
        outs.append(sums["Cbar"] * xenv["x"])
    final_env = run_program(kf.state_from_stats, {**sums, **vals[-1]}, EXACT_DIMS)
    return outs, {st.name: final_env[d.recurrence.new(st.name)] for st in d.recurrence.states}


def _check_kernel(d: Derivation, rng: random.Random, vals: list[dict]) -> Check:
    warm = _tokens(rng, 2, EXACT_DIMS)
    _, state0 = _run_recurrence(d, _init_state(d, vals[0]), warm, vals[:2])  # a reachable, non-default state
    toks = _tokens(rng, EXACT_T, EXACT_DIMS)
    want, want_state = _run_recurrence(d, state0, toks, vals)
    got, got_state = _run_kernel(d, state0, toks, vals)
    if got != want or got_state != want_state:
        raise DerivationError(d.spec.name, "closed_form", "the parallel form differs from the recurrence")
    return Check("parallel_form", "exact", "parallel form o_t = C̄_t M(Ā_t) q_t equals the recurrence at every t, "
                 "outputs and final state, from a non-default initial state"
                 + (", with time-varying decayed accumulators" if d.kernel.decayed else ""))


def _lambdified(a, Kd: int, Vd: int):
    """(target, argument names, numpy function) for one Assign, through sympy.lambdify (no mesagen printer).
    ``DiagMatrix(a)`` is replaced by a K × K (or V × V) symbol ``diag_a`` whose value the caller supplies."""
    sub = {sp.Symbol("K", integer=True, positive=True): Kd, sp.Symbol("V", integer=True, positive=True): Vd}
    expr = a.expr.replace(lambda e: isinstance(e, sp.DiagMatrix),
                          lambda e: sp.MatrixSymbol(f"diag_{e.args[0].name}", e.shape[0], e.shape[1]))
    syms = sorted((s for s in expr.free_symbols if isinstance(s, (sp.MatrixSymbol, sp.Symbol))
                   and s.name not in ("K", "V")), key=lambda s: s.name)
    expr = expr.subs(sub)
    syms_c = [s.subs(sub) if isinstance(s, sp.MatrixSymbol) else s for s in syms]
    return a.target, [s.name for s in syms], sp.lambdify(syms_c, expr, modules="numpy")


def _check_float(d: Derivation, seed: int) -> Check:
    """float64 at FLOAT_DIMS through sympy.lambdify: recurrence vs. the rule's explicit numpy computation."""
    rng = np.random.default_rng(seed)
    Kd, Vd = FLOAT_DIMS["K"], FLOAT_DIMS["V"]
    dims = {"K": Kd, "V": Vd}
    rec = d.recurrence
    fns = [_lambdified(a, Kd, Vd) for a in rec.update + rec.readout]
    width = {"d_k": Kd, "d_v": Vd}
    data: dict = {n: 0.3 + 0.5 * (rng.random(width[p.shape[1]]) if len(p.shape) == 2 else rng.random())
                  for n, p in d.spec.parameters.items()}
    for n, x in d.spec.inputs.items():  # time-varying; gates in (0.3, 1], the programs' linear space
        shape = (FLOAT_T, width[x.shape[3]]) if len(x.shape) == 4 else (FLOAT_T,)
        data[n] = 0.3 + 0.7 * rng.random(shape)
    ks, vs, qs = (rng.standard_normal((FLOAT_T, n)) for n in (Kd, Vd, Kd))
    data.update(k=ks, v=vs, q=qs)
    solver = d.spec.solver
    if solver.kind == "gd" and solver.step_size:  # a convergent step (η λ_max < 1): well-conditioned both sides
        coef = d.spec.objective.regularizer.coefficient
        lam_max = np.linalg.eigvalsh(ks.T @ ks)[-1] + (data[coef] if coef else 0.0)
        data[solver.step_size] = float(0.9 / lam_max)
    scal = {n: v for n, v in data.items() if np.ndim(v) == 0}
    vecp = {n: data[n] for n in d.spec.parameters if np.ndim(data[n]) == 1}  # per-channel parameters, constant
    exact0 = {**{n: sp.Float(v) for n, v in scal.items()},
              **{n: sp.ImmutableMatrix([sp.Float(x) for x in v]) for n, v in vecp.items()}}
    env0 = {st.name: np.asarray(evaluate(st.init, exact0, dims).evalf(), dtype=np.float64) for st in rec.states}
    state = env0
    got = []
    for t in range(FLOAT_T):
        env = {**state, "k": ks[t][:, None], "v": vs[t][:, None], "q": qs[t][:, None], **scal}
        for n, x in vecp.items():
            env[n], env[f"diag_{n}"] = x[:, None], np.diag(x)
        for n in d.spec.inputs:
            x = data[n][t]
            env[n] = x[:, None] if np.ndim(x) else x
            if np.ndim(x):
                env[f"diag_{n}"] = np.diag(x)
        for target, names, fn in fns:
            env[target] = np.asarray(fn(*[env[n] for n in names]), dtype=np.float64)
        state = {st.name: env[rec.new(st.name)] for st in rec.states}
        got.append(env[rec.output][:, 0])
    want = rule_for(d.spec).float_target(d.spec, data)
    worst = max(float(np.max(np.abs(g - w)) / max(1.0, float(np.max(np.abs(w))))) for g, w in zip(got, want))
    if not worst <= FLOAT_RTOL:
        raise DerivationError(d.spec.name, "float64", f"recurrence differs from numpy by {worst:.3e} (> {FLOAT_RTOL})")
    return Check("float64", "numeric", f"recurrence (sympy.lambdify) vs. explicit numpy solution over T = {FLOAT_T},"
                 f" d_k = {Kd}, d_v = {Vd}: max relative error ≤ {FLOAT_RTOL:.0e}",
                 measured=f"max relative error {worst:.1e}")


DELTA_CHUNK = 4  # chunk size of the chunk-identity check: FLOAT_T = 11 tokens are two full chunks and a tail of 3


def _check_delta_chunk(d: Derivation, seed: int) -> Check:
    """float64: the chunked (WY) form of a delta-rule solver (mesagen.symbolic.delta_chunk.chunked_float, with
    ε_t from the form's own step program through sympy.lambdify) against the token recursion (the derived
    update and readout through sympy.lambdify), from a random nonzero initial state, with time-varying gates
    and step sizes: outputs at every t and the final state."""
    from mesagen.symbolic.delta_chunk import chunked_float

    rng = np.random.default_rng(seed + 1)
    Kd, Vd = FLOAT_DIMS["K"], FLOAT_DIMS["V"]
    rec = d.recurrence
    fns = [_lambdified(a, Kd, Vd) for a in rec.update + rec.readout]
    step_fns = [_lambdified(a, Kd, Vd) for a in d.delta_chunk.step]
    if [st.name for st in rec.states] != ["W"]:
        raise DerivationError(d.spec.name, "delta_chunk", "the chunked delta form needs the one state W")
    scal: dict = {n: 0.3 + 0.5 * rng.random() for n in d.spec.parameters}
    width = {"d_k": Kd, "d_v": Vd}
    series = {n: 0.3 + 0.7 * rng.random((FLOAT_T, width[x.shape[3]]) if len(x.shape) == 4 else (FLOAT_T,))
              for n, x in d.spec.inputs.items()}  # time-varying; gates α ∈ (0.3, 1], the programs' linear space
    ks, vs, qs = (rng.standard_normal((FLOAT_T, n)) for n in (Kd, Vd, Kd))
    W0 = rng.standard_normal((Vd, Kd))
    W, got_o, eps = W0, [], []
    for t in range(FLOAT_T):
        env = {"W": W, "k": ks[t][:, None], "v": vs[t][:, None], "q": qs[t][:, None], **scal}
        for n, x in series.items():
            env[n] = x[t][:, None] if np.ndim(x[t]) else x[t]
            if np.ndim(x[t]):
                env[f"diag_{n}"] = np.diag(x[t])
        for target, names, fn in step_fns:
            env[target] = np.asarray(fn(*[env[n] for n in names]), dtype=np.float64)
        eps.append(float(np.reshape(env["eps"], ())))
        for target, names, fn in fns:
            env[target] = np.asarray(fn(*[env[n] for n in names]), dtype=np.float64)
        W = env[rec.new("W")]
        got_o.append(env[rec.output][:, 0])
    w = d.spec.objective.weights
    gate = None if w.kind != "decayed" else series[w.gate] if w.gate in series else np.full(FLOAT_T, scal[w.gate])
    log_alpha = np.zeros(FLOAT_T) if gate is None else np.log(gate)
    o, WT = chunked_float(W0, qs, ks, vs, np.array(eps), log_alpha, DELTA_CHUNK)
    scale = max(1.0, float(np.max(np.abs(got_o))), float(np.max(np.abs(W))))
    worst = max(float(np.max(np.abs(o - np.array(got_o)))), float(np.max(np.abs(WT - W)))) / scale
    if not worst <= FLOAT_RTOL:
        raise DerivationError(d.spec.name, "delta_chunk", f"the chunked (WY) form differs from the recursion by "
                              f"{worst:.3e} (> {FLOAT_RTOL})")
    return Check("delta_chunk", "numeric", f"chunked WY form (unit lower-triangular solve for the pseudo-values, "
                 f"in-chunk decays from cumulative log gates) vs. the recursion over T = {FLOAT_T} in chunks of "
                 f"{DELTA_CHUNK}, d_k = {Kd}, d_v = {Vd}, nonzero initial state: outputs and final state, max "
                 f"relative error ≤ {FLOAT_RTOL:.0e}", measured=f"max relative error {worst:.1e}")
CHUNK = 4  # chunk length of the float64 check of the chunked ridge form (FLOAT_T = 11: two chunks and a tail)


def _check_chunked(d: Derivation, seed: int) -> Check:
    """float64: the exact chunkwise ridge form (prefix Woodbury) equals the kernel's own definition.

    The reference runs the kernel form token by token (C̄_t, Ā_t running sums from non-default initial sums,
    x_t from the precondition program through sympy.lambdify, o_t = C̄_t x_t). The chunked side follows the
    generated form: per chunk of CHUNK tokens, P = Ā_c⁻¹ from a Cholesky factor, I + K P Kᵀ = L Lᵀ, and
    x_t = P q_t − (P Kᵀ L⁻ᵀ)[:, :t+1] (L⁻¹ K P q_t)[:t+1]; the sums carried from chunk to chunk.
    """
    rng = np.random.default_rng(seed + 1)
    Kd, Vd = FLOAT_DIMS["K"], FLOAT_DIMS["V"]
    kf = d.kernel
    (_, names, fn), = [_lambdified(a, Kd, Vd) for a in kf.precondition]
    M = rng.standard_normal((Kd, Kd))
    A0 = M @ M.T + (0.3 + 0.5 * rng.random()) * np.eye(Kd)
    C0 = rng.standard_normal((Vd, Kd))
    ks, vs, qs = (rng.standard_normal((FLOAT_T, n)) for n in (Kd, Vd, Kd))
    want, A, C = [], A0.copy(), C0.copy()
    for t in range(FLOAT_T):
        A, C = A + np.outer(ks[t], ks[t]), C + np.outer(vs[t], ks[t])
        env = {"Abar": A, "q": qs[t][:, None]}
        want.append(C @ np.asarray(fn(*[env[n] for n in names]), dtype=np.float64)[:, 0])
    got, A, C = [], A0.copy(), C0.copy()
    for s in range(0, FLOAT_T, CHUNK):
        k, v, q = ks[s:s + CHUNK], vs[s:s + CHUNK], qs[s:s + CHUNK]
        n = len(k)
        LA_inv = np.linalg.inv(np.linalg.cholesky(A))
        P = LA_inv.T @ LA_inv
        L = np.linalg.cholesky(np.eye(n) + k @ P @ k.T)
        Y = np.linalg.solve(L, k @ P @ q.T)                    # [j, t]
        Zt = np.linalg.solve(L, k @ P)                         # rows of Zᵀ
        X = q @ P - np.triu(Y).T @ Zt                          # rows x_tᵀ
        got += list(X @ C.T + np.tril(X @ k.T) @ v)
        A, C = A + k.T @ k, C + v.T @ k
    worst = max(float(np.max(np.abs(g - w)) / max(1.0, float(np.max(np.abs(w))))) for g, w in zip(got, want))
    if not worst <= FLOAT_RTOL:
        raise DerivationError(d.spec.name, "chunked", f"the chunkwise form differs from the parallel form by "
                              f"{worst:.3e} (> {FLOAT_RTOL})")
    return Check("chunked_form", "numeric", f"exact chunkwise form (prefix Woodbury: per chunk Cholesky of Ā_c and of "
                 f"I + K Ā_c⁻¹ Kᵀ) vs. the parallel form token by token, float64, T = {FLOAT_T} in chunks of {CHUNK}, "
                 f"d_k = {Kd}, d_v = {Vd}, non-default initial sums: max relative error ≤ {FLOAT_RTOL:.0e}",
                 measured=f"max relative error {worst:.1e}")


def _stats_chunked_applies(d: Derivation) -> bool:
    """Whether the layer gets the chunked form over the statistics (KernelForm.stats_chunkable, gate per head)."""
    w = d.spec.objective.weights
    gate = d.spec.inputs.get(w.gate) if w.kind == "decayed" else None
    return d.kernel is not None and d.kernel.stats_chunkable and not (gate is not None and len(gate.shape) == 4)


class _Program:
    """A one-line program ``target = expr`` (what _lambdified reads) for an accumulator's summand."""

    def __init__(self, target: str, expr: sp.Basic) -> None:
        self.target, self.expr = target, expr


def _check_stats_chunked(d: Derivation, seed: int) -> Check:
    """float64: the chunked form over the running statistics against the token recursion.

    The reference is the derived update and readout through sympy.lambdify, token by token, from a reachable
    non-default state (the default one after three random tokens). The chunked side follows the generated
    form (_stats_chunk_step) with the kernel form's own programs through sympy.lambdify: the statistics the
    state stands for (stats_from_state), then per chunk of CHUNK tokens, with b_t the cumulative log gate since
    the chunk's start, Ā_t = exp(b_t) Ā_c + Σ_{i≤t} exp(b_t − b_i) a_i and C̄_t likewise (a_i, c_i the
    accumulators' summands at token i; no decay for an undecayed sum), x_t from the precondition program,
    o_t = C̄_t x_t; the final state from state_from_stats. Time-varying gates and importance weights.
    """
    rng = np.random.default_rng(seed + 2)
    Kd, Vd = FLOAT_DIMS["K"], FLOAT_DIMS["V"]
    dims = {"K": Kd, "V": Vd}
    rec, kf = d.recurrence, d.kernel
    lam = lambda program: [_lambdified(a, Kd, Vd) for a in program]  # noqa: E731
    rec_fns, stat_fns, pre_fns, final_fns = (lam(rec.update + rec.readout), lam(kf.stats_from_state),
                                             lam(kf.precondition), lam(kf.state_from_stats))
    sum_fns = {a.name: _lambdified(_Program(a.name, a.summand), Kd, Vd) for a in kf.accumulators}
    width = {"d_k": Kd, "d_v": Vd}
    data: dict = {n: 0.3 + 0.5 * (rng.random(width[p.shape[1]]) if len(p.shape) == 2 else rng.random())
                  for n, p in d.spec.parameters.items()}
    warm = 3
    series = {n: 0.3 + 0.7 * rng.random(warm + FLOAT_T) for n in d.spec.inputs}   # α, β in the linear space
    ks, vs, qs = (rng.standard_normal((warm + FLOAT_T, n)) for n in (Kd, Vd, Kd))
    solver = d.spec.solver
    if solver.kind == "gd" and solver.step_size:  # a convergent step (η λ_max < 1), as in _check_float
        coef = d.spec.objective.regularizer.coefficient
        data[solver.step_size] = float(0.9 / (np.linalg.eigvalsh(ks.T @ ks)[-1] + (data[coef] if coef else 0.0)))

    def env_at(t: int | None) -> dict:
        env: dict = {}
        for n, x in data.items():
            if np.ndim(x):
                env[n], env[f"diag_{n}"] = x[:, None], np.diag(x)
            else:
                env[n] = x
        if t is not None:
            env.update(k=ks[t][:, None], v=vs[t][:, None], q=qs[t][:, None], **{n: x[t] for n, x in series.items()})
        return env

    def run(fns, env: dict) -> dict:
        for target, names, fn in fns:
            env[target] = np.asarray(fn(*[env[n] for n in names]), dtype=np.float64)
        return env

    exact0 = {n: sp.ImmutableMatrix([sp.Float(x) for x in v]) if np.ndim(v) else sp.Float(v) for n, v in data.items()}
    state = {st.name: np.asarray(evaluate(st.init, exact0, dims).evalf(), dtype=np.float64) for st in rec.states}
    want = []
    for t in range(warm + FLOAT_T):
        env = run(rec_fns, {**state, **env_at(t)})
        state = {st.name: env[rec.new(st.name)] for st in rec.states}
        if t == warm - 1:
            state0 = dict(state)
        if t >= warm:
            want.append(env[rec.output][:, 0])
    w = d.spec.objective.weights
    log_alpha = np.zeros(warm + FLOAT_T)
    if w.kind == "decayed":
        log_alpha = np.log(series[w.gate] if w.gate in series else np.full(warm + FLOAT_T, data[w.gate]))
    senv = run(stat_fns, {**state0, **env_at(None)})
    sums = {"Cbar": senv["C0"], "Abar": senv["A0"]}
    decayed = {a.name: a.decayed for a in kf.accumulators}
    got = []
    for s in range(warm, warm + FLOAT_T, CHUNK):
        idx = list(range(s, min(s + CHUNK, warm + FLOAT_T)))
        b = np.cumsum(log_alpha[idx])
        terms = {n: [run([fn], env_at(i))[n] for i in idx] for n, fn in sum_fns.items()}
        for j, t in enumerate(idx):
            at = {n: (np.exp(b[j]) if decayed[n] else 1.0) * sums[n]
                  + sum((np.exp(b[j] - b[i]) if decayed[n] else 1.0) * terms[n][i] for i in range(j + 1))
                  for n in sums}
            x = run(pre_fns, {**env_at(t), "Abar": at["Abar"]})["x"]
            got.append((at["Cbar"] @ x)[:, 0])
        sums = at
    fenv = run(final_fns, {**env_at(None), **sums})
    final = {st.name: fenv[rec.new(st.name)] for st in rec.states}
    scale = max(1.0, float(np.max(np.abs(want))), *(float(np.max(np.abs(x))) for x in state.values()))
    worst = max(float(np.max(np.abs(np.array(got) - np.array(want)))),
                *(float(np.max(np.abs(final[n] - state[n]))) for n in state)) / scale
    if not worst <= FLOAT_RTOL:
        raise DerivationError(d.spec.name, "chunked", f"the chunked form over the statistics differs from the "
                              f"recursion by {worst:.3e} (> {FLOAT_RTOL})")
    return Check("chunked_stats_form", "numeric", f"chunked form over the statistics (per chunk: every position's "
                 f"Ā_t, C̄_t from the sums entering the chunk scaled by the cumulative decay plus the chunk's masked, "
                 f"decayed sums; x_t = M(Ā_t) q_t by the precondition program) vs. the recursion over T = {FLOAT_T} "
                 f"in chunks of {CHUNK}, d_k = {Kd}, d_v = {Vd}, from a reachable non-default state, time-varying "
                 f"inputs: outputs and final state, max relative error ≤ {FLOAT_RTOL:.0e}",
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
    vals = _values(d, rng, EXACT_T)
    checks = [_check_gradient(d, rng, vals[0])]
    if d.closed_form is not None:
        checks += _check_stationarity(d, rng, vals)
    checks.append(_check_recurrence(d, rng, vals))
    if d.kernel is not None:
        checks.append(_check_kernel(d, rng, vals))
    checks.append(_check_float(d, seed))
    if d.delta_chunk is not None:
        checks.append(_check_delta_chunk(d, seed))
    if d.kernel is not None and d.kernel.gram_chunkable:
        checks.append(_check_chunked(d, seed))
    if _stats_chunked_applies(d):
        checks.append(_check_stats_chunked(d, seed))
    return tuple(checks)

"""Numba CPU backend: prints ``generated/NAME/layer_numba_cpu.py`` (the contract of docs/contract.md §11, over numpy arrays).

The per-head plain bodies come from :func:`~mesagen.backends.numba_common.plain_bodies` (shared with the CUDA
backend); this module adds the ``njit`` drivers that loop over (batch, head, time), the checkpointed backward
(states stored every ⌈√T⌉ steps, one segment recomputed at a time, then the adjoint step run backwards) and
the numpy API.
"""

from __future__ import annotations

import re

from mesagen.backends.common import header, indent
from mesagen.backends.numba_common import (Layout, causal_start, channel_params, constants, divides_by_input,
                                           features_numpy, layout, plain_bodies, VARLEN_API)
from mesagen.backends.loops import grad_name
from mesagen.backends.numba_kernel import emit_kernel_numba
from mesagen.ir.records import KernelLayerIR, LayerIR


def step_call(lay: Layout, body: str, states: list[str], extra: list[str], t: str = "t", r: str = "0, 1") -> str:
    """``body(states, q[b, t, h], …, params[h], inputs[b, t, h], new states, temps, o_t, extra…, r)``."""
    args = (states + [f"{x}[b, {t}, h]" for x in ("q", "k", "v")] + [f"{p}[h]" for p in lay.params]
            + [f"{i}[b, {t}, h]" for i in lay.inputs] + list(lay.new_states) + list(lay.temps) + ["o_t"] + extra)
    return f"{body}({', '.join(args)}, {r})"


_ADJOINT_DOC = ["backward(): the adjoint recurrence, derived per assignment from the IR. States are checkpointed",
                "every ⌈√T⌉ steps; each segment is recomputed forwards, then the adjoint step runs backwards. No",
                "earlier state is reconstructed by reversing an update."]
_IMPLICIT_DOC = ["forward(): Sherman–Morrison steps inside max(⌈√T⌉, 64)-token segments; at every segment boundary, and for the",
                 "final state, the state is rebuilt from the exact statistics (Σ v kᵀ, Σ k kᵀ + λI; Cholesky), at",
                 "the same points as layer_jax.py, so rank-one rounding never accumulates over more than one segment.",
                 "",
                 "backward(): implicit differentiation of the exact solution o_t = C̄_t Ā_t⁻¹ q_t (as layer_jax.py:",
                 "per token x_t = P_t q_t and y_t = W_tᵀ ḡ_t, reverse running sums of ḡ_t x_tᵀ and y_t x_tᵀ), never an",
                 "adjoint through the rank-one steps, whose rounding it would amplify by up to 1/λ². States are",
                 "recomputed one max(⌈√T⌉, 64)-token segment at a time from checkpoints. Accuracy: docs/numerics.md."]


_ALLOC = re.compile(r"^\s+\w+ = np\.(empty|zeros)\(")


def parallel_drivers(lines: list[str]) -> list[str]:
    """Run forward_all / backward_all in parallel over (batch, head): ``numba.prange`` over B·H.

    Each driver is printed as scratch allocations, then ``for b in range(B): for h in range(H):`` around a body
    that touches only row (b, h) of every argument and its scratch. The allocations move into the loop body
    (one private set per (b, h); numba's parfors privatise variables assigned in it), the two loops become one
    ``prange`` and the driver gets ``@_pjit`` (``njit(parallel=True)``). Every (b, h) runs the same serial
    instructions as before, so results are bit-identical to the serial drivers for any thread count.
    """
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == "@_jit" and i + 1 < len(lines) and re.match(r"\s*def (forward|backward)_all\(", lines[i + 1]):
            ind = len(line) - len(line.lstrip())
            j = i + 2
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > ind):
                j += 1
            fn = lines[i + 1:j]
            loop = next(n for n, x in enumerate(fn) if x.strip() == "for b in range(B):")
            assert fn[loop + 1].strip() == "for h in range(H):", fn[loop + 1]
            lead = fn[loop][:len(fn[loop]) - len(fn[loop].lstrip())]
            allocs = [x.strip() for x in fn[:loop] if _ALLOC.match(x)]
            head = [x for x in fn[:loop] if not _ALLOC.match(x)]
            body = [x[4:] if x.strip() else x for x in fn[loop + 2:]]
            out += [line.replace("@_jit", "@_pjit"), *head, lead + "for bh in prange(B * H):  # (batch, head) in parallel",
                    lead + "    b = bh // H", lead + "    h = bh - b * H", *[lead + "    " + a for a in allocs], *body]
            i = j
        else:
            out.append(line)
            i += 1
    return out


def _check_implicit(ir: LayerIR, lay: Layout) -> None:
    """The fixed implicit template's assumptions: states (S [K, V], P [K, K]) = (W_tᵀ, A_t⁻¹) and parameters
    entering only through the initial state (the kernel and the step read none; no per-token inputs).

    Raises:
        NotImplementedError: the IR breaks one of them.
    """
    rec, kf = ir.recurrence, ir.kernel
    if [(s.name, s.shape) for s in rec.states] != [(lay.states[0], ("K", "V")), (lay.states[1], ("K", "K"))]:
        raise NotImplementedError("Numba implicit backward: needs the stored states (S [K, V], P [K, K])")
    reads = {n for a in rec.update + rec.readout + kf.stats_from_state + kf.state_from_stats for n in a.reads}
    if lay.inputs or reads & set(lay.params):
        raise NotImplementedError("Numba implicit backward: parameters may enter through the initial state only, "
                                  "and per-token inputs are not supported")


class NumbaCpuBackend:
    """Emits ``layer_numba_cpu.py``."""

    name = "numba_cpu"
    filename = "layer_numba_cpu.py"

    def emit(self, ir: LayerIR, derivation=None, checks=()) -> str:
        """Return the module text; deterministic (no dict/set order, no timestamps). A kernel-regression layer
        (:class:`KernelLayerIR`: softmax / forgetting attention) gets the fixed frame of
        :mod:`mesagen.backends.numba_kernel`."""
        if isinstance(ir, KernelLayerIR):
            return emit_kernel_numba(ir, "cpu")
        lay = layout(ir)
        implicit = ir.recurrence.backward == "implicit"
        if implicit:
            _check_implicit(ir, lay)
        L = header(ir, "numba_cpu").splitlines()
        L += ['"""' + f"{ir.name} sequence layer -- Numba CPU backend (generated by mesagen).", "",
              ir.description, "",
              "Layouts (fla-compatible, numpy): q, k [B, T, H, K]; v, o [B, T, H, V]; per-token inputs [B, T, H] (or",
              "[B, T, H, K] / [B, T, H, V], see INPUTS); parameters [H] in their constrained space; float32 or float64",
              "(the dtype of q). The numpy frame applies the feature map and the query scale (q <- scale * phi(q),",
              "k <- phi(k)) and turns a log-space gate into alpha = exp(g) before the per-head programs; backward()",
              "applies the chain rule through them.", "",
              "Forms: recurrent only -- an njit loop over (batch, head, time) of the per-head step printed from",
              "the IR as explicit element loops (the same plain body text as layer_numba_cuda.py).", "",
              *(_IMPLICIT_DOC if implicit else _ADJOINT_DOC), '"""', "",
              "from __future__ import annotations", "", "import math", "from functools import lru_cache",
              "from typing import NamedTuple", "", "import numpy as np", "from numba import njit, prange", ""]
        L += constants(ir)
        if divides_by_input(ir, lay):  # 1/α with α = exp(g) = 0 at g = −inf: IEEE inf/NaN, not ZeroDivisionError
            L += ["# error_model numpy: a division by a per-token input that is 0 (e.g. the gate α = exp(−inf)) gives",
                  "# inf / NaN as in IEEE arithmetic (positions after it only), never a ZeroDivisionError",
                  '_jit = njit(cache=False, error_model="numpy")',
                  '_pjit = njit(cache=False, error_model="numpy", parallel=True)  # the drivers: prange over (batch, head)',
                  "", ""]
        else:
            L += ["_jit = njit(cache=False)",
                  "_pjit = njit(cache=False, parallel=True)  # the drivers: prange over (batch, head)", "", ""]
        L += [
              "@_jit", "def _sync():", '    """Barrier between statements: nothing to wait for on one CPU thread."""',
              "    return None", "", ""]
        L += plain_bodies(ir)
        L += parallel_drivers(self._build(lay, implicit))
        how = ("implicit differentiation, max(⌈√T⌉, 64)-step segments recomputed" if implicit
               else "the adjoint recurrence, checkpointed every ⌈√T⌉ steps")
        api = _API.format(states=", ".join(f"{s} [B, H, ...]" for s in lay.states), how=how,
                          features="\n".join(features_numpy(ir.feature_map)))
        L += (channel_params(api, _CHANNEL_API) if lay.vec_params else api).splitlines()
        L += (_VARLEN_IO + VARLEN_API).splitlines()
        return "\n".join(L).rstrip("\n") + "\n"

    def _implicit(self, lay: Layout, alloc: list[str]) -> list[str]:
        """forward_all / backward_all of the implicit backward: the fixed template ``_IMPLICIT_DRIVERS`` with the
        IR's state names (S, P) and parameters filled in."""
        sn, pn = lay.states
        ps = lay.params
        text = _IMPLICIT_DRIVERS.format(
            S=sn, P=pn, params="".join(p + ", " for p in ps), dparams="".join(f"d{p}, " for p in ps),
            step=step_call(lay, "_step_body", [sn, pn], []), alloc="\n".join(indent(alloc)),
            causal="\n".join(indent(causal_start(lay, "0", "1"), 12)),
            zero_dparams="\n".join(indent([f"d{p}[b, h] = ftype(0)" for p in ps] or ["pass"], 12)))
        return text.splitlines()

    def _build(self, lay: Layout, implicit: bool) -> list[str]:
        S, N, T = list(lay.states), list(lay.new_states), list(lay.temps)
        ps, ins = list(lay.params), list(lay.inputs)
        g = grad_name
        alloc = [f"{n} = np.empty({lay.alloc_shape(n)}, dt)" for n in S + N + T + ["o"]]
        alloc = [a.replace("o = np.empty", "o_t = np.empty") if a.startswith("o = ") else a for a in alloc]
        load = [f"_copy2({s}, {s}_0[b, h], 0, 1)" for s in S]
        advance = [f"_copy2({s}, {s}_new, 0, 1)" for s in S]
        F = ["@lru_cache(maxsize=None)", "def _build(K, V, dtype_name):",
             '    """Compile the bodies and the batched drivers for d_k = K, d_v = V, compute dtype "float32" | "float64"."""',
             '    ftype = np.float64 if dtype_name == "float64" else np.float32',
             "    _init_body, _step_body, _adjoint_body, _init_adjoint_body, _copy2, _copy1 = _make_bodies(K, V, ftype, _jit)",
             ""]
        D = ["@_jit", f"def init_all({', '.join(ps + [s + '_0' for s in S])}):",
             f"    for b in range({S[0]}_0.shape[0]):", f"        for h in range({S[0]}_0.shape[1]):",
             f"            _init_body({', '.join([s + '_0[b, h]' for s in S] + [p + '[h]' for p in ps])}, 0, 1)", ""]
        D += ["@_jit", f"def init_adjoint_all({', '.join([g(s) + '_0' for s in S] + ps + ['out'])}):",
              f"    for b in range(out.shape[0]):", f"        for h in range(out.shape[1]):",
              f"            r = _init_adjoint_body({', '.join([g(s) + '_0[b, h]' for s in S] + [p + '[h]' for p in ps])}, 0, 1)"
              if ps else "            r = ()",
              *[f"            out[b, h, {n}] += r[{n}]" for n in range(len(ps))], ""]
        if lay.vec_params:  # out [B, H, n, K]: a per-key-channel parameter's row is its buffer, a scalar's is [..., 0]
            idx = {p: n for n, p in enumerate(ps)}
            args0 = [g(s) + '_0[b, h]' for s in S] + [p + '[h]' for p in ps] + [f"out[b, h, {idx[p]}]"
                                                                                   for p in lay.vec_params]
            D[-(4 + len(ps)):] = [f"    for b in range(out.shape[0]):", f"        for h in range(out.shape[1]):",
                      "            " + ("r = " if lay.scalar_params else "")
                      + f"_init_adjoint_body({', '.join(args0)}, 0, 1)",
                      *[f"            out[b, h, {idx[p]}, 0] += r[{j}]" for j, p in enumerate(lay.scalar_params)], ""]
        if implicit:
            return F + indent(D + self._implicit(lay, alloc)) + ["", ""]
        args = ["q", "k", "v"] + ps + ins + [s + "_0" for s in S]
        D += ["@_jit", f"def forward_all({', '.join(args + ['o'] + [s + '_T' for s in S])}):",
              "    B, T, H = q.shape[0], q.shape[1], q.shape[2]", "    dt = q.dtype"]
        D += indent(alloc)
        D += ["    for b in range(B):", "        for h in range(H):"]
        D += indent(load, 12)
        D += ["            for t in range(T):", "                " + step_call(lay, "_step_body", S, []),
              "                _copy1(o[b, t, h], o_t, 0, 1)"]
        D += indent(advance, 16)
        D += indent([f"_copy2({s}_T[b, h], {s}, 0, 1)" for s in S], 12) + [""]
        gN = [g(n) for n in N]
        gS = [g(s) for s in S]
        gT = [g(n) for n in T]
        outs = ["dq", "dk", "dv"] + ["d" + p for p in ps] + ["d" + i for i in ins] + [g(s) + "_0" for s in S]
        D += ["@_jit", f"def backward_all({', '.join(args + ['do'] + [g(s) + '_T' for s in S] + outs + ['L'])}):",
              '    """Checkpointed adjoint sweep (segments of L = ⌈√T⌉ steps); d<param> is [B, H], summed by the caller."""',
              "    B, T, H = q.shape[0], q.shape[1], q.shape[2]", "    dt = q.dtype",
              "    nseg = (T + L - 1) // L"]
        D += indent(alloc)
        D += indent([f"{n} = np.empty({lay.alloc_shape(n)}, dt)"
                     for n in gN + gS + gT])
        D += indent([f"ck_{s} = np.empty((nseg,) + {lay.alloc_shape(s)}, dt)" for s in S])
        D += indent([f"seg_{s} = np.empty((L,) + {lay.alloc_shape(s)}, dt)" for s in S])
        D += ["    for b in range(B):", "        for h in range(H):"]
        D += indent(causal_start(lay, "0", "1"), 12)
        D += indent(load, 12)
        D += ["            for t in range(tl + 1):  # forward sweep: keep the state entering every segment",
              "                if t % L == 0:"]
        D += indent([f"_copy2(ck_{s}[t // L], {s}, 0, 1)" for s in S], 20)
        D += ["                " + step_call(lay, "_step_body", S, [])]
        D += indent(advance, 16)
        D += indent([f"_copy2({g(s)}_new, {g(s)}_T[b, h], 0, 1)" for s in S], 12)
        sps, vps = list(lay.scalar_params), list(lay.vec_params)
        D += indent([f"acc_{p} = ftype(0)" for p in sps], 12)
        D += indent([line for p in vps for line in (f"for i in range(d{p}.shape[2]):  # accumulated by the adjoint steps",
                                                      f"    d{p}[b, h, i] = ftype(0)")], 12)
        D += ["            for c in range((tl + L) // L - 1, -1, -1):", "                t0 = c * L",
              "                t1 = min(tl + 1, t0 + L)"]
        D += indent([f"_copy2({s}, ck_{s}[c], 0, 1)" for s in S], 16)
        D += ["                for t in range(t0, t1):  # recompute the segment's states"]
        D += indent([f"_copy2(seg_{s}[t - t0], {s}, 0, 1)" for s in S], 20)
        D += ["                    " + step_call(lay, "_step_body", S, [])]
        D += indent(advance, 20)
        D += ["                for t in range(t1 - 1, t0 - 1, -1):  # adjoint steps, last to first"]
        call = step_call(lay, "_adjoint_body", [f"seg_{s}[t - t0]" for s in S],
                         ["do[b, t, h]"] + gN + gS + gT + ["dq[b, t, h]", "dk[b, t, h]", "dv[b, t, h]"]
                         + [f"d{i}[b, t, h]" for i in lay.vec_inputs] + [f"d{p}[b, h]" for p in vps])
        D += ["                    " + ("r = " if lay.scalars else "") + call]
        D += [f"                    acc_{p} += r[{n}]" for n, p in enumerate(sps)]
        D += [f"                    d{i}[b, t, h] = r[{len(sps) + n}]" for n, i in enumerate(lay.scalar_inputs)]
        D += indent([f"_copy2({g(s)}_new, {g(s)}, 0, 1)" for s in S], 20)
        D += indent([f"_copy2({g(s)}_0[b, h], {g(s)}_new, 0, 1)" for s in S], 12)
        D += indent([f"d{p}[b, h] = acc_{p}" for p in sps], 12) + [""]
        D += ["return init_all, init_adjoint_all, forward_all, backward_all"]
        return F + indent(D) + ["", ""]


# Per-key-channel parameters ([H, K], e.g. MesaNet's ridge coefficient λ): the API lines that assume [H] parameters,
# replaced only in modules that have such a parameter (the other modules' text is unchanged).
_CHANNEL_API = (
    ("""        if n not in params or np.shape(params[n]) != (H,):
            raise ValueError(f"{SPEC_NAME}: parameter {n!r} must be given with shape [H] = ({H},)")""",
     """        want = (H,) + ((q.shape[-1],) if PARAMS[n]["shape"] == ("H", "K") else ())
        if n not in params or np.shape(params[n]) != want:
            raise ValueError(f"{SPEC_NAME}: parameter {n!r} must be given with shape [{', '.join(PARAMS[n]['shape'])}] "
                             f"= {want}")"""),
    ("""    dps = [np.zeros((B, H), dt) for _ in _PARAM_NAMES]""",
     """    dps = [np.zeros((B, H) + ((K,) if PARAMS[n]["shape"] == ("H", "K") else ()), dt) for n in _PARAM_NAMES]"""),
    ("""        acc = np.zeros((B, H, len(_PARAM_NAMES)), dt)""",
     """        acc = np.zeros((B, H, len(_PARAM_NAMES), K), dt)  # [..., 0] for a per-head parameter"""),
    ("""        dps = [d + acc[:, :, n] for n, d in enumerate(dps)]""",
     """        dps = [d + (acc[:, :, n] if d.ndim == 3 else acc[:, :, n, 0]) for n, d in enumerate(dps)]"""),
    ("""d<param> [H] (including""", """d<param> [H] or [H, K] (including"""),
)


_API = '''
# ----------------------------------------------------------------------------------------------------
# Public API (docs/contract.md §11), over numpy arrays.

_COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _compute_dtype(q):
    """The compute dtype: q's dtype, which must be float32 or float64 (the documented dtype policy)."""
    dt = np.asarray(q).dtype
    if dt not in _COMPUTE_DTYPES:
        raise ValueError(f"{{SPEC_NAME}}: q has dtype {{dt}}, but this layer computes in q's dtype, which must be "
                         f"float32 or float64; cast q first (e.g. q.astype(np.float32))")
    return dt


def _real(what, x, dt):
    """``x`` as a C-contiguous array of the compute dtype ``dt``; it must hold real floating values."""
    x = np.asarray(x)
    if not (x.dtype.kind == "f" or (x.dtype.kind == "V" and x.dtype.name.startswith(("bfloat", "float")))):
        raise ValueError(f"{{SPEC_NAME}}: {{what}} has dtype {{x.dtype}}; it must be a real floating array (it is "
                         f"cast to the compute dtype {{dt}}, q's dtype)")
    return np.ascontiguousarray(x, dtype=dt)


_DOMAINS = {{"positive": lambda x: x > 0, "unit_interval": lambda x: (x >= 0) & (x <= 1),
            "nonpositive": lambda x: x <= 0, "positive_unit_interval": lambda x: (x > 0) & (x <= 1)}}


def _check_domain(what, x, domain):
    """Refuse finite values outside the declared domain ("positive": > 0, "unit_interval": [0, 1],
    "nonpositive": ≤ 0, "positive_unit_interval": (0, 1]); non-finite values are left to the causality rule."""
    if domain == "real":
        return
    x = np.asarray(x, np.float64)
    inside = _DOMAINS[domain](x)
    bad = ~(inside | ~np.isfinite(x))
    if np.any(bad):
        raise ValueError(f"{{SPEC_NAME}}: {{what}} has values outside its domain {{domain!r}} (e.g. {{float(x[bad].ravel()[0])!r}})")


def _prepare(q, k, v, params, inputs, lead):
    dt = _compute_dtype(q)
    q, k, v = (_real(n, x, dt) for n, x in (("q", q), ("k", k), ("v", v)))
    if q.ndim != lead + 1 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1] or v.ndim != q.ndim:
        raise ValueError(f"{{SPEC_NAME}}: expected q, k [..., H, K] and v [..., H, V] with equal leading axes; "
                         f"got q {{q.shape}}, k {{k.shape}}, v {{v.shape}}")
    H = q.shape[-2]
    ps = []
    for n in _PARAM_NAMES:
        if n not in params or np.shape(params[n]) != (H,):
            raise ValueError(f"{{SPEC_NAME}}: parameter {{n!r}} must be given with shape [H] = ({{H}},)")
        ps.append(_real(f"parameter {{n!r}}", params[n], dt))
        _check_domain(f"parameter {{n!r}}", ps[-1], PARAMS[n]["domain"])
    if sorted(inputs) != sorted(_INPUT_NAMES):
        raise ValueError(f"{{SPEC_NAME}}: per-token inputs must be exactly {{list(_INPUT_NAMES)}}, got {{sorted(inputs)}}")
    ins = []
    for n, ch in zip(_INPUT_NAMES, _INPUT_CHANNELS):
        want = q.shape[:-1] + {{None: (), "K": q.shape[-1:], "V": v.shape[-1:]}}[ch]
        if np.shape(inputs[n]) != want:
            raise ValueError(f"{{SPEC_NAME}}: input {{n!r}} must have shape {{want}} ({{', '.join(INPUTS[n]['shape'])}}), "
                             f"got {{np.shape(inputs[n])}}")
        ins.append(_real(f"input {{n!r}}", inputs[n], dt))
        _check_domain(f"input {{n!r}}", ins[-1], INPUTS[n]["domain"])
    return q, k, v, ps, ins, dt


def _scale_value(scale, K):
    """The query scale of a call: ``scale``, or DEFAULT_SCALE when None ("inverse_sqrt_dk" = K ** -0.5).

    Raises:
        ValueError: ``scale`` is not a finite real number (or None).
    """
    if scale is None:
        scale = DEFAULT_SCALE
    if isinstance(scale, str) and scale == "inverse_sqrt_dk":
        return float(K) ** -0.5
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)) \
            or not math.isfinite(scale):
        raise ValueError(f"{{SPEC_NAME}}: scale must be a finite real number or None, got {{scale!r}}")
    return float(scale)


{features}

def _frame(q, k, ins, scale):
    """What the per-head programs read: (scale · φ(q), φ(k), inputs with a log-space gate as α = exp(g), scale).

    Arrays keep the compute dtype; the identity map with scale 1 returns q and k themselves.
    """
    sc = _scale_value(scale, q.shape[-1])
    qf, kf = _phi(q), _phi(k)
    if sc != 1.0:
        qf = qf * q.dtype.type(sc)
    ins = list(ins)
    if _LOG_GATE is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            ins[_LOG_GATE] = np.exp(ins[_LOG_GATE])
    return qf, kf, ins, sc


def _unframe(q, k, ins, sc, dqf, dkf, dins):
    """Chain rule through :func:`_frame`: (dq, dk, dins) from the cotangents of what the programs read.

    A position whose cotangent is exactly zero gets an exact zero (never 0 · NaN from a non-finite input there:
    the causality rule of docs/contract.md §5).
    """
    dq = _phi_vjp(q, dqf * q.dtype.type(sc) if sc != 1.0 else dqf)
    dk = _phi_vjp(k, dkf)
    dins = list(dins)
    if _LOG_GATE is not None:  # g = log α: dg = dα · α
        d = dins[_LOG_GATE]
        with np.errstate(over="ignore", invalid="ignore"):
            dins[_LOG_GATE] = np.where(d == 0, d.dtype.type(0), d * ins[_LOG_GATE])
    return dq, dk, dins


def init_state(batch, num_heads, d_k, d_v, params, dtype=np.float32):
    """Default initial state (the spec's solver initialisation) for every (batch, head).

    Args:
        batch, num_heads, d_k, d_v: sizes B, H, K, V.  params: dict name -> [H] real floating values.
        dtype: float32 or float64, the compute dtype of the layer calls that will use this state.

    Returns:
        State with fields {states}, numpy arrays of ``dtype``.

    Raises:
        ValueError: ``dtype`` is not float32 / float64, or a parameter is not real floating.
    """
    dt = np.dtype(dtype)
    if dt not in _COMPUTE_DTYPES:
        raise ValueError(f"{{SPEC_NAME}}: init_state dtype {{dt}} is not supported; use float32 or float64")
    fields = [np.empty((batch, num_heads) + _state_shape(n, d_k, d_v), dt) for n in State._fields]
    ps = [_real(f"parameter {{n!r}}", params[n], dt) for n in _PARAM_NAMES]
    _build(d_k, d_v, dt.name)[0](*ps, *fields)
    return State(*fields)


def _state_shape(name, d_k, d_v):
    return tuple({{"K": d_k, "V": d_v}}[d] for d in _STATE_DIMS[name])


def _initial(initial_state, B, H, K, V, params, dt):
    if initial_state is None:
        return init_state(B, H, K, V, params, dt)
    st = State(*(_real(f"initial_state.{{n}}", x, dt) for n, x in zip(State._fields, initial_state)))
    for n, x in zip(State._fields, st):
        if x.shape != (B, H) + _state_shape(n, K, V):
            raise ValueError(f"{{SPEC_NAME}}: state {{n!r}} must have shape {{(B, H) + _state_shape(n, K, V)}}")
    return st


def forward(q, k, v, params, *, initial_state=None, output_final_state=False, form="recurrent", scale=None,
            cu_seqlens=None, **inputs):
    """Run the layer over a sequence (recurrent form).

    Args:
        q, k: [B, T, H, K] queries and keys.  v: [B, T, H, V] values.  Dtypes: q's dtype is the compute dtype
            and must be float32 or float64; k, v, params, inputs and initial_state must be real floating and
            are cast to it.
        params: dict name -> [H] (constrained space).  initial_state: a State or None (solver default).
        output_final_state: also return the state after the last token.  form: must be "recurrent".
        scale: the query scale (q is multiplied by it after the feature map FEATURE_MAP); None means
            DEFAULT_SCALE ("inverse_sqrt_dk" = K ** -0.5).
        **inputs: per-token inputs, each [B, T, H], [B, T, H, K] or [B, T, H, V] (see INPUTS), in the space
            INPUTS states (a log-space gate holds g = log α ≤ 0).
        cu_seqlens: None, or integer offsets [N + 1] (fla's convention, 0 = cu[0] < … < cu[N] = T) of N
            sequences packed into one row (B = 1): each starts from its own initial state (initial_state with
            leading axis N; None: the default for each), the final state has leading axis N, and the result
            is exactly that of N separate calls (the kernels run once per sequence).

    Returns:
        (o [B, T, H, V], final State or None), numpy arrays of q's dtype.

    Raises:
        ValueError: unknown form, inconsistent shapes, missing or unknown parameters or inputs, values outside
            their domain, a bad scale, q not float32 / float64, or another array not real floating; with
            cu_seqlens: B ≠ 1, offsets not 0 = cu[0] < … < cu[N] = T, an initial_state without leading axis N.
    """
    if form not in FORMS:
        raise ValueError(f"{{SPEC_NAME}}: unknown form {{form!r}}; this backend offers {{FORMS}}")
    if cu_seqlens is not None:
        return _varlen_forward(q, k, v, params, initial_state, output_final_state, form, scale, cu_seqlens, inputs)
    q, k, v, ps, ins, dt = _prepare(q, k, v, params, inputs, 3)
    B, T, H, K = q.shape
    V = v.shape[-1]
    st = _initial(initial_state, B, H, K, V, params, dt)
    qf, kf, ins, _ = _frame(q, k, ins, scale)
    o = np.full((B, T, H, V), np.nan, dt)
    final = State(*(np.array(x) for x in st))
    _build(K, V, dt.name)[2](qf, kf, v, *ps, *ins, *st, o, *final)
    return o, (final if output_final_state else None)


def step(state, q_t, k_t, v_t, params, *, scale=None, **inputs_t):
    """Decode one token: q_t, k_t [B, H, K]; v_t [B, H, V]; inputs_t each [B, H] (or [B, H, K], [B, H, V] as
    INPUTS states) -> (o_t [B, H, V], new State). ``scale`` as for :func:`forward`."""
    o, final = forward(np.asarray(q_t)[:, None], np.asarray(k_t)[:, None], np.asarray(v_t)[:, None], params,
                       initial_state=state, output_final_state=True, scale=scale,
                       **{{n: np.asarray(x)[:, None] for n, x in inputs_t.items()}})
    return o[:, 0], final


def backward(q, k, v, params, do, *, initial_state=None, dfinal_state=None, scale=None, cu_seqlens=None,
             **inputs):
    """Vector-Jacobian product of :func:`forward` ({how}).

    Args:
        q, k, v, params, initial_state, scale, **inputs: as for :func:`forward`.
        do: [B, T, H, V] cotangent of o.  dfinal_state: a State of cotangents of the final state, or None (zeros).
        cu_seqlens: as for :func:`forward` (dfinal_state and dinitial_state then have leading axis N; d<param>
            sums over the sequences).

    Returns:
        dict with dq, dk [B, T, H, K], dv [B, T, H, V], d<param> [H] (including the path through the default
        initial state when ``initial_state`` is None), d<input> shaped like the input (in its own space: dg for a
        log-space gate g), dinitial_state (a State); all of q's dtype.

    Raises:
        ValueError: inconsistent shapes, missing or unknown parameters or inputs, q not float32 / float64, or
            another array (do and dfinal_state included) not real floating.
    """
    if cu_seqlens is not None:
        return _varlen_backward(q, k, v, params, do, initial_state, dfinal_state, scale, cu_seqlens, inputs)
    q, k, v, ps, ins, dt = _prepare(q, k, v, params, inputs, 3)
    B, T, H, K = q.shape
    V = v.shape[-1]
    st = _initial(initial_state, B, H, K, V, params, dt)
    do = _real("do", do, dt)
    if do.shape != v.shape:
        raise ValueError(f"{{SPEC_NAME}}: do must have shape {{v.shape}}, got {{do.shape}}")
    gT = (State(*(np.zeros_like(x) for x in st)) if dfinal_state is None
          else State(*(_real(f"dfinal_state.{{n}}", x, dt) for n, x in zip(State._fields, dfinal_state))))
    qf, kf, fins, sc = _frame(q, k, ins, scale)
    dq, dk, dv = (np.full(x.shape, np.nan, dt) for x in (q, k, v))
    dps = [np.zeros((B, H), dt) for _ in _PARAM_NAMES]
    dins = [np.full(x.shape, np.nan, dt) for x in ins]
    g0 = State(*(np.full(x.shape, np.nan, dt) for x in st))
    init_all, init_adjoint_all, _, backward_all = _build(K, V, dt.name)
    L = max(1, math.isqrt(max(T - 1, 0)) + 1)  # segment length ⌈√T⌉
    backward_all(qf, kf, v, *ps, *fins, *st, do, *gT, dq, dk, dv, *dps, *dins, *g0, L)
    dq, dk, dins = _unframe(q, k, fins, sc, dq, dk, dins)
    if initial_state is None and _PARAM_NAMES:
        acc = np.zeros((B, H, len(_PARAM_NAMES)), dt)
        init_adjoint_all(*g0, *ps, acc)
        dps = [d + acc[:, :, n] for n, d in enumerate(dps)]
    out = {{"dq": dq, "dk": dk, "dv": dv, "dinitial_state": g0}}
    out.update({{"d" + n: d.sum(axis=0) for n, d in zip(_PARAM_NAMES, dps)}})
    out.update({{"d" + n: d for n, d in zip(_INPUT_NAMES, dins)}})
    return out
'''


# Fixed driver template of the implicit backward (``Recurrence.backward == "implicit"``: the ridge family, whose
# states are (S, P) = (W_tᵀ, A_t⁻¹) = (P_t C̄_tᵀ, Ā_t⁻¹)). Placeholders: {S} / {P} the IR's state names,
# {params} the parameter arguments, {dparams} their gradient arguments, {step} the step call,
# {zero_dparams} the lines zeroing them, {causal} the causal-start lines. Indented inside ``_build``.
_IMPLICIT_DRIVERS = '''@_jit
def _spd_inv(A, out, Lw):
    """out = A⁻¹ for a symmetric positive-definite A [n, n] (its symmetric part, as jnp.linalg.cholesky reads
    it): Cholesky A = Lw Lwᵀ, then forward and back substitution against the identity, one column at a time
    (as _spd_inv of layer_jax.py; never a general inverse). A non-positive pivot (A not numerically SPD, or
    non-finite) makes the result NaN, never an exception."""
    n = A.shape[0]
    for j in range(n):
        for i in range(j, n):
            acc = ftype(0.5) * (A[i, j] + A[j, i])
            for m in range(j):
                acc -= Lw[i, m] * Lw[j, m]
            if i == j:
                Lw[j, j] = math.sqrt(acc) if acc > ftype(0) else math.sqrt(-abs(acc) - ftype(1))  # NaN
            else:
                Lw[i, j] = acc / Lw[j, j]
    for c in range(n):
        for i in range(n):
            acc = ftype(1) if i == c else ftype(0)
            for m in range(i):
                acc -= Lw[i, m] * out[m, c]
            out[i, c] = acc / Lw[i, i]
        for i in range(n - 1, -1, -1):
            acc = out[i, c]
            for m in range(i + 1, n):
                acc -= Lw[m, i] * out[m, c]
            out[i, c] = acc / Lw[i, i]

@_jit
def _refactorise(Ct, Ab, {S}, {P}, Lw):
    """The state from exact statistics: {P} = Ā⁻¹ (Cholesky) and {S} = {P}ᵀ C̄ᵀ [K, V], with Ct = C̄ᵀ [K, V]
    and Ab = Ā [K, K] (layer_jax.py's _final_head)."""
    _spd_inv(Ab, {P}, Lw)
    for i in range(K):
        for j in range(V):
            acc = ftype(0)
            for m in range(K):
                acc += {P}[m, i] * Ct[m, j]
            {S}[i, j] = acc

@_jit
def _stats(S0, P0, Ct, Ab, Lw):
    """The statistics a state stands for: Ab = Ā₀ = P₀⁻¹ (Cholesky) and Ct = C̄₀ᵀ = Ā₀ᵀ S₀ [K, V]
    (layer_jax.py's _stats_head)."""
    _spd_inv(P0, Ab, Lw)
    for i in range(K):
        for j in range(V):
            acc = ftype(0)
            for m in range(K):
                acc += Ab[m, i] * S0[m, j]
            Ct[i, j] = acc

@_jit
def _gram_add(dCt, dAb, k_t, v_t):
    """Segment sums: dCt += k vᵀ [K, V], dAb += k kᵀ [K, K]."""
    for i in range(K):
        for j in range(V):
            dCt[i, j] += k_t[i] * v_t[j]
        for j in range(K):
            dAb[i, j] += k_t[i] * k_t[j]

@_jit
def _fold(dst, src):
    """dst += src; src = 0 (a segment's sums into the running statistics)."""
    for i in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[i, j] += src[i, j]
            src[i, j] = ftype(0)

@_jit
def _sandwich(Ml, G, Mr, tmp, out, scale):
    """out = scale · sym(Mlᵀ G Mrᵀ) for [K, K] matrices (tmp a [K, K] workspace), sym(X) = (X + Xᵀ)/2."""
    for i in range(K):
        for j in range(K):
            acc = ftype(0)
            for m in range(K):
                acc += Ml[m, i] * G[m, j]
            tmp[i, j] = acc
    for i in range(K):
        for j in range(K):
            acc = ftype(0)
            for m in range(K):
                acc += tmp[i, m] * Mr[j, m]
            out[i, j] = acc
    for i in range(K):
        for j in range(i + 1):
            s = scale * ftype(0.5) * (out[i, j] + out[j, i])
            out[i, j] = s
            out[j, i] = s

@_jit
def _segment_length(T):
    """max(⌈√T⌉, 64): the refactorisation and checkpoint interval, as in layer_jax.py."""
    L = 1
    while L * L < T:
        L += 1
    return max(L, 64)

@_jit
def forward_all(q, k, v, {params}{S}_0, {P}_0, o, {S}_T, {P}_T):
    """Rank-one steps inside max(⌈√T⌉, 64)-token segments; at every segment boundary, and for the final state, the
    state is rebuilt from the exact statistics C̄ = C̄₀ + Σ v kᵀ, Ā = Ā₀ + Σ k kᵀ (Cholesky), so rank-one
    rounding never accumulates over more than one segment (the same refactorisation points as layer_jax.py)."""
    B, T, H = q.shape[0], q.shape[1], q.shape[2]
    dt = q.dtype
    L = _segment_length(T)
{alloc}
    Ct = np.empty((K, V), dt)
    Ab = np.empty((K, K), dt)
    dCt = np.empty((K, V), dt)
    dAb = np.empty((K, K), dt)
    Lw = np.zeros((K, K), dt)
    for b in range(B):
        for h in range(H):
            _copy2({S}, {S}_0[b, h], 0, 1)
            _copy2({P}, {P}_0[b, h], 0, 1)
            _stats({S}, {P}, Ct, Ab, Lw)
            dCt[:, :] = ftype(0)
            dAb[:, :] = ftype(0)
            for t in range(T):
                {step}
                _copy1(o[b, t, h], o_t, 0, 1)
                _copy2({S}, {S}_new, 0, 1)
                _copy2({P}, {P}_new, 0, 1)
                _gram_add(dCt, dAb, k[b, t, h], v[b, t, h])
                if (t + 1) % L == 0 or t == T - 1:
                    _fold(Ct, dCt)
                    _fold(Ab, dAb)
                    _refactorise(Ct, Ab, {S}, {P}, Lw)
            if T == 0:
                _refactorise(Ct, Ab, {S}, {P}, Lw)
            _copy2({S}_T[b, h], {S}, 0, 1)
            _copy2({P}_T[b, h], {P}, 0, 1)

@_jit
def backward_all(q, k, v, {params}{S}_0, {P}_0, do, g_{S}_T, g_{P}_T, dq, dk, dv, {dparams}g_{S}_0, g_{P}_0, L):
    """Implicit differentiation of o_t = C̄_t Ā_t⁻¹ q_t (layer_jax.py's _scan_recurrent_bwd). Per token,
    x_t = {P}_t q_t and y_t = {S}_t ḡ_t (ḡ_t = do[b, t, h]): ∂q_t = y_t; with the reverse sums
    Ĉ_i = Σ_{{t≥i}} x_t ḡ_tᵀ [K, V] (stored C̄ᵀ layout) and Â_i = −Σ_{{t≥i}} y_t x_tᵀ [K, K]:
    ∂v_i = Ĉ_iᵀ k_i and ∂k_i = Ĉ_i v_i + (Â_i + Â_iᵀ) k_i. The final state's cotangent enters the sums
    through ({S}, {P}) = ({P} C̄ᵀ, Ā⁻¹), and (Ĉ₀, Â₀) leave through (C̄₀ᵀ, Ā₀) = (Ā₀ {S}₀, {P}₀⁻¹) as the initial
    state's cotangent. Nothing runs backwards through the rank-one steps. States are recomputed one segment
    of L = max(⌈√T⌉, 64) tokens at a time from checkpoints; d<param> is [B, H] (zero: parameters enter only through
    the initial state, whose pullback the caller adds)."""
    B, T, H = q.shape[0], q.shape[1], q.shape[2]
    dt = q.dtype
    nseg = (T + L - 1) // L
{alloc}
    Ct = np.empty((K, V), dt)
    Ab = np.empty((K, K), dt)
    A0 = np.empty((K, K), dt)
    dCt = np.empty((K, V), dt)
    dAb = np.empty((K, K), dt)
    Lw = np.zeros((K, K), dt)
    Ch = np.empty((K, V), dt)
    Ah = np.empty((K, K), dt)
    dCh = np.zeros((K, V), dt)
    dAh = np.zeros((K, K), dt)
    G = np.empty((K, K), dt)
    W2 = np.empty((K, K), dt)
    x = np.empty((K,), dt)
    ck_{S} = np.empty((nseg, K, V), dt)
    ck_{P} = np.empty((nseg, K, K), dt)
    seg_{S} = np.empty((L, K, V), dt)
    seg_{P} = np.empty((L, K, K), dt)
    for b in range(B):
        for h in range(H):
{causal}
{zero_dparams}
            live_final = False
            for i in range(K):
                for j in range(V):
                    if g_{S}_T[b, h, i, j] != 0:
                        live_final = True
                for j in range(K):
                    if g_{P}_T[b, h, i, j] != 0:
                        live_final = True
            _copy2({S}, {S}_0[b, h], 0, 1)
            _copy2({P}, {P}_0[b, h], 0, 1)
            _stats({S}, {P}, Ct, Ab, Lw)
            _copy2(A0, Ab, 0, 1)
            dCt[:, :] = ftype(0)
            dAb[:, :] = ftype(0)
            for t in range(tl + 1):  # forward sweep refactorised as forward_all's; keep each segment's entry
                if t % L == 0:
                    _copy2(ck_{S}[t // L], {S}, 0, 1)
                    _copy2(ck_{P}[t // L], {P}, 0, 1)
                {step}
                _copy2({S}, {S}_new, 0, 1)
                _copy2({P}, {P}_new, 0, 1)
                _gram_add(dCt, dAb, k[b, t, h], v[b, t, h])
                if (t + 1) % L == 0 or t == T - 1:
                    _fold(Ct, dCt)
                    _fold(Ab, dAb)
                    _refactorise(Ct, Ab, {S}, {P}, Lw)
            Ch[:, :] = ftype(0)
            Ah[:, :] = ftype(0)
            if live_final:  # tl == T − 1: {S}, {P}, Ct, Ab are the final state and statistics
                if T == 0:
                    _refactorise(Ct, Ab, {S}, {P}, Lw)
                for i in range(K):  # Ĉ = {P} ḡ{S}; G = ḡ{P} + Ct ḡ{S}ᵀ; Â = −sym({P}ᵀ G {P}ᵀ)
                    for j in range(V):
                        acc = ftype(0)
                        for m in range(K):
                            acc += {P}[i, m] * g_{S}_T[b, h, m, j]
                        Ch[i, j] = acc
                    for j in range(K):
                        acc = g_{P}_T[b, h, i, j]
                        for m in range(V):
                            acc += Ct[i, m] * g_{S}_T[b, h, j, m]
                        G[i, j] = acc
                _sandwich({P}, G, {P}, W2, Ah, ftype(-1))
            seen = live_final
            for c in range((tl + L) // L - 1, -1, -1):
                t0 = c * L
                t1 = min(tl + 1, t0 + L)
                _copy2({S}, ck_{S}[c], 0, 1)
                _copy2({P}, ck_{P}[c], 0, 1)
                for t in range(t0, t1):  # recompute the segment's states (after each token, rank-one)
                    {step}
                    _copy2({S}, {S}_new, 0, 1)
                    _copy2({P}, {P}_new, 0, 1)
                    _copy2(seg_{S}[t - t0], {S}, 0, 1)
                    _copy2(seg_{P}[t - t0], {P}, 0, 1)
                for t in range(t1 - 1, t0 - 1, -1):  # reverse sweep, last to first; this segment's sums in dCh, dAh
                    St, Pt = seg_{S}[t - t0], seg_{P}[t - t0]
                    qt, kt, vt, gt = q[b, t, h], k[b, t, h], v[b, t, h], do[b, t, h]
                    live = False
                    for j in range(V):
                        if gt[j] != 0:
                            live = True
                    if live:
                        seen = True
                        for i in range(K):
                            acc = ftype(0)
                            for m in range(K):
                                acc += Pt[i, m] * qt[m]
                            x[i] = acc
                        for i in range(K):
                            acc = ftype(0)
                            for m in range(V):
                                acc += St[i, m] * gt[m]
                            dq[b, t, h, i] = acc
                        for i in range(K):
                            for j in range(V):
                                dCh[i, j] += x[i] * gt[j]
                            for j in range(K):
                                dAh[i, j] -= dq[b, t, h, i] * x[j]
                    else:
                        for i in range(K):
                            dq[b, t, h, i] = ftype(0)
                    if seen:
                        for j in range(V):
                            acc = ftype(0)
                            for m in range(K):
                                acc += (Ch[m, j] + dCh[m, j]) * kt[m]
                            dv[b, t, h, j] = acc
                        for i in range(K):
                            acc = ftype(0)
                            for m in range(V):
                                acc += (Ch[i, m] + dCh[i, m]) * vt[m]
                            for m in range(K):
                                acc += (Ah[i, m] + dAh[i, m] + Ah[m, i] + dAh[m, i]) * kt[m]
                            dk[b, t, h, i] = acc
                    else:
                        for j in range(V):
                            dv[b, t, h, j] = ftype(0)
                        for i in range(K):
                            dk[b, t, h, i] = ftype(0)
                _fold(Ch, dCh)  # two-level sums (within a segment, then across segments), as layer_jax.py
                _fold(Ah, dAh)
            # the initial state: Ct₀ = Ā₀ᵀ {S}₀ and Ā₀ = {P}₀⁻¹ give ḡ{S}₀ = Ā₀ Ĉ₀ and
            # ḡ{P}₀ = −sym(Ā₀ᵀ (Â₀ + {S}₀ Ĉ₀ᵀ) Ā₀ᵀ)
            for i in range(K):
                for j in range(V):
                    acc = ftype(0)
                    for m in range(K):
                        acc += A0[i, m] * Ch[m, j]
                    g_{S}_0[b, h, i, j] = acc
                for j in range(K):
                    acc = Ah[i, j]
                    for m in range(V):
                        acc += {S}_0[b, h, i, m] * Ch[j, m]
                    G[i, j] = acc
            _sandwich(A0, G, A0, W2, g_{P}_0[b, h], ftype(-1))

return init_all, init_adjoint_all, forward_all, backward_all'''


# The array conversions of the shared cu_seqlens helpers (numba_common.VARLEN_API).
_VARLEN_IO = '''

def _varlen_host(x):
    """``x`` as a numpy array (the cu_seqlens helpers below)."""
    return np.asarray(x)


def _varlen_out(x, device):
    """A numpy result of the cu_seqlens helpers, returned as it is (this module computes on numpy arrays)."""
    return x
'''

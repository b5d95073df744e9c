"""Template of the fixed frame of a generated kernel-regression ``layer_numba_cpu.py`` / ``layer_numba_cuda.py``
(softmax / forgetting attention).

Read as text by :mod:`mesagen.backends.numba_kernel` (see :mod:`mesagen.backends.templates` for the section and
placeholder rules); never imported by generated code. The names below stand for what the generated module defines
before the frame (constants, the feature map), so that the body lints as a module.

Math (docs/family.md §9): per (batch, head), o_t = Σ_{i≤t} κ_{t,i} v_i / Σ_{i≤t} κ_{t,i} over the KV cache and the
tokens, κ_{t,i} = exp(s_{t,i}) with the logit s_{t,i} = scale · φ(k_i)ᵀφ(q_t) + Σ_{j=i+1}^{t} log α_j (the cache
slot c: + g_c + Σ_{j≤t} log α_j). Forward: online softmax (Milakov & Gimelshein 2018; flash attention, Dao et al.
2022) per query, the running maximum subtracted before every exp, the log-sum-exp ℓ_t saved. Backward: the
standard attention backward (Dao et al. 2022, Alg. 4): p = exp(s − ℓ), D_t = dO_tᵀo_t, ds = p (dO_tᵀv_i − D_t),
dq_t = Σ_i ds k_i, dk_i = Σ_t ds q_t, dv_i = Σ_t p dO_t; the gate's cotangent from Σ_i ds_{t,i} = 0:
d log α_j = −Σ_{i≥j} Σ_t ds_{t,i} (column sums of ds, suffix-summed over keys).
"""
# flake8: noqa
import math
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
from numba import cuda, float32, float64, int32, prange
from numba.core import types

SPEC_NAME: str = ""
INPUTS: dict = {}
FORMS: tuple = ()
DEFAULT_SCALE: Any = 1.0
_INPUT_NAMES: tuple = ()
_GATE_LOG: Any = None
_phi: Any = None
_phi_vjp: Any = None
_jit: Any = None
_pjit: Any = None
_attend: Any = None
_attend_backward: Any = None
_to_host: Any = None
_to_caller: Any = None

# ==== template body ====
# ==== section: rows ====
def _make_rows(K, V, ftype, jit):
    """The per-row programs for d_k = K, d_v = V, compute dtype ``ftype`` (closure constants), jitted by ``jit``.

    Every number is ``ftype(...)`` (float32 data is computed in float32). A row reads the whole (b, h) sequence and
    writes only its own outputs, so rows of one (batch, head) run in any order or in parallel without a race.
    Arguments: q, k [B, T, H, K] (q already scale · φ(q), k already φ(k)); v [B, T, H, V]; lg [B, T, H] (log α, 0
    without a gate); the cache ck [B, H, N, K], cv [B, H, N, V], cg [B, H, N] with n0 filled slots.
    Returns (_query_row, _dq_row, _key_row, _slot_row).
    """
    NEG_INF = ftype(-np.inf)
    ZERO = ftype(0)

    @jit
    def _dot_k(a, b):
        s = ZERO
        for c in range(K):
            s += a[c] * b[c]
        return s

    @jit
    def _dot_v(a, b):
        s = ZERO
        for c in range(V):
            s += a[c] * b[c]
        return s

    @jit
    def _absorb(s, vrow, m, ell, acc):
        """Online softmax: fold the key with logit ``s`` and value ``vrow`` into (m, ℓ, acc); returns (m, ℓ).
        A logit of −inf (a key decayed to nothing) adds an exact 0; a NaN logit makes the row NaN."""
        if s == NEG_INF:
            return m, ell
        if s > m:
            corr = math.exp(m - s)  # 0 while m = −inf (nothing absorbed yet)
            for c in range(V):
                acc[c] *= corr
            ell = ell * corr
            m = s
        p = math.exp(s - m)
        for c in range(V):
            acc[c] += p * vrow[c]
        return m, ell + p

    @jit
    def _query_row(q, k, v, lg, ck, cv, cg, n0, b, h, t, o_t, acc):
        """o_t = Σ p_{t,i} v_i over the tokens i = t, t−1, …, 0, then the cache slots; returns ℓ_t = m + log Σ.
        The decay Σ_{j=i+1}^{t} log α_j is summed from the query backwards (position t reads positions ≤ t only;
        no difference of cumulative sums, so a gate of −inf decays earlier keys to exactly 0)."""
        for c in range(V):
            acc[c] = ZERO
        m = NEG_INF
        ell = ZERO
        d = ZERO
        qt = q[b, t, h]
        for i in range(t, -1, -1):
            if i < t:
                d += lg[b, i + 1, h]
            m, ell = _absorb(_dot_k(qt, k[b, i, h]) + d, v[b, i, h], m, ell, acc)
        d += lg[b, 0, h]
        for c in range(n0):
            m, ell = _absorb(_dot_k(qt, ck[b, h, c]) + cg[b, h, c] + d, cv[b, h, c], m, ell, acc)
        for c in range(V):
            o_t[c] = acc[c] / ell
        return m + math.log(ell)

    @jit
    def _dq_row(q, k, v, lg, ck, cv, cg, n0, o, lse, do, b, h, t, dq_t):
        """dq_t = Σ_i ds_{t,i} k_i with p recomputed from ℓ_t; returns D_t = dO_tᵀo_t. A zero cotangent row
        dO_t gives exact zeros (never 0 · NaN from a non-finite input at or after t)."""
        for c in range(K):
            dq_t[c] = ZERO
        D = _dot_v(do[b, t, h], o[b, t, h])
        qt = q[b, t, h]
        dot = do[b, t, h]
        lt = lse[b, h, t]
        d = ZERO
        for i in range(t, -1, -1):
            if i < t:
                d += lg[b, i + 1, h]
            p = math.exp(_dot_k(qt, k[b, i, h]) + d - lt)
            ds = p * (_dot_v(dot, v[b, i, h]) - D)
            for c in range(K):
                dq_t[c] += ds * k[b, i, h, c]
        d += lg[b, 0, h]
        for j in range(n0):
            p = math.exp(_dot_k(qt, ck[b, h, j]) + cg[b, h, j] + d - lt)
            ds = p * (_dot_v(dot, cv[b, h, j]) - D)
            for c in range(K):
                dq_t[c] += ds * ck[b, h, j, c]
        return D

    @jit
    def _key_row(q, k, v, lg, lse, do, Dt, live, b, h, i, dk_i, dv_i):
        """dk_i = Σ_{t≥i} ds_{t,i} q_t, dv_i = Σ_{t≥i} p_{t,i} dO_t over the live queries (dO_t ≠ 0); returns the
        column sum Σ_t ds_{t,i}. The decay is summed from the key forwards (query t adds log α_t)."""
        T = q.shape[1]
        for c in range(K):
            dk_i[c] = ZERO
        for c in range(V):
            dv_i[c] = ZERO
        col = ZERO
        ki = k[b, i, h]
        vi = v[b, i, h]
        d = ZERO
        for t in range(i, T):
            if t > i:
                d += lg[b, t, h]
            if live[b, h, t] == 0:
                continue
            dot = do[b, t, h]
            p = math.exp(_dot_k(q[b, t, h], ki) + d - lse[b, h, t])
            ds = p * (_dot_v(dot, vi) - Dt[b, h, t])
            for c in range(K):
                dk_i[c] += ds * q[b, t, h, c]
            for c in range(V):
                dv_i[c] += p * dot[c]
            col += ds
        return col

    @jit
    def _slot_row(q, lg, ck, cv, cg, lse, do, Dt, live, b, h, j, dck_j, dcv_j):
        """_key_row for cache slot j (every query sees it, logit + g_j + Σ_{s≤t} log α_s); returns Σ_t ds_{t,j},
        the cotangent of g_j."""
        T = q.shape[1]
        for c in range(K):
            dck_j[c] = ZERO
        for c in range(V):
            dcv_j[c] = ZERO
        col = ZERO
        kj = ck[b, h, j]
        vj = cv[b, h, j]
        d = cg[b, h, j]
        for t in range(T):
            d += lg[b, t, h]
            if live[b, h, t] == 0:
                continue
            dot = do[b, t, h]
            p = math.exp(_dot_k(q[b, t, h], kj) + d - lse[b, h, t])
            ds = p * (_dot_v(dot, vj) - Dt[b, h, t])
            for c in range(K):
                dck_j[c] += ds * q[b, t, h, c]
            for c in range(V):
                dcv_j[c] += p * dot[c]
            col += ds
        return col

    return _query_row, _dq_row, _key_row, _slot_row


# ==== section: cpu_drivers ====
@lru_cache(maxsize=None)
def _build(K, V, dtype_name):
    """The batched drivers for d_k = K, d_v = V, compute dtype "float32" | "float64": ``numba.prange`` over
    (batch, head); inside, rows in order (each (b, h) runs the same serial instructions for any thread count)."""
    ftype = np.float64 if dtype_name == "float64" else np.float32
    _query_row, _dq_row, _key_row, _slot_row = _make_rows(K, V, ftype, _jit)

    @_pjit
    def forward_all(q, k, v, lg, ck, cv, cg, clen, o, lse):
        B, T, H = q.shape[0], q.shape[1], q.shape[2]
        for bh in prange(B * H):  # (batch, head) in parallel
            b = bh // H
            h = bh - b * H
            acc = np.empty((V,), q.dtype)
            for t in range(T):
                lse[b, h, t] = _query_row(q, k, v, lg, ck, cv, cg, clen[b], b, h, t, o[b, t, h], acc)

    @_pjit
    def backward_all(q, k, v, lg, ck, cv, cg, clen, o, lse, do, Dt, live, dq, dk, dv, col, dck, dcv, dcg):
        B, T, H = q.shape[0], q.shape[1], q.shape[2]
        for bh in prange(B * H):  # (batch, head) in parallel
            b = bh // H
            h = bh - b * H
            for t in range(T):
                live[b, h, t] = ftype(0)
                for c in range(V):
                    if do[b, t, h, c] != 0:
                        live[b, h, t] = ftype(1)
                if live[b, h, t] != 0:
                    Dt[b, h, t] = _dq_row(q, k, v, lg, ck, cv, cg, clen[b], o, lse, do, b, h, t, dq[b, t, h])
                else:
                    Dt[b, h, t] = ftype(0)
                    for c in range(K):
                        dq[b, t, h, c] = ftype(0)
            for i in range(T):
                col[b, h, i] = _key_row(q, k, v, lg, lse, do, Dt, live, b, h, i, dk[b, i, h], dv[b, i, h])
            for j in range(ck.shape[2]):
                if j < clen[b]:
                    dcg[b, h, j] = _slot_row(q, lg, ck, cv, cg, lse, do, Dt, live, b, h, j, dck[b, h, j], dcv[b, h, j])
                else:
                    dcg[b, h, j] = ftype(0)
                    for c in range(K):
                        dck[b, h, j, c] = ftype(0)
                    for c in range(V):
                        dcv[b, h, j, c] = ftype(0)

    return forward_all, backward_all


def _attend(qf, kf, v, lg, cache):
    """The attention core on the CPU: (o [B, T, H, V], ℓ [B, H, T]) for the framed q, k, the log gates and the cache
    (k, v, g, length) of at least one slot."""
    B, T, H, K = qf.shape
    V = v.shape[3]
    o = np.full((B, T, H, V), np.nan, qf.dtype)
    lse = np.full((B, H, T), np.nan, qf.dtype)
    _build(K, V, qf.dtype.name)[0](qf, kf, v, lg, *cache, o, lse)
    return o, lse


def _attend_backward(qf, kf, v, lg, cache, o, lse, do):
    """The attention backward on the CPU: (dq, dk, dv [as q, k, v], column sums of ds [B, H, T], the cache's
    cotangents (dk, dv, dg))."""
    B, T, H, K = qf.shape
    V = v.shape[3]
    dt = qf.dtype
    Dt, live, col = (np.full((B, H, T), np.nan, dt) for _ in range(3))
    dq, dk, dv = (np.full(x.shape, np.nan, dt) for x in (qf, kf, v))
    dck, dcv, dcg = (np.full(x.shape, np.nan, dt) for x in cache[:3])
    _build(K, V, dt.name)[1](qf, kf, v, lg, *cache, o, lse, do, Dt, live, dq, dk, dv, col, dck, dcv, dcg)
    return dq, dk, dv, col, (dck, dcv, dcg)


def _is_device(x):
    """False: this module takes and returns numpy arrays."""
    del x
    return False


def _to_host(x):
    """``x`` as a numpy array (this module computes on numpy arrays)."""
    return np.asarray(x)


def _to_caller(x, device):
    """A numpy result, returned as it is."""
    return x


# ==== section: cuda_drivers ====
_SIGNATURES = {"forward_kernel": ("a4", "a4", "a4", "a3", "a4", "a4", "a3", "i1", "a4", "a3"),
               "backward_query_kernel": ("a4", "a4", "a4", "a3", "a4", "a4", "a3", "i1", "a4", "a3", "a4", "a3", "a3",
                                         "a4"),
               "backward_key_kernel": ("a4", "a4", "a4", "a3", "a4", "a4", "a3", "i1", "a3", "a4", "a3", "a3", "a4",
                                       "a4", "a3", "a4", "a4", "a3")}


@lru_cache(maxsize=None)
def _build(K, V, dtype_name):
    """The kernels for d_k = K, d_v = V, dtype "float32" | "float64" (sizes baked). One block per (batch, head);
    its threads take query rows (forward, dq) or key rows (dk, dv, cache) in a grid-stride loop. Each thread writes
    only its own rows and reads inputs: no shared memory, no barrier, no race."""
    dt = float64 if dtype_name == "float64" else float32
    ftype = np.float64 if dtype_name == "float64" else np.float32
    _query_row, _dq_row, _key_row, _slot_row = _make_rows(K, V, ftype, _jit)

    @cuda.jit
    def forward_kernel(q, k, v, lg, ck, cv, cg, clen, o, lse):
        T = q.shape[1]
        H = q.shape[2]
        b = cuda.blockIdx.x // H
        h = cuda.blockIdx.x % H
        acc = cuda.local.array((V,), dt)
        for t in range(cuda.threadIdx.x, T, cuda.blockDim.x):
            lse[b, h, t] = _query_row(q, k, v, lg, ck, cv, cg, clen[b], b, h, t, o[b, t, h], acc)

    @cuda.jit
    def backward_query_kernel(q, k, v, lg, ck, cv, cg, clen, o, lse, do, Dt, live, dq):
        T = q.shape[1]
        H = q.shape[2]
        b = cuda.blockIdx.x // H
        h = cuda.blockIdx.x % H
        for t in range(cuda.threadIdx.x, T, cuda.blockDim.x):
            lv = ftype(0)
            for c in range(V):
                if do[b, t, h, c] != 0:
                    lv = ftype(1)
            live[b, h, t] = lv
            if lv != 0:
                Dt[b, h, t] = _dq_row(q, k, v, lg, ck, cv, cg, clen[b], o, lse, do, b, h, t, dq[b, t, h])
            else:
                Dt[b, h, t] = ftype(0)
                for c in range(K):
                    dq[b, t, h, c] = ftype(0)

    @cuda.jit
    def backward_key_kernel(q, k, v, lg, ck, cv, cg, clen, lse, do, Dt, live, dk, dv, col, dck, dcv, dcg):
        T = q.shape[1]
        H = q.shape[2]
        N = ck.shape[2]
        b = cuda.blockIdx.x // H
        h = cuda.blockIdx.x % H
        for r in range(cuda.threadIdx.x, T + N, cuda.blockDim.x):
            if r < T:
                col[b, h, r] = _key_row(q, k, v, lg, lse, do, Dt, live, b, h, r, dk[b, r, h], dv[b, r, h])
            elif r - T < clen[b]:
                j = r - T
                dcg[b, h, j] = _slot_row(q, lg, ck, cv, cg, lse, do, Dt, live, b, h, j, dck[b, h, j], dcv[b, h, j])
            else:
                j = r - T
                dcg[b, h, j] = ftype(0)
                for c in range(K):
                    dck[b, h, j, c] = ftype(0)
                for c in range(V):
                    dcv[b, h, j, c] = ftype(0)

    return forward_kernel, backward_query_kernel, backward_key_kernel


def ptx_targets(d_k, d_v, dtype_name="float32"):
    """Every kernel as (name, python function, argument types) for ``cuda.compile_ptx`` (no GPU needed)."""
    dt = float64 if dtype_name == "float64" else float32
    kernels = dict(zip(_SIGNATURES, _build(d_k, d_v, dtype_name)))
    out = []
    for name, sig in _SIGNATURES.items():
        argtypes = tuple(types.Array(int32, 1, "C") if s == "i1" else types.Array(dt, int(s[1:]), "C") for s in sig)
        out.append((name, kernels[name].py_func, argtypes))
    return out


def _threads(n):
    """Threads per block for n rows (a multiple of 32 up to 128; rows beyond it in a grid-stride loop)."""
    return max(32, min(128, -(-n // 32) * 32))


def _attend(qf, kf, v, lg, cache):
    """The attention core on the GPU (numpy in, numpy out): (o [B, T, H, V], ℓ [B, H, T])."""
    B, T, H, K = qf.shape
    V = v.shape[3]
    dt = qf.dtype
    if T == 0:  # no token: no launch (zero-size device arrays)
        return np.zeros((B, 0, H, V), dt), np.zeros((B, H, 0), dt)
    dev = [cuda.to_device(np.ascontiguousarray(x)) for x in (qf, kf, v, lg) + tuple(cache)]
    o = cuda.to_device(np.full((B, T, H, V), np.nan, dt))
    lse = cuda.to_device(np.full((B, H, T), np.nan, dt))
    _build(K, V, dt.name)[0][B * H, _threads(T)](*dev, o, lse)
    return o.copy_to_host(), lse.copy_to_host()


def _attend_backward(qf, kf, v, lg, cache, o, lse, do):
    """The attention backward on the GPU (numpy in, numpy out), as the CPU module's: (dq, dk, dv, column sums of
    ds [B, H, T], the cache's cotangents (dk, dv, dg)). Two launches: query rows (dq, D_t), then key rows."""
    B, T, H, K = qf.shape
    V = v.shape[3]
    dt = qf.dtype
    N = cache[0].shape[2]
    if T == 0:  # no token: the cache gets no cotangent from the outputs
        z = np.zeros((B, H, 0), dt)
        return (np.zeros(qf.shape, dt), np.zeros(kf.shape, dt), np.zeros(v.shape, dt), z,
                tuple(np.zeros(x.shape, dt) for x in cache[:3]))
    args = [cuda.to_device(np.ascontiguousarray(x)) for x in (qf, kf, v, lg) + tuple(cache)]
    o_d, lse_d, do_d = (cuda.to_device(np.ascontiguousarray(x)) for x in (o, lse, do))
    Dt, live, col = (cuda.to_device(np.full((B, H, T), np.nan, dt)) for _ in range(3))
    dq, dk, dv = (cuda.to_device(np.full(x.shape, np.nan, dt)) for x in (qf, kf, v))
    dck, dcv, dcg = (cuda.to_device(np.full(x.shape, np.nan, dt)) for x in cache[:3])
    kernels = _build(K, V, dt.name)
    kernels[1][B * H, _threads(T)](*args, o_d, lse_d, do_d, Dt, live, dq)
    kernels[2][B * H, _threads(T + N)](*args, lse_d, do_d, Dt, live, dk, dv, col, dck, dcv, dcg)
    return (dq.copy_to_host(), dk.copy_to_host(), dv.copy_to_host(), col.copy_to_host(),
            (dck.copy_to_host(), dcv.copy_to_host(), dcg.copy_to_host()))


def _is_device(x):
    return hasattr(x, "copy_to_host") or hasattr(x, "__cuda_array_interface__")


def _to_host(x):
    """``x`` as a numpy array: device arrays are copied to the host (validation and the frame run on numpy)."""
    if hasattr(x, "copy_to_host"):
        return x.copy_to_host()
    if hasattr(x, "__cuda_array_interface__"):
        return cuda.as_cuda_array(x).copy_to_host()
    return np.asarray(x)


def _to_caller(x, device):
    """A numpy result, returned as a device array when the caller's q was one."""
    return cuda.to_device(x) if device else x


# ==== section: api ====
# ----------------------------------------------------------------------------------------------------
# Public API (docs/contract.md §11, kernel layers: the state is a KV cache), over numpy arrays.

class State(NamedTuple):
    """The KV cache of every (batch, head): the layer's whole memory (the layout of layer_jax.py's State).

    k: [B, H, N, K] -- the cached keys φ(k_i), slot i for the i-th token seen; slots ≥ length hold zeros.
    v: [B, H, N, V] -- the cached values.
    g: [B, H, N] -- log ω_{t,i} = Σ_{j=i+1}^{t} log α_j of each cached token relative to the newest token t (≤ 0;
        0 for the newest and for every token of a layer without a forget gate; 0 in empty slots).
    length: [B] int32 -- the number of filled slots (tokens seen); N is the capacity.
    """

    k: object
    v: object
    g: object
    length: object


_COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def init_params(num_heads, d_k, d_v, dtype=np.float32):
    """Initial parameters: none (kernel regression has no learned parameter of its own). Returns {}."""
    del num_heads, d_k, d_v, dtype
    return {}


def init_state(batch, num_heads, d_k, d_v, params, dtype=np.float32, capacity=0):
    """An empty KV cache (no token seen) with room for ``capacity`` tokens.

    Args:
        batch, num_heads, d_k, d_v: B, H, K, V.  params: the (empty) parameter dict, unused.
        dtype: float32 or float64, the dtype of k, v, g.  capacity: N, the number of slots (a non-negative Python
            int). ``forward`` appends its T tokens to the cache it is given (the final cache has N + T slots);
            ``step`` fills one free slot, so decoding n tokens after a prompt needs a first cache with capacity ≥ n.

    Returns:
        State(k [B, H, N, K], v [B, H, N, V], g [B, H, N], length [B] int32), numpy zeros.

    Raises:
        ValueError: capacity is not a non-negative int; dtype is not float32 / float64.
    """
    del params
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 0:
        raise ValueError(f"{SPEC_NAME}: capacity must be a non-negative Python int, got {capacity!r}")
    dt = np.dtype(dtype)
    if dt not in _COMPUTE_DTYPES:
        raise ValueError(f"{SPEC_NAME}: init_state dtype {dt} is not supported; use float32 or float64")
    return State(np.zeros((batch, num_heads, capacity, d_k), dt), np.zeros((batch, num_heads, capacity, d_v), dt),
                 np.zeros((batch, num_heads, capacity), dt), np.zeros((batch,), np.int32))


def _compute_dtype(q):
    """The compute dtype: q's dtype, which must be float32 or float64 (the documented dtype policy)."""
    dt = np.dtype(q.dtype)
    if dt not in _COMPUTE_DTYPES:
        raise ValueError(f"{SPEC_NAME}: q has dtype {dt}, but this layer computes in q's dtype, which must be "
                         f"float32 or float64; cast q first (e.g. q.astype(np.float32))")
    return dt


def _real(what, x, dt):
    """``x`` as a C-contiguous numpy array of the compute dtype ``dt``; it must hold real floating values."""
    x = _to_host(x)
    if not (x.dtype.kind == "f" or (x.dtype.kind == "V" and x.dtype.name.startswith(("bfloat", "float")))):
        raise ValueError(f"{SPEC_NAME}: {what} has dtype {x.dtype}; it must be a real floating array (it is "
                         f"cast to the compute dtype {dt}, q's dtype)")
    return np.ascontiguousarray(x, dtype=dt)


def _check_gate(name, x):
    """Refuse finite gate values outside the declared domain; non-finite values are left to the causality rule."""
    domain = INPUTS[name]["domain"]
    with np.errstate(invalid="ignore"):
        inside = (x <= 0) if domain == "nonpositive" else ((x > 0) & (x <= 1))
    bad = ~(inside | ~np.isfinite(x))
    if np.any(bad):
        raise ValueError(f"{SPEC_NAME}: input {name!r} has values outside its domain {domain!r} "
                         f"(e.g. {float(x[bad].ravel()[0])!r})")


def _prepare(q, k, v, params, inputs, lead):
    """Validate and convert forward's / step's arguments: (q, k, v, gate or None, dtype), numpy of q's dtype.

    Raises:
        ValueError: naming the argument (dtype, shape, params not an empty dict, missing / unknown inputs, a gate
            outside its domain).
    """
    q = _to_host(q)
    dt = _compute_dtype(q)
    q, k, v = (_real(n, x, dt) for n, x in (("q", q), ("k", k), ("v", v)))
    if q.ndim != lead + 1 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1] or v.ndim != q.ndim:
        want = "q, k [B, T, H, K] and v [B, T, H, V]" if lead == 3 else "q_t, k_t [B, H, K] and v_t [B, H, V]"
        raise ValueError(f"{SPEC_NAME}: expected {want} with equal leading axes; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if not isinstance(params, dict) or params:
        raise ValueError(f"{SPEC_NAME}: params must be an empty dict (this layer has no parameters), got {params!r}")
    if sorted(inputs) != sorted(_INPUT_NAMES):
        raise ValueError(f"{SPEC_NAME}: per-token inputs must be exactly {list(_INPUT_NAMES)}, got {sorted(inputs)}")
    gate = None
    for n in _INPUT_NAMES:
        if tuple(np.shape(inputs[n])) != q.shape[:-1]:
            raise ValueError(f"{SPEC_NAME}: input {n!r} must have shape {q.shape[:-1]} "
                             f"({', '.join(INPUTS[n]['shape'][3 - lead:])}), got {tuple(np.shape(inputs[n]))}")
        gate = _real(f"input {n!r}", inputs[n], dt)
        _check_gate(n, gate)
    return q, k, v, gate, dt


def _scale_value(scale, K):
    """The kernel's temperature of a call: ``scale``, or DEFAULT_SCALE when None ("inverse_sqrt_dk" = K ** -0.5).

    Raises:
        ValueError: ``scale`` is not a finite real number (or None).
    """
    if scale is None:
        scale = DEFAULT_SCALE
    if isinstance(scale, str) and scale == "inverse_sqrt_dk":
        return float(K) ** -0.5
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)) \
            or not math.isfinite(scale):
        raise ValueError(f"{SPEC_NAME}: scale must be a finite real number or None, got {scale!r}")
    return float(scale)


def _frame(q, k, gate, scale, lead=3):
    """What the attention core reads: (scale · φ(q), φ(k), log α [.., T, H] (zeros without a gate), scale)."""
    sc = _scale_value(scale, q.shape[-1])
    qf, kf = _phi(q), _phi(k)
    if sc != 1.0:
        qf = qf * q.dtype.type(sc)
    if gate is None:
        lg = np.zeros(q.shape[:-1], q.dtype)
    elif _GATE_LOG:
        lg = gate
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            lg = np.log(gate)
    return np.ascontiguousarray(qf), np.ascontiguousarray(kf), np.ascontiguousarray(lg), sc


def _state_in(state, B, H, K, V, dt, what="initial_state"):
    """The caller's KV cache as a State of numpy arrays (k, v, g in ``dt``, length int32) after checking it.

    Raises:
        ValueError: not a 4-field State; a field of the wrong shape or dtype; a length outside [0, capacity].
    """
    if not isinstance(state, (tuple, list)) or len(state) != len(State._fields):
        raise ValueError(f"{SPEC_NAME}: {what} must be a State{State._fields} (a KV cache from init_state, "
                         f"forward or step), got {type(state).__name__}")
    k, v, g = (_real(f"{what}.{n}", x, dt) for n, x in zip(State._fields[:3], state[:3]))
    length = _to_host(state[3])
    N = k.shape[2] if k.ndim == 4 else -1
    for name, x, want in (("k", k, (B, H, N, K)), ("v", v, (B, H, N, V)), ("g", g, (B, H, N)),
                          ("length", length, (B,))):
        if x.shape != want or N < 0:
            raise ValueError(f"{SPEC_NAME}: {what}.{name} must have shape {want} (B, H, capacity N, ...), "
                             f"got {x.shape}")
    if length.dtype.kind not in "iu":
        raise ValueError(f"{SPEC_NAME}: {what}.length must be an integer array [B], got {length.dtype}")
    if np.any((length < 0) | (length > N)):
        raise ValueError(f"{SPEC_NAME}: {what}.length must lie in [0, capacity {N}], got {length}")
    return State(k, v, g, np.ascontiguousarray(length, np.int32))


def _core_cache(st):
    """The cache as the kernels read it: (k, v, g, length) with at least one slot (a zero-capacity cache gets one
    empty slot, never read)."""
    if st.k.shape[2] > 0:
        return st.k, st.v, st.g, st.length
    B, H, _, K = st.k.shape
    z = lambda *s: np.zeros(s, st.k.dtype)  # noqa: E731
    return z(B, H, 1, K), z(B, H, 1, st.v.shape[3]), z(B, H, 1), st.length


def _suffix(lg):
    """Σ_{j=i+1}^{T−1} lg_j for every i, [B, T, H] (a reverse running sum: no difference of cumulative sums)."""
    out = np.zeros_like(lg)
    if lg.shape[1] > 1:
        out[:, :-1] = np.cumsum(lg[:, :0:-1], axis=1)[:, ::-1]
    return out


def _final_state(kf, v, lg, st):
    """The cache after the call's T tokens: capacity N + T, the tokens in slots length .. length + T − 1, every log
    weight relative to the call's last token (old slots: g + Σ_j lg_j; token i: Σ_{j>i} lg_j)."""
    B, T, H, K = kf.shape
    N = st.k.shape[2]
    total = np.sum(lg, axis=1) if T else np.zeros((B, H), lg.dtype)  # [B, H]
    old = np.arange(N)[None, None, :] < st.length[:, None, None]
    g_old = np.where(old, st.g + total[:, :, None], 0).astype(kf.dtype)
    k = np.concatenate([st.k, np.zeros((B, H, T, K), kf.dtype)], axis=2)
    v2 = np.concatenate([st.v, np.zeros((B, H, T, v.shape[3]), kf.dtype)], axis=2)
    g = np.concatenate([g_old, np.zeros((B, H, T), kf.dtype)], axis=2)
    suf = _suffix(lg)
    for b in range(B):
        n = int(st.length[b])
        k[b, :, n:n + T] = kf[b].transpose(1, 0, 2)
        v2[b, :, n:n + T] = v[b].transpose(1, 0, 2)
        g[b, :, n:n + T] = suf[b].T
    return State(k, v2, g, (st.length + T).astype(np.int32))


def forward(q, k, v, params, *, initial_state=None, output_final_state=False, form="recurrent", scale=None,
            cu_seqlens=None, **inputs):
    """Run the layer over a sequence: o_t = Σ_{i≤t} κ_{t,i} v_i / Σ_{i≤t} κ_{t,i} over the cache and the tokens.

    Args:
        q: [B, T, H, K] queries, float32 or float64: q's dtype is the compute dtype.
        k: [B, T, H, K] keys.  v: [B, T, H, V] values.  Real floating, cast to q's dtype.
        params: {} (no parameters).
        initial_state: a State (KV cache, see State), or None for an empty one.
        output_final_state: also return the cache after the last token (capacity N + T, length + T filled).
        form: "recurrent" (the online softmax of every query over the cache and the tokens ≤ t; it equals the
            "recurrent" and "chunked" forms of layer_jax.py to round-off).
        scale: the kernel's temperature (q ← scale · φ(q)); None for DEFAULT_SCALE.
        cu_seqlens: None, or integer offsets [S + 1] (fla's convention, 0 = cu[0] < … < cu[S] = T) of S sequences
            packed into one row (B = 1): each attends only over its own tokens and its own initial cache
            (initial_state with leading axis S); the final cache has leading axis S and capacity N + T, sequence s's
            tokens in slots length_s .. length_s + T_s − 1.
        **inputs: the forget gate (see INPUTS), [B, T, H], in the space INPUTS states.

    Returns:
        (o [B, T, H, V], final State or None), of q's dtype (length int32).

    Causal for any input: o[:, t] depends on positions ≤ t only, also when a later position holds NaN or ±inf.

    Raises:
        ValueError: unknown form; q not float32/float64; k, v, an input or a state field not real floating;
            inconsistent shapes; non-empty params; missing or unknown inputs; a gate outside its domain; a bad
            scale; a malformed initial state; with cu_seqlens: B ≠ 1 or offsets not 0 = cu[0] < … < cu[S] = T.
    """
    if form not in FORMS:
        raise ValueError(f"{SPEC_NAME}: unknown form {form!r}; this backend offers {FORMS}")
    if cu_seqlens is not None:
        return _varlen_forward(q, k, v, params, initial_state, output_final_state, scale, cu_seqlens, inputs)
    device = _is_device(q)
    q, k, v, gate, dt = _prepare(q, k, v, params, inputs, 3)
    B, T, H, K = q.shape
    V = v.shape[3]
    st = init_state(B, H, K, V, params, dt) if initial_state is None else _state_in(initial_state, B, H, K, V, dt)
    qf, kf, lg, _ = _frame(q, k, gate, scale)
    o, _ = _attend(qf, kf, v, lg, _core_cache(st))
    final = _final_state(kf, v, lg, st) if output_final_state else None
    return _to_caller(o, device), (None if final is None else State(*(_to_caller(x, device) for x in final)))


def step(state, q_t, k_t, v_t, params, *, scale=None, **inputs_t):
    """Decode one token: write it into the cache's next free slot and attend over the cache.

    Args:
        state: State (KV cache) with a free slot (length < capacity N; see init_state's capacity).
        q_t: [B, H, K], float32 or float64 (the compute dtype).  k_t: [B, H, K].  v_t: [B, H, V].
        params: {}.  scale: as in forward.  **inputs_t: the forget gate, [B, H].

    Returns:
        (o_t [B, H, V], new State of the same capacity, length + 1), of q_t's dtype.

    Raises:
        ValueError: as forward; a full cache (length = N).
    """
    device = _is_device(q_t)
    q_t, k_t, v_t, gate, dt = _prepare(q_t, k_t, v_t, params, inputs_t, 2)
    B, H, K = q_t.shape
    V = v_t.shape[2]
    st = _state_in(state, B, H, K, V, dt, "state")
    N = st.k.shape[2]
    if np.any(st.length >= N):
        raise ValueError(f"{SPEC_NAME}: the KV cache is full (capacity {N}); start from init_state(..., capacity=N) "
                         "with N ≥ the tokens to decode, passed to forward as initial_state")
    qf, kf, lg, _ = _frame(q_t[:, None], k_t[:, None], None if gate is None else gate[:, None], scale)
    o, _ = _attend(qf, kf, v_t[:, None], lg, _core_cache(st))
    old = np.arange(N)[None, None, :] < st.length[:, None, None]
    kc, vc = st.k.copy(), st.v.copy()
    gc = np.where(old, st.g + lg[:, 0, :, None], 0).astype(dt)
    for b in range(B):
        n = int(st.length[b])
        kc[b, :, n] = kf[b, 0]
        vc[b, :, n] = v_t[b]
    new = State(kc, vc, gc, (st.length + 1).astype(np.int32))
    return _to_caller(o[:, 0], device), State(*(_to_caller(x, device) for x in new))


def backward(q, k, v, params, do, *, initial_state=None, dfinal_state=None, scale=None, cu_seqlens=None, **inputs):
    """Vector-Jacobian product of :func:`forward`: the standard attention backward (probabilities recomputed from
    the log-sum-exp ℓ_t of a forward run; Dao et al. 2022, Alg. 4), then the chain rule through the frame.

    Args:
        q, k, v, params, initial_state, scale, cu_seqlens, **inputs: as for :func:`forward`.
        do: [B, T, H, V] cotangent of o.  dfinal_state: a State of cotangents of the final cache (capacity N + T;
            its length field is ignored), or None (zeros).

    Returns:
        dict with dq, dk [B, T, H, K], dv [B, T, H, V], d<gate> [B, T, H] (in the gate's own space: dg for a
        log-space gate g), dinitial_state (a State: cotangents of k, v, g of the initial cache -- zero-capacity for
        initial_state None -- and length zeros); all of q's dtype (length int32).

    A position whose output cotangent is zero contributes exact zeros, so gradients at t < s stay finite when a
    position s with zero cotangent holds NaN or ±inf (docs/contract.md §5).

    Raises:
        ValueError: as :func:`forward`; do or dfinal_state of the wrong shape or not real floating.
    """
    if cu_seqlens is not None:
        return _varlen_backward(q, k, v, params, do, initial_state, dfinal_state, scale, cu_seqlens, inputs)
    device = _is_device(q)
    q, k, v, gate, dt = _prepare(q, k, v, params, inputs, 3)
    B, T, H, K = q.shape
    V = v.shape[3]
    st = init_state(B, H, K, V, params, dt) if initial_state is None else _state_in(initial_state, B, H, K, V, dt)
    N = st.k.shape[2]
    do = _real("do", do, dt)
    if do.shape != v.shape:
        raise ValueError(f"{SPEC_NAME}: do must have shape {v.shape}, got {do.shape}")
    qf, kf, lg, sc = _frame(q, k, gate, scale)
    cache = _core_cache(st)
    o, lse = _attend(qf, kf, v, lg, cache)
    dqf, dkf, dv, col, (dck, dcv, dcg) = _attend_backward(qf, kf, v, lg, cache, o, lse, do)
    dck, dcv, dcg = dck[:, :, :N], dcv[:, :, :N], dcg[:, :, :N]
    # d lg_j = Σ over queries t ≥ j of Σ_{keys before j} ds_{t,key} = −Σ_{i≥j} col_i (each row of ds sums to 0)
    dlg = -np.cumsum(col[:, :, ::-1], axis=2)[:, :, ::-1].transpose(0, 2, 1)
    if dfinal_state is not None:
        fin = _state_in(tuple(dfinal_state[:3]) + (st.length + T,), B, H, K, V, dt, "dfinal_state")
        if fin.k.shape[2] != N + T:
            raise ValueError(f"{SPEC_NAME}: dfinal_state must have capacity N + T = {N + T} (the final cache's), "
                             f"got {fin.k.shape[2]}")
        old = np.arange(N)[None, None, :] < st.length[:, None, None]
        kept = (np.arange(N)[None, None, :] >= st.length[:, None, None] + T)  # empty slots past the new tokens
        keep = old | kept
        dck = dck + np.where(keep[..., None], fin.k[:, :, :N], 0)
        dcv = dcv + np.where(keep[..., None], fin.v[:, :, :N], 0)
        dcg = dcg + np.where(old, fin.g[:, :, :N], 0)
        dlg = dlg + np.sum(np.where(old, fin.g[:, :, :N], 0), axis=2)[:, None, :]
        for b in range(B):
            n = int(st.length[b])
            dkf[b] += fin.k[b, :, n:n + T].transpose(1, 0, 2)
            dv[b] += fin.v[b, :, n:n + T].transpose(1, 0, 2)
            gn = fin.g[b, :, n:n + T]  # [H, T]: token i's weight Σ_{j>i} lg_j → d lg_j += Σ_{i<j} gn_i
            dlg[b, 1:] += np.cumsum(gn, axis=1)[:, :-1].T
    dq = _phi_vjp(q, dqf * dt.type(sc) if sc != 1.0 else dqf)
    dk = _phi_vjp(k, dkf)
    out = {"dq": dq, "dk": dk, "dv": dv,
           "dinitial_state": State(dck, dcv, dcg, np.zeros((B,), np.int32))}
    if _INPUT_NAMES:
        if _GATE_LOG:
            dg = dlg
        else:  # lg = log α: dα = d lg / α (exact zeros kept)
            with np.errstate(divide="ignore", invalid="ignore"):
                dg = np.where(dlg == 0, dt.type(0), dlg / gate)
        out["d" + _INPUT_NAMES[0]] = np.ascontiguousarray(dg, dt)
    return {n: (State(*(_to_caller(x, device) for x in d)) if n == "dinitial_state" else _to_caller(d, device))
            for n, d in out.items()}


# ----------------------------------------------------------------------------------------------------
# Variable-length batches (cu_seqlens, fla's convention): the kernels run once per sequence.

def _varlen_spans(cu_seqlens, q, initial_state):
    """The (start, end) token range of each of the S sequences packed into q [1, T, H, K].

    Raises:
        ValueError: B ≠ 1; cu_seqlens not a 1-D integer array [S + 1] (S ≥ 1) with 0 = cu[0] < … < cu[S] = T;
            an initial_state field whose leading axis is not S.
    """
    shape = tuple(np.shape(q)) if not hasattr(q, "shape") else tuple(q.shape)
    if len(shape) != 4 or shape[0] != 1:
        raise ValueError(f"{SPEC_NAME}: with cu_seqlens the batch must hold one packed row (B = 1, q [1, T, H, K]); "
                         f"got q of shape {shape}")
    cu = _to_host(cu_seqlens)
    if cu.ndim != 1 or cu.shape[0] < 2 or cu.dtype.kind not in "iu":
        raise ValueError(f"{SPEC_NAME}: cu_seqlens must be a 1-D integer array [S + 1] of sequence offsets (S ≥ 1), "
                         f"got shape {cu.shape} and dtype {cu.dtype}")
    offsets = [int(x) for x in cu]
    if offsets[0] != 0 or offsets[-1] != shape[1]:
        raise ValueError(f"{SPEC_NAME}: cu_seqlens must start at 0 and end at T = {shape[1]}; "
                         f"got {offsets[0]} … {offsets[-1]}")
    if any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{SPEC_NAME}: cu_seqlens must increase strictly (no empty sequence); got {offsets}")
    S = len(offsets) - 1
    if initial_state is not None:
        for n, x in zip(State._fields, initial_state):
            if tuple(np.shape(_to_host(x)))[:1] != (S,):
                raise ValueError(f"{SPEC_NAME}: with cu_seqlens the leading axis of initial_state.{n} is S = {S} "
                                 f"(one cache per sequence), got shape {tuple(np.shape(_to_host(x)))}")
    return list(zip(offsets, offsets[1:]))


def _varlen_forward(q, k, v, params, initial_state, output_final_state, scale, cu_seqlens, inputs):
    """forward over S packed sequences: one call per sequence; outputs concatenated along T, final caches (padded
    to capacity N + T) along the leading axis S."""
    spans = _varlen_spans(cu_seqlens, q, initial_state)
    device = _is_device(q)
    q, k, v = (_to_host(x) for x in (q, k, v))
    ins = {n: _to_host(x) for n, x in inputs.items()}
    st0 = None if initial_state is None else State(*(_to_host(x) for x in initial_state))
    os, finals = [], []
    for n, (s, e) in enumerate(spans):
        st = None if st0 is None else State(*(x[n:n + 1] for x in st0))
        o, fin = forward(q[:, s:e], k[:, s:e], v[:, s:e], params, initial_state=st, output_final_state=True,
                         scale=scale, **{m: x[:, s:e] for m, x in ins.items()})
        os.append(o)
        finals.append(fin)
    o = np.concatenate(os, axis=1)
    cap = (0 if st0 is None else st0.k.shape[2]) + q.shape[1]
    pad = lambda x: np.concatenate([x, np.zeros(x.shape[:2] + (cap - x.shape[2],) + x.shape[3:], x.dtype)], axis=2)  # noqa: E731
    final = State(*(np.concatenate([pad(f[i]) for f in finals], axis=0) for i in range(3)),
                  np.concatenate([f.length for f in finals]))
    return _to_caller(o, device), (State(*(_to_caller(x, device) for x in final)) if output_final_state else None)


def _varlen_backward(q, k, v, params, do, initial_state, dfinal_state, scale, cu_seqlens, inputs):
    """backward over S packed sequences: one call per sequence (dfinal_state of capacity N + T cut to each
    sequence's N + T_s); token gradients concatenated along T, the initial caches' along S."""
    spans = _varlen_spans(cu_seqlens, q, initial_state)
    device = _is_device(q)
    q, k, v, do = (_to_host(x) for x in (q, k, v, do))
    ins = {n: _to_host(x) for n, x in inputs.items()}
    st0 = None if initial_state is None else State(*(_to_host(x) for x in initial_state))
    dfin = None if dfinal_state is None else tuple(_to_host(x) for x in dfinal_state)
    N = 0 if st0 is None else st0.k.shape[2]
    parts = []
    for n, (s, e) in enumerate(spans):
        st = None if st0 is None else State(*(x[n:n + 1] for x in st0))
        df = None if dfin is None else tuple(x[n:n + 1, :, :N + e - s] for x in dfin[:3]) + (None,)
        parts.append(backward(q[:, s:e], k[:, s:e], v[:, s:e], params, do[:, s:e], initial_state=st,
                              dfinal_state=df, scale=scale, **{m: x[:, s:e] for m, x in ins.items()}))
    out = {}
    for key in parts[0]:
        if key == "dinitial_state":
            out[key] = State(*(_to_caller(np.concatenate(f, axis=0), device) for f in zip(*(p[key] for p in parts))))
        else:
            out[key] = _to_caller(np.concatenate([p[key] for p in parts], axis=1), device)
    return out

"""Template of the fixed frame of a generated kernel-regression ``layer_jax.py`` (softmax / forgetting attention).

Read as text by :mod:`mesagen.backends.jax_kernel` (see :mod:`mesagen.backends.templates` for the section and
placeholder rules); never imported by generated code. The names below stand for what the generated module defines
before the frame, so that the body lints as a module.

Math (docs/family.md §9): per head, o_t = Σ_{i≤t} κ_{t,i} v_i / Σ_{i≤t} κ_{t,i} with
κ_{t,i} = exp(scale · φ(k_i)ᵀφ(q_t) + G_t − G_i), G the cumulative log forget gate (G ≡ 0 without a gate);
every form subtracts the maximum logit before the exponential.
"""
# flake8: noqa
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

SPEC_NAME: str = ""
PARAMS: dict = {}
INPUTS: dict = {}
FORMS: tuple = ()
DEFAULT_SCALE: Any = 1.0
_INPUT_NAMES: tuple = ()
_INPUT_NEUTRAL: tuple = ()
_GATE_LOG: Any = None
_features: Any = None
_varlen_lengths: Any = None  # the cu_seqlens helpers: section "varlen" of templates/jax_layer.py, printed before
_varlen_pack: Any = None     # forward (shared with the linear-model layers)
_varlen_unpack: Any = None

# ==== template body ====
# ==== section: frame ====
class State(NamedTuple):
    """The KV cache of every (batch, head): the layer's whole memory (see docs/contract.md, kernel layers).

    k: [B, H, N, K] -- the cached keys φ(k_i), slot i for the i-th token seen; slots ≥ length hold zeros.
    v: [B, H, N, V] -- the cached values.
    g: [B, H, N] -- log ω_{t,i} = Σ_{j=i+1}^{t} log α_j of each cached token relative to the newest token t (≤ 0;
        0 for the newest and for every token of a layer without a forget gate; 0 in empty slots).
    length: [B] int32 -- the number of filled slots (tokens seen); N is the capacity.
    """

    k: jax.Array
    v: jax.Array
    g: jax.Array
    length: jax.Array


def init_params(num_heads, d_k, d_v, dtype=jnp.float32):
    """Initial parameters: none (kernel regression has no learned parameter of its own).

    Args:
        num_heads, d_k, d_v: H, K, V (unused).  dtype: array dtype (unused).

    Returns:
        An empty dict.
    """
    del num_heads, d_k, d_v, dtype
    return {}


def init_state(batch, num_heads, d_k, d_v, params, dtype=jnp.float32, capacity=0):
    """An empty KV cache (no token seen) with room for ``capacity`` tokens.

    Args:
        batch, num_heads, d_k, d_v: B, H, K, V.  params: the (empty) parameter dict, unused.
        dtype: dtype of k, v, g.  capacity: N, the number of slots (a non-negative Python int). ``forward``
            appends its T tokens to the cache it is given (the final cache has N + T slots); ``step`` fills one
            free slot, so decoding n tokens after a prompt needs a first cache with capacity ≥ n.

    Returns:
        State(k [B, H, N, K], v [B, H, N, V], g [B, H, N], length [B] int32), all zeros.

    Raises:
        ValueError: capacity is not a non-negative int.
    """
    del params
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"{SPEC_NAME}: capacity must be a non-negative Python int, got {capacity!r}")
    return State(jnp.zeros((batch, num_heads, capacity, d_k), dtype), jnp.zeros((batch, num_heads, capacity, d_v), dtype),
                 jnp.zeros((batch, num_heads, capacity), dtype), jnp.zeros((batch,), jnp.int32))


# ----------------------------------------------------------------------------------------------------
# The attention core (per (batch, head), vectorised over both).

def _log_gates(inputs, B, T, H, dtype):
    """log α [B, T, H] of the forget gate (0 without one; log-space gates as given, linear-space ones logged)."""
    if not inputs:
        return jnp.zeros((B, T, H), dtype)
    return inputs[0] if _GATE_LOG else jnp.log(inputs[0])


def _tokens(q, k, inputs, scale, live):
    """What the attention reads of the call's tokens: scale · φ(q), φ(k) [B, T, H, K] and log α [B, T, H].

    With ``live`` ([B, T] bool, the cu_seqlens padding mask, see _varlen_pack; None: every token is real) the
    keys of padding tokens are set to 0 *after* φ and their log gates to 0, so that a padding token adds nothing
    to the final cache and decays nothing, whatever gate value it carries.
    """
    B, T, H, _ = q.shape
    q, k = scale * _features(q), _features(k)
    lg = _log_gates(inputs, B, T, H, q.dtype)
    if live is not None:
        k = jnp.where(live[:, :, None, None], k, 0)
        lg = jnp.where(live[:, :, None], lg, 0)
    return q, k, lg


def _keys(k, v, state, lg, live=None):
    """The key sequence a forward call attends over: the cache's N slots, then the call's T tokens.

    ``live`` ([B, T] bool or None): the real tokens of a cu_seqlens batch; a padding token is no key (its logit
    is −inf for every query, so it gets weight exactly 0). The padding follows a row's real tokens, so causality
    alone already hides it from them; the mask also keeps it out of the (discarded) padding queries' rows.

    Returns:
        keys [B, H, N+T, K], values [B, H, N+T, V], Gk [B, H, N+T], key_time [N+T], key_valid [B, N+T], Gq
        [B, H, T], with log-decay(t, key) = Gq[t] − Gk[key] and key usable by query t iff key_valid and
        key_time ≤ t. Gq = G_t (cumulative log gate of the call, inclusive); Gk = −g (cache) or G_i (tokens).
    """
    N, T = state.k.shape[2], k.shape[1]
    G = jnp.cumsum(jnp.swapaxes(lg, 1, 2), axis=-1)  # [B, H, T]
    keys = jnp.concatenate([state.k, jnp.swapaxes(k, 1, 2)], axis=2)
    vals = jnp.concatenate([state.v, jnp.swapaxes(v, 1, 2)], axis=2)
    Gk = jnp.concatenate([-state.g, G], axis=2)
    key_time = jnp.concatenate([jnp.full((N,), -1, jnp.int32), jnp.arange(T, dtype=jnp.int32)])
    key_valid = jnp.concatenate([jnp.arange(N)[None, :] < state.length[:, None],
                                 jnp.ones((k.shape[0], T), bool) if live is None else live], axis=1)
    return keys, vals, Gk, key_time, key_valid, G


def _final_state(k, v, state, G, live=None):
    """The cache after the call's T tokens: capacity N + T, the tokens in slots length .. length + T − 1, every log
    weight made relative to the call's last token (old slots: g + G_T; token i: G_T − G_i).

    With ``live`` ([B, T] bool, cu_seqlens padding at the end of each row) only the row's n_b real tokens are
    stored, in slots length .. length + n_b − 1 (every other slot is as a call on the n_b tokens alone leaves it)
    and length grows by n_b; G_T is then the log gate at the row's last real token, as padding tokens decay
    nothing (_tokens)."""
    T = k.shape[1]
    GT = G[..., -1:]  # [B, H, 1]
    count = T if live is None else jnp.sum(live, axis=1, dtype=jnp.int32)
    old_valid = jnp.arange(state.k.shape[2])[None, None, :] < state.length[:, None, None]
    g_old = jnp.where(old_valid, state.g + GT, 0)
    slot = jnp.arange(state.k.shape[2] + T)[None, :]
    mine = (slot >= state.length[:, None]) & (slot < (state.length + count)[:, None])  # [B, N + T]: real tokens' slots

    def place(cache, new):  # cache [B, H, N, ...], new [B, H, T, ...] → [B, H, N + T, ...]
        big = jnp.concatenate([cache, jnp.zeros(cache.shape[:2] + (T,) + cache.shape[3:], cache.dtype)], axis=2)
        out = jax.vmap(lambda c, x, n: lax.dynamic_update_slice_in_dim(c, x, n, axis=1))(big, new, state.length)
        if live is None:
            return out
        return jnp.where(mine.reshape(mine.shape[:1] + (1,) + mine.shape[1:] + (1,) * (big.ndim - 3)), out, big)

    return State(place(state.k, jnp.swapaxes(k, 1, 2)), place(state.v, jnp.swapaxes(v, 1, 2)),
                 place(g_old, GT - G), state.length + count)


def _forward_recurrent(q, k, v, state, inputs, scale, live=None):
    """Exact masked attention: all T × (N + T) logits at once, the row maximum subtracted, explicitly normalised.
    O(T · (N + T) · (K + V)) work and O(T · (N + T)) memory per head. ``live``: the cu_seqlens padding mask
    ([B, T] bool or None); padding keys are masked to −inf before the maximum and the exp."""
    T = q.shape[1]
    q, k, lg = _tokens(q, k, inputs, scale, live)
    keys, vals, Gk, key_time, key_valid, G = _keys(k, v, state, lg, live)
    logits = jnp.einsum("bthk,bhnk->bhtn", q, keys) + G[..., :, None] - Gk[..., None, :]
    mask = key_valid[:, None, None, :] & (key_time[None, None, None, :] <= jnp.arange(T)[None, None, :, None])
    logits = jnp.where(mask, logits, -jnp.inf)
    m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # finite: token t always sees itself
    p = jnp.where(mask, jnp.exp(logits - m), 0)
    o = jnp.einsum("bhtn,bhnv->bthv", p, vals) / jnp.swapaxes(jnp.sum(p, axis=-1), 1, 2)[..., None]
    return o, _final_state(k, v, state, G, live)


def _forward_chunked(q, k, v, state, inputs, scale, chunk_size, live=None):
    """Blockwise online softmax (flash-style): the keys (cache, then tokens) in blocks of ``chunk_size``, scanned
    with a running maximum m, normaliser ℓ and accumulator per query; every exponential is of a logit minus the
    running maximum. O(T · C) logits live at a time; the scan body is rematerialised (jax.checkpoint) in the
    backward pass, so no T × (N + T) array is stored. ``live``: the cu_seqlens padding mask ([B, T] bool or
    None); padding keys are masked to −inf in their block before the running maximum and the exp."""
    B, T, H, _ = q.shape
    V = v.shape[-1]
    q, k, lg = _tokens(q, k, inputs, scale, live)
    keys, vals, Gk, key_time, key_valid, G = _keys(k, v, state, lg, live)
    L = keys.shape[2]
    C = min(chunk_size, L)
    nb = -(-L // C)
    pad = nb * C - L
    keys = jnp.pad(keys, ((0, 0), (0, 0), (0, pad), (0, 0)))
    vals = jnp.pad(vals, ((0, 0), (0, 0), (0, pad), (0, 0)))
    Gk = jnp.pad(Gk, ((0, 0), (0, 0), (0, pad)))
    key_time = jnp.pad(key_time, (0, pad), constant_values=T)  # padding: never ≤ t
    key_valid = jnp.pad(key_valid, ((0, 0), (0, pad)))
    blocks = (keys.reshape(B, H, nb, C, -1).transpose(2, 0, 1, 3, 4), vals.reshape(B, H, nb, C, V).transpose(2, 0, 1, 3, 4),
              Gk.reshape(B, H, nb, C).transpose(2, 0, 1, 3), key_time.reshape(nb, C),
              key_valid.reshape(B, nb, C).transpose(1, 0, 2))
    qh = jnp.swapaxes(q, 1, 2)  # [B, H, T, K]
    t_idx = jnp.arange(T)

    @jax.checkpoint
    def body(carry, blk):
        m, ell, acc = carry
        kb, vb, gb, tb, ok = blk
        logits = jnp.einsum("bhtk,bhck->bhtc", qh, kb) + G[..., :, None] - gb[..., None, :]
        mask = ok[:, None, None, :] & (tb[None, None, None, :] <= t_idx[None, None, :, None])
        logits = jnp.where(mask, logits, -jnp.inf)
        m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(logits, axis=-1)))
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0)
        p = jnp.where(mask, jnp.exp(logits - shift[..., None]), 0)
        corr = jnp.exp(m - shift)  # 0 while m = −inf (nothing seen yet)
        return (m_new, ell * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + jnp.einsum("bhtc,bhcv->bhtv", p, vb)), None

    init = (jnp.full((B, H, T), -jnp.inf, q.dtype), jnp.zeros((B, H, T), q.dtype), jnp.zeros((B, H, T, V), q.dtype))
    (_, ell, acc), _ = lax.scan(body, init, blocks)
    o = jnp.swapaxes(acc / ell[..., None], 1, 2)
    return o, _final_state(k, v, state, G, live)


_CHUNKED_IMPLS = {}


def _chunked_impl(chunk_size):
    """The chunked form with a fixed chunk size as an ``impl`` of _causal_forward, jitted, one per size."""
    if chunk_size not in _CHUNKED_IMPLS:
        _CHUNKED_IMPLS[chunk_size] = jax.jit(
            lambda q, k, v, state, inputs, scale, live=None: _forward_chunked(q, k, v, state, inputs, scale,
                                                                              chunk_size, live))
    return _CHUNKED_IMPLS[chunk_size]


def _step_core(state, q_t, k_t, v_t, lg_t):
    """One token into the cache (slot ``length``) and its answer; q_t already scaled, q_t and k_t already φ-mapped.
    Shapes: q_t, k_t [B, H, K]; v_t [B, H, V]; lg_t [B, H] (log α). A full cache (length = N) gives NaN outputs."""
    N = state.k.shape[2]
    slot = jnp.arange(N)[None, :] == state.length[:, None]  # [B, N]
    valid = jnp.arange(N)[None, :] <= state.length[:, None]
    old = jnp.arange(N)[None, :] < state.length[:, None]
    kc = jnp.where(slot[:, None, :, None], k_t[:, :, None, :], state.k)
    vc = jnp.where(slot[:, None, :, None], v_t[:, :, None, :], state.v)
    gc = jnp.where(old[:, None, :], state.g + lg_t[..., None], 0)
    logits = jnp.einsum("bhk,bhnk->bhn", q_t, kc) + gc
    logits = jnp.where(valid[:, None, :], logits, -jnp.inf)
    m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0)
    p = jnp.where(valid[:, None, :], jnp.exp(logits - m), 0)
    o = jnp.einsum("bhn,bhnv->bhv", p, vc) / jnp.sum(p, axis=-1)[..., None]
    o = jnp.where((state.length < N)[:, None, None], o, jnp.nan)
    return o, State(kc, vc, gc, jnp.minimum(state.length + 1, N).astype(state.length.dtype))


def _step_batched(state, q_t, k_t, v_t, inputs_t):
    """step's jitted body (q_t scaled and φ-mapped, k_t φ-mapped)."""
    B, H = q_t.shape[:2]
    lg = _log_gates(tuple(x[:, None] for x in inputs_t), B, 1, H, q_t.dtype)[:, 0]
    return _step_core(state, q_t, k_t, v_t, lg)


def _values(q, k, v, state, inputs, scale, live=None):
    """Token by token with step's update (values only): (o [B, T, H, V], final State of capacity N + T). Causal
    for any input: position t reads only the cache and the tokens ≤ t. ``live`` ([B, T] bool or None, the
    cu_seqlens padding mask): a padding token leaves the cache as it was (its output is discarded)."""
    T = q.shape[1]
    q, k, lg = _tokens(q, k, inputs, scale, live)
    grow = lambda x: jnp.concatenate([x, jnp.zeros(x.shape[:2] + (T,) + x.shape[3:], x.dtype)], axis=2)  # noqa: E731
    big = State(grow(state.k), grow(state.v), grow(state.g), state.length)
    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v, lg))
    if live is None:
        final, o = lax.scan(lambda s, x: _step_core(s, *x)[::-1], big, xs)
    else:
        def body(s, x):
            o_t, new = _step_core(s, *x[:-1])
            keep = x[-1]  # [B]: this token is real
            return State(*(jnp.where(keep.reshape((-1,) + (1,) * (n.ndim - 1)), n, c) for n, c in zip(new, s))), o_t

        final, o = lax.scan(body, big, xs + (jnp.swapaxes(live, 0, 1),))
    return jnp.swapaxes(o, 0, 1), final


def _causal_forward(impl, q, k, v, state, inputs, scale, live=None):
    """``impl(q, k, v, state, inputs, scale, live)`` whose outputs and gradients stay causal for non-finite inputs.
    ``live`` ([B, T] bool or None) marks the real tokens of a cu_seqlens batch (see _varlen_pack).

    A NaN value at position s would reach every output through the masked weights (0 · NaN), and autodiff would
    multiply zero cotangents by non-finite primals. Here ``impl`` runs on the inputs with non-finite entries
    replaced by finite stand-ins (0 for q, k, v; _INPUT_NEUTRAL for the gate), and wherever the token-by-token
    computation on the inputs as given (``_values``, stop_gradient) is non-finite, that value is taken. Finite
    inputs skip ``_values`` (lax.cond). Result: o[:, t] and its gradients depend only on positions ≤ t.
    """
    xs = (q, k, v) + tuple(inputs)
    stand_in = (0.0, 0.0, 0.0) + _INPUT_NEUTRAL
    clean = [jnp.where(jnp.isfinite(x), x, jnp.asarray(c, x.dtype)) for x, c in zip(xs, stand_in)]
    o_c, final_c = impl(clean[0], clean[1], clean[2], state, tuple(clean[3:]), scale, live)
    all_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))
    given = lax.stop_gradient((q, k, v, state, tuple(inputs), scale))
    o_a, final_a = lax.cond(all_finite, lambda: lax.stop_gradient((o_c, final_c)), lambda: _values(*given, live))
    pick = lambda a, c: jnp.where(jnp.isfinite(a), c, a)  # noqa: E731
    return pick(o_a, o_c), jax.tree.map(pick, final_a, final_c)


_causal_forward_jit = jax.jit(_causal_forward, static_argnums=0)


# ----------------------------------------------------------------------------------------------------
# Public API (docs/contract.md §10; the kernel layers' state is a KV cache).

_COMPUTE_DTYPES = (jnp.float32, jnp.float64)


def _real_floating(name, x):
    """Refuse a non-real-floating array ``x`` (integer, bool, complex) named ``name``."""
    dtype = jnp.asarray(x).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{SPEC_NAME}: {name} must be a real floating-point array (it is cast to q's dtype), "
                         f"got {dtype}")


def _check_gate(name, x):
    """Refuse concrete finite gate values outside the declared domain; traced values pass."""
    x = jnp.asarray(x)
    domain = INPUTS[name]["domain"]
    inside = (x <= 0) if domain == "nonpositive" else ((x > 0) & (x <= 1))
    try:
        ok = bool(jnp.all(inside | ~jnp.isfinite(x)))
    except jax.errors.ConcretizationTypeError:
        return
    if not ok:
        raise ValueError(f"{SPEC_NAME}: input {name!r} has values outside its domain {domain!r}")


def _check(q, k, v, params, inputs, lead):
    """Validate dtypes and shapes of forward's / step's arguments; raise ValueError naming the argument."""
    if not any(q.dtype == d for d in _COMPUTE_DTYPES):
        raise ValueError(f"{SPEC_NAME}: q has dtype {q.dtype}, but q's dtype is the compute dtype and must be float32 "
                         f"or float64; cast with q.astype(jnp.float32)")
    _real_floating("k", k)
    _real_floating("v", v)
    if q.ndim != lead + 1:
        want = "forward expects q, k [B, T, H, K]" if lead == 3 else "step expects q_t, k_t [B, H, K]"
        raise ValueError(f"{SPEC_NAME}: {want} ({lead + 1} axes); got q with {q.ndim} axes, shape {q.shape}")
    if not isinstance(params, dict) or params:
        raise ValueError(f"{SPEC_NAME}: params must be an empty dict (this layer has no parameters), got {params!r}")
    if k.shape != q.shape or v.shape[:-1] != q.shape[:-1] or v.ndim != q.ndim:
        raise ValueError(f"{SPEC_NAME}: expected q, k [..., H, K] and v [..., H, V] with equal leading axes; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    unknown, missing = sorted(set(inputs) - set(_INPUT_NAMES)), sorted(set(_INPUT_NAMES) - set(inputs))
    if unknown or missing:
        raise ValueError(f"{SPEC_NAME}: per-token inputs must be exactly {list(_INPUT_NAMES)}; "
                         f"missing {missing}, unknown {unknown}")
    for n in _INPUT_NAMES:
        if jnp.shape(inputs[n]) != q.shape[:-1]:
            raise ValueError(f"{SPEC_NAME}: input {n!r} must have shape {INPUTS[n]['shape'][3 - lead:]} = "
                             f"{q.shape[:-1]}, got {jnp.shape(inputs[n])}")
        _real_floating(f"input {n!r}", inputs[n])
        _check_gate(n, inputs[n])


def _state_in(state, B, H, K, V, dtype, note=""):
    """The caller's KV cache as a State (k, v, g in ``dtype``, length int32) after checking fields and shapes;
    ``note`` is appended to a shape error (with cu_seqlens: the leading axis is one cache per sequence)."""
    if not isinstance(state, (tuple, list)) or len(state) != len(State._fields):
        raise ValueError(f"{SPEC_NAME}: initial_state must be a State{State._fields} (a KV cache from init_state, "
                         f"forward or step), got {type(state).__name__}")
    k, v, g, length = (jnp.asarray(x) for x in state)
    N = k.shape[2] if k.ndim == 4 else -1
    for name, x, want in (("k", k, (B, H, N, K)), ("v", v, (B, H, N, V)), ("g", g, (B, H, N)), ("length", length, (B,))):
        if x.shape != want or N < 0:
            raise ValueError(f"{SPEC_NAME}: initial_state.{name} must have shape {want} (B, H, capacity N, ...)"
                             f"{note}, got {x.shape}")
    for name, x in (("k", k), ("v", v), ("g", g)):
        _real_floating(f"initial_state.{name}", x)
    if not jnp.issubdtype(length.dtype, jnp.integer):
        raise ValueError(f"{SPEC_NAME}: initial_state.length must be an integer array [B], got {length.dtype}")
    try:
        if bool(jnp.any((length < 0) | (length > N))):
            raise ValueError(f"{SPEC_NAME}: initial_state.length must lie in [0, capacity {N}], got {length}")
    except jax.errors.ConcretizationTypeError:
        pass
    return State(k.astype(dtype), v.astype(dtype), g.astype(dtype), length.astype(jnp.int32))


def _query_scale(scale, K, dtype):
    """The kernel's temperature as a dtype scalar: ``scale``, or DEFAULT_SCALE when None ('inverse_sqrt_dk': K ** -0.5)."""
    if scale is None:
        scale = K ** -0.5 if DEFAULT_SCALE == "inverse_sqrt_dk" else DEFAULT_SCALE
    return jnp.asarray(scale, dtype)


_DEFAULT_CHUNK_SIZE = 64


def _chunk_size(form, chunk_size):
    """The key-block length of form "chunked" as an int (None → 64); None for "recurrent". Raises ValueError for a
    chunk size that is not a positive int and for a chunk size given with form "recurrent"."""
    if form != "chunked":
        if chunk_size is not None:
            raise ValueError(f"{SPEC_NAME}: chunk_size applies to form='chunked' only; got chunk_size={chunk_size!r} "
                             f"with form={form!r} (leave it None)")
        return None
    if chunk_size is None:
        return _DEFAULT_CHUNK_SIZE
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{SPEC_NAME}: chunk_size must be a positive int (a static Python integer), got "
                         f"{chunk_size!r}")
    return chunk_size


def _with_capacity(state, capacity):
    """``state`` with its slot axis cut or zero-padded to ``capacity`` (every filled slot must lie below it)."""
    def fit(x):
        n = x.shape[2]
        if n >= capacity:
            return x[:, :, :capacity]
        return jnp.concatenate([x, jnp.zeros(x.shape[:2] + (capacity - n,) + x.shape[3:], x.dtype)], axis=2)

    return State(fit(state.k), fit(state.v), fit(state.g), state.length)


# ==== section: api_forward ====
def forward(q, k, v, params, *, initial_state=None, output_final_state=False, form="recurrent", scale=None,
            chunk_size=None, cu_seqlens=None, max_seqlen=None, **inputs):
    """Run the layer over a sequence: o_t = Σ_{i≤t} κ_{t,i} v_i / Σ_{i≤t} κ_{t,i} over the cache and the tokens.

    Args:
        q: [B, T, H, K] queries, float32 or float64: q's dtype is the compute dtype.
        k: [B, T, H, K] keys.  v: [B, T, H, V] values.  Real floating, any width; cast to q's dtype.
        params: {} (no parameters).
        initial_state: a State (KV cache, see State), or None for an empty one.
        output_final_state: also return the cache after the last token (capacity N + T, length + T filled).
        form: "recurrent" (exact masked attention) or "chunked" (blockwise online softmax); equal to round-off.
        scale: the kernel's temperature (q ← scale · φ(q)); None for DEFAULT_SCALE.
        chunk_size: keys per block of form "chunked" (a positive Python int; None for 64). Only form "chunked"
            takes it.
        cu_seqlens: None, or int offsets [S + 1] (fla's convention, 0 = cu[0] < … < cu[S] = T; may be traced)
            of S sequences packed into one row (B = 1). Each sequence attends only over its own initial cache
            and its own tokens (initial_state then has leading axis S instead of B; None: an empty cache for
            each). The final cache has leading axis S and capacity N + T (N: the initial caches' capacity), the
            layout of the Numba modules: sequence s's T_s tokens in slots length_s .. length_s + T_s − 1, zeros
            after them, length_s + T_s filled. Outputs, final caches and gradients equal S separate calls, and
            no sequence sees another (docs/contract.md §10). Computed as a padded batch [S, max_seqlen, ...]
            whose padding keys get weight exactly 0 (their logits are −inf) and whose padding gates decay nothing.
        max_seqlen: with cu_seqlens, a static bound (positive Python int) on every sequence's length, the
            padded length; None for T.
        **inputs: the forget gate (see INPUTS), [B, T, H], in the space INPUTS states.

    Returns:
        (o [B, T, H, V], final State or None), in q's dtype (length int32).

    Causal for any input: o[:, t] and the gradients through it depend on positions ≤ t only, also when a later
    position holds NaN or ±inf.

    Raises:
        ValueError: unknown form; a bad chunk_size; q not float32/float64; k, v, an input or a state field not
            real floating; inconsistent shapes; non-empty params; missing or unknown inputs; a gate outside its
            domain; a malformed initial state (with cu_seqlens: leading axis S); with cu_seqlens: B ≠ 1, offsets
            not a 1-D integer array or (when concrete) not 0 = cu[0] < … < cu[S] = T, a max_seqlen that is not
            a positive int or is below a sequence's length; a max_seqlen without cu_seqlens.
    """
    if form not in FORMS:
        raise ValueError(f"{SPEC_NAME}: unknown form {form!r}; this layer offers {FORMS}")
    size = _chunk_size(form, chunk_size)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check(q, k, v, params, inputs, 3)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = q.dtype
    ins = [jnp.asarray(inputs[n], dtype) for n in _INPUT_NAMES]
    impl = _chunked_impl(size) if form == "chunked" else _forward_recurrent
    if cu_seqlens is None:
        if max_seqlen is not None:
            raise ValueError(f"{SPEC_NAME}: max_seqlen applies with cu_seqlens only; got max_seqlen={max_seqlen!r}")
        state = init_state(B, H, K, V, params, dtype) if initial_state is None else \
            _state_in(initial_state, B, H, K, V, dtype)
        if T == 0:  # no token: nothing to attend to, the cache comes back as given
            return jnp.zeros((B, 0, H, V), dtype), (state if output_final_state else None)
        o, final = _causal_forward_jit(impl, q, k.astype(dtype), v.astype(dtype), state, ins,
                                       _query_scale(scale, K, dtype))
        return o, (final if output_final_state else None)
    cu, S, T_pad = _varlen_lengths(cu_seqlens, B, T, max_seqlen)
    state = init_state(S, H, K, V, params, dtype) if initial_state is None else \
        _state_in(initial_state, S, H, K, V, dtype, " (with cu_seqlens the leading axis is S, one cache per sequence)")
    (q, k, v, *ins), live = _varlen_pack(cu, T_pad, [q, k.astype(dtype), v.astype(dtype)] + ins,
                                         (0.0, 0.0, 0.0) + _INPUT_NEUTRAL)
    o, final = _causal_forward_jit(impl, q, k, v, state, ins, _query_scale(scale, K, dtype), live)
    o = _varlen_unpack(cu, o, T)
    return o, (_with_capacity(final, state.k.shape[2] + T) if output_final_state else None)


def step(state, q_t, k_t, v_t, params, *, scale=None, **inputs_t):
    """Decode one token: write it into the cache's next free slot and attend over the cache.

    Args:
        state: State (KV cache) with a free slot (length < capacity N; see init_state's capacity).
        q_t: [B, H, K], float32 or float64 (the compute dtype).  k_t: [B, H, K].  v_t: [B, H, V].
        params: {}.  scale: as in forward.  **inputs_t: the forget gate, [B, H].

    Returns:
        (o_t [B, H, V], new State of the same capacity, length + 1), in q_t's dtype.

    Raises:
        ValueError: as forward; a full cache (length = N) when the length is concrete. Under jit (a traced
            length) a full cache cannot be refused: o_t is NaN and the token is not stored.
    """
    q_t, k_t, v_t = jnp.asarray(q_t), jnp.asarray(k_t), jnp.asarray(v_t)
    _check(q_t, k_t, v_t, params, inputs_t, 2)
    dtype = q_t.dtype
    ins = tuple(jnp.asarray(inputs_t[n], dtype) for n in _INPUT_NAMES)
    B, H, K = q_t.shape
    state = _state_in(state, B, H, K, v_t.shape[-1], dtype)
    try:
        full = bool(jnp.any(state.length >= state.k.shape[2]))
    except jax.errors.ConcretizationTypeError:
        full = False
    if full:
        raise ValueError(f"{SPEC_NAME}: the KV cache is full (capacity {state.k.shape[2]}); start from "
                         "init_state(..., capacity=N) with N ≥ the tokens to decode, passed to forward as initial_state")
    q_t, k_t = _query_scale(scale, K, dtype) * _features(q_t), _features(k_t.astype(dtype))
    return _step_jit(state, q_t, k_t, v_t.astype(dtype), ins)


_step_jit = jax.jit(_step_batched)

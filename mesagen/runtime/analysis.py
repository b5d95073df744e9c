"""Analyses of trained models behind the paper's claims (docs/paper.md §6; used by ``mesagen reproduce``).

* :func:`linear_effective_weights` / :func:`linear_forward_np` / :func:`block_project`: the one-layer linear
  self-attention model on constructed tokens as per-head products W_KQ = η W_K W_Qᵀ and W_PV = W_V W_O
  (von Oswald et al. 2023, Prop. 1; the paper's Sec. 3), and their projection onto the GD construction's block
  structure; :func:`linear_stack_forward_np` / :func:`compress_linear_stack`: a deeper stack from the same
  matrices, and its compression to 16 block scalars per head (claim 3).
* :func:`gd_k_predictions` / :func:`fit_gd_k`: k steps of full-batch gradient descent from W = 0 on the
  in-context least-squares loss, step size line-searched per k (the curves deeper linear models are compared to;
  the paper's Prop. 2 is a preconditioned variant of this iteration).
* :func:`probe_r2`: linear (ridge) probes of a residual stream, fitted and scored on different sequences.
* :func:`preconditioned_inputs`: the probe target (S Sᵀ + λI)⁻¹ s_t of the paper's Sec. 4.

Shapes: ``B`` sequences, ``T`` positions, ``D`` state dimension, ``H`` heads, ``d`` residual width (4 D for
constructed tokens). Everything here is numpy float64 unless a docstring says otherwise.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from mesagen.runtime.layers import GeneratedAttention

#: Constructed-token slots e_t = [0, s_t, s_t, s_{t-1}] (paper Sec. 3): index of each D-wide slot.
SLOT_OUT, SLOT_CUR_A, SLOT_CUR_B, SLOT_PREV = 0, 1, 2, 3


def linear_effective_weights(attn: GeneratedAttention) -> tuple[np.ndarray, np.ndarray]:
    """Per-head effective matrices of a generated ``linear`` layer (o_t = η Σ_{i≤t} v_i k_iᵀ q_t).

    Args:
        attn: the block's :class:`GeneratedAttention` wrapping ``generated:linear`` (no positional features).

    Returns:
        ``(kq, pv)``, float64 ``[H, d, d]`` each: ``kq[h] = η_h · scale · W_K[h] W_Q[h]ᵀ`` (rows: key input,
        columns: query input) and ``pv[h] = W_V[h] W_O[h]`` (rows: value input, columns: output), so that the
        layer's output is ``o_t = Σ_h Σ_{i≤t} (e_iᵀ kq[h] e_t) e_iᵀ pv[h]``.

    Raises:
        ValueError: if the layer is not the ``linear`` spec or its q/k path carries positional features.
    """
    if getattr(attn.layer, "SPEC_NAME", None) != "linear":
        raise ValueError(f"attn: expected a generated 'linear' layer, got {getattr(attn.layer, 'SPEC_NAME', attn)!r}")
    wq, wk = np.asarray(attn.wq, np.float64), np.asarray(attn.wk, np.float64)
    if wq.shape[0] != attn.wv.shape[0]:
        raise ValueError("attn: the q/k path has positional features; the block analysis needs plain tokens")
    wv, wo = np.asarray(attn.wv, np.float64), np.asarray(attn.wo, np.float64)
    eta = np.asarray(attn.params()["eta"], np.float64)
    scale = float(attn.scale if attn.scale is not None else getattr(attn.layer, "DEFAULT_SCALE", 1.0))
    kq = np.einsum("h,ahk,bhk->hab", eta * scale, wk, wq)
    pv = np.einsum("ahv,hvb->hab", wv, wo)
    return kq, pv


def linear_forward_np(tokens: np.ndarray, kq: np.ndarray, pv: np.ndarray, out_dim: int,
                      clip: float | None) -> np.ndarray:
    """Prediction of a one-layer linear model on constructed tokens from its effective matrices.

    Args:
        tokens: ``[B, T, d]`` constructed tokens. kq, pv: ``[H, d, d]`` (:func:`linear_effective_weights`).
        out_dim: D, the prediction is read from the first D entries. clip: the residual clip (None: none).

    Returns:
        float64 ``[B, T, D]``: ``clip(e_t + o_t)[:D]`` with the causal (i ≤ t) sum of the layer.
    """
    return linear_stack_forward_np(tokens, [(kq, pv)], out_dim, clip)


def linear_stack_forward_np(tokens: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]], out_dim: int,
                            clip: float | None) -> np.ndarray:
    """Prediction of a stack of linear self-attention layers (no LayerNorm, no MLP) from per-layer effective
    matrices: ``e ← clip(e + Σ_h Σ_{i≤t} (e_iᵀ kq[h] e_t) e_iᵀ pv[h])`` per layer, read out from the first D
    entries (the paper's Sec. 3 models on constructed tokens).

    Args:
        tokens: ``[B, T, d]``. layers: per layer ``(kq, pv)``, ``[H, d, d]`` each (:func:`linear_effective_weights`).
        out_dim: D. clip: the residual clip after every layer (None: none).

    Returns:
        float64 ``[B, T, D]``.
    """
    e = np.asarray(tokens, np.float64)
    t = e.shape[1]
    causal = np.tril(np.ones((t, t)))
    for kq, pv in layers:
        out = e.copy()
        for h in range(kq.shape[0]):
            scores = np.einsum("bia,ac,btc->bti", e, kq[h], e, optimize=True) * causal      # e_iᵀ kq e_t, i ≤ t
            out += np.einsum("bti,bia,ac->btc", scores, e, pv[h], optimize=True)
        e = np.clip(out, -clip, clip) if clip is not None else out
    return e[..., :out_dim]


def _block_scalar_forward(coef: dict, mask: dict, tokens: jax.Array, dim: int, clip: float | None) -> jax.Array:
    """JAX forward of a linear stack whose W_KQ and W_PV are grids of c·I slot blocks: ``coef["kq"]``,
    ``coef["pv"]`` ``[L, H, n, n]`` (n = d / D slots) times ``mask`` (0/1, same shape). ``[B, T, d] -> [B, T, D]``."""
    b, t, d = tokens.shape
    n = d // dim
    causal = jnp.tril(jnp.ones((t, t), tokens.dtype))
    e = tokens
    for kq, pv in zip(coef["kq"] * mask["kq"], coef["pv"] * mask["pv"]):
        slots = e.reshape(b, t, n, dim)
        gram = jnp.einsum("biad,btcd->btiac", slots, slots)                 # <e_i[a], e_t[c]>
        scores = jnp.einsum("btiac,hac->bhti", gram, kq) * causal          # e_iᵀ kq[h] e_t, i ≤ t
        out = jnp.einsum("bhti,biad,hac->btcd", scores, slots, pv)          # Σ_i score e_i[a] pv[h]_(a, c)
        e = e + out.reshape(b, t, d)
        e = jnp.clip(e, -clip, clip) if clip is not None else e
    return e[..., :dim]


def compress_linear_stack(layers: list[tuple[np.ndarray, np.ndarray]], dim: int, clip: float | None,
                          train: tuple[np.ndarray, np.ndarray], heldout: tuple[np.ndarray, np.ndarray], *,
                          keep: int = 16, steps: int = 300, lr: float = 3e-3, batch: int = 128,
                          seed: int = 0) -> dict:
    """Compress a trained linear stack to ``keep`` scalars per head and fine-tune them (the paper's Sec. 3
    compressed model, our construction).

    Every D×D slot block of each head's W_KQ and W_PV is replaced by c·I (c the mean of its diagonal,
    :func:`block_coefficients`): 2 n² scalars per head (32 for constructed tokens' n = 4 slots). Of those, each
    head keeps the ``keep`` with the largest |c| (its largest block masses) and zeroes the rest; the kept scalars
    are then fine-tuned with Adam on the training sequences, the masks fixed.

    Args:
        layers: per layer ``(kq, pv)`` ``[H, d, d]`` (:func:`linear_effective_weights`). dim: D. clip: residual clip.
        train, heldout: ``(tokens [B, T, d], targets [B, T, D])`` of different sequences.
        keep: scalars kept per head (≤ 2 n²). steps, lr, batch, seed: the fine-tuning (full passes over
            ``train`` in shuffled minibatches of ``batch``).

    Returns:
        dict of held-out losses (mean over sequences and positions of ½‖ŝ − s‖², float): ``full`` (the stack
        as given), ``block_scalar`` (all 2 n² block scalars per head), ``pruned`` (``keep`` kept, before
        fine-tuning), ``compressed`` (after); ``per_t`` (``[T]`` float64 of the compressed model),
        ``params_per_head`` (``keep``), ``objective`` (training loss per step), ``kept_blocks`` (how often each
        (matrix, a, b) block was kept over layers and heads).

    Raises:
        ValueError: ``keep`` outside [1, 2 n²], or d not a multiple of ``dim``.
    """
    import optax
    d = layers[0][0].shape[-1]
    if d % dim:
        raise ValueError(f"compress_linear_stack: residual width {d} is not a multiple of D = {dim}")
    n = d // dim
    if not 1 <= keep <= 2 * n * n:
        raise ValueError(f"compress_linear_stack: keep must be in [1, {2 * n * n}], got {keep}")
    coef = {name: np.stack([np.stack([block_coefficients(m, dim) for m in mats[i]]) for mats in layers])
            for i, name in enumerate(("kq", "pv"))}                                     # [L, H, n, n]
    both = np.concatenate([coef["kq"], coef["pv"]], -1)                                  # [L, H, n, 2n]
    flat = np.abs(both).reshape(*both.shape[:2], -1)
    thresh = -np.sort(-flat, -1)[..., keep - 1:keep]
    keep_mask = (flat >= thresh).reshape(both.shape).astype(np.float64)
    mask = {"kq": keep_mask[..., :n], "pv": keep_mask[..., n:]}
    ones = {k: np.ones_like(v) for k, v in mask.items()}
    tok_h, tgt_h = (np.asarray(x, np.float64) for x in heldout)

    def heldout_loss(c, m):
        pred = _block_scalar_forward(c, m, jnp.asarray(tok_h, jnp.float32), dim, clip)
        return np.mean(0.5 * np.sum((np.asarray(pred, np.float64) - tgt_h) ** 2, -1), 0)

    full = np.mean(0.5 * np.sum((linear_stack_forward_np(tok_h, layers, dim, clip) - tgt_h) ** 2, -1))
    block_scalar, pruned = heldout_loss(coef, ones).mean(), heldout_loss(coef, mask).mean()
    tok_t, tgt_t = (jnp.asarray(x, jnp.float32) for x in train)
    params = {k: jnp.asarray(v * mask[k], jnp.float32) for k, v in coef.items()}
    jmask = {k: jnp.asarray(v, jnp.float32) for k, v in mask.items()}
    opt = optax.adam(lr)

    @jax.jit
    def step(p, state, idx):
        def loss(q):
            pred = _block_scalar_forward(q, jmask, tok_t[idx], dim, clip)
            return jnp.mean(0.5 * jnp.sum((pred - tgt_t[idx]) ** 2, -1))
        val, g = jax.value_and_grad(loss)(p)
        upd, state = opt.update(g, state, p)
        return optax.apply_updates(p, upd), state, val

    state = opt.init(params)
    rng = np.random.default_rng(seed)
    size = tok_t.shape[0]
    objective = []
    for i in range(steps):
        idx = jnp.asarray(rng.choice(size, min(batch, size), replace=False))
        params, state, val = step(params, state, idx)
        objective.append(val)
    per_t = heldout_loss({k: np.asarray(v, np.float64) for k, v in params.items()}, mask)
    kept = {f"{name}[{a},{b}]": int(mask[name][..., a, b].sum()) for name in ("kq", "pv")
            for a in range(n) for b in range(n) if mask[name][..., a, b].any()}
    return {"full": float(full), "block_scalar": float(block_scalar), "pruned": float(pruned),
            "compressed": float(per_t.mean()), "per_t": per_t, "params_per_head": keep,
            "objective": np.asarray(jnp.stack(objective), np.float64) if objective else np.zeros(0),
            "kept_blocks": kept}


def _slots(mat: np.ndarray, dim: int) -> np.ndarray:
    """``[d, d] -> [4, 4, D, D]`` view of the slot blocks."""
    n = mat.shape[0] // dim
    return mat.reshape(n, dim, n, dim).transpose(0, 2, 1, 3)


def block_coefficients(mat: np.ndarray, dim: int) -> np.ndarray:
    """The mean of each D×D slot block's diagonal, ``[d, d] -> [4, 4]``: the scalar c of the block's best
    c·I approximation (Frobenius norm)."""
    return np.einsum("abii->ab", _slots(mat, dim)) / dim


def block_project(kq: np.ndarray, pv: np.ndarray, dim: int, *, gd_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """Project per-head effective matrices onto the GD construction's block structure (Prop. 1).

    Every D×D slot block is replaced by (mean of its diagonal) · I. With ``gd_only`` every block outside the
    GD construction is zeroed as well: W_KQ keeps only (key slot s_{t-1}) × (query slots s_t) and W_PV only
    (value slots s_t) × (output slot), so the model computes ŝ_{t+1} = Σ_i c s_i s_{i-1}ᵀ s_t, GD-1 with a
    learned step size c.

    Args:
        kq, pv: ``[H, d, d]``. dim: D. gd_only: also zero the non-GD blocks.

    Returns:
        ``(kq', pv')`` of the same shapes.
    """
    out = []
    for mats, keep in ((kq, {(SLOT_PREV, SLOT_CUR_A), (SLOT_PREV, SLOT_CUR_B)}),
                       (pv, {(SLOT_CUR_A, SLOT_OUT), (SLOT_CUR_B, SLOT_OUT)})):
        proj = np.zeros_like(mats)
        for h, m in enumerate(mats):
            c = block_coefficients(m, dim)
            for a in range(c.shape[0]):
                for b in range(c.shape[1]):
                    if gd_only and (a, b) not in keep:
                        continue
                    proj[h, a * dim:(a + 1) * dim, b * dim:(b + 1) * dim] = c[a, b] * np.eye(dim)
        out.append(proj)
    return out[0], out[1]


def gd_block_share(kq: np.ndarray, pv: np.ndarray, dim: int) -> float:
    """Share of the squared weight mass in the GD blocks among the blocks that can affect the prediction.

    Relevant: W_KQ rows and columns of the three state slots (slot 0 of every input token is zero) and W_PV rows
    of the state slots into the output slot's columns (the prediction is read there). GD blocks: as in
    :func:`block_project`. Returns a float in [0, 1] (1: exactly the construction's support).
    """
    gd = tot = 0.0
    for h in range(kq.shape[0]):
        ks, ps = _slots(kq[h], dim), _slots(pv[h], dim)
        for a in (1, 2, 3):
            for b in (1, 2, 3):
                m = float(np.sum(ks[a, b] ** 2))
                tot += m
                gd += m if (a == SLOT_PREV and b in (SLOT_CUR_A, SLOT_CUR_B)) else 0.0
            m = float(np.sum(ps[a, SLOT_OUT] ** 2))
            tot += m
            gd += m if a in (SLOT_CUR_A, SLOT_CUR_B) else 0.0
    return gd / tot if tot > 0 else 0.0


def _pairs(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(states, np.float64)
    return s[:, :-1], s[:, 1:]


def _gd_stats(states: np.ndarray):
    """Eigen-decomposition of A_t = Σ_{i<t} x_i x_iᵀ and M_t = C_t V_t, z_t = V_tᵀ x_t (C_t = Σ_{i<t} y_i x_iᵀ)."""
    x, y = _pairs(states)
    xx = np.cumsum(np.einsum("bti,btj->btij", x, x), 1)
    yx = np.cumsum(np.einsum("bti,btj->btij", y, x), 1)
    zero = np.zeros_like(xx[:, :1])
    xx, yx = np.concatenate([zero, xx[:, :-1]], 1), np.concatenate([zero, yx[:, :-1]], 1)   # exclusive: i < t
    lam, vec = np.linalg.eigh(xx)
    return lam, np.einsum("btij,btjk->btik", yx, vec), np.einsum("btji,btj->bti", vec, x), y


def _gd_poly(lam: np.ndarray, eta: float, k_max: int) -> np.ndarray:
    """p_k(a) = η Σ_{j<k} (1 − η a)^j for k = 1..k_max: ``[k_max, *lam.shape]``."""
    out, term, acc = [], np.ones_like(lam), np.zeros_like(lam)
    for _ in range(k_max):
        acc = acc + term
        out.append(eta * acc)
        term = term * (1.0 - eta * lam)
    return np.stack(out)


def gd_k_predictions(states: np.ndarray, eta: float, k_max: int) -> np.ndarray:
    """Predictions of k steps of GD from W = 0 on ½ Σ_{i<t} ‖y_i − W x_i‖², for k = 1..k_max.

    W^(k) = C_t p_k(A_t) with p_k(a) = η Σ_{j<k} (1 − η a)^j (the ``gd`` spec's closed form), prediction
    W^(k) x_t; k = 1 is the GD-1 baseline of :mod:`mesagen.runtime.baselines`.

    Args:
        states: ``[B, T + 1, D]``. eta: step size. k_max: largest k (>= 1).

    Returns:
        float64 ``[k_max, B, T, D]``.

    Raises:
        ValueError: if ``k_max < 1`` or ``eta <= 0``.
    """
    if k_max < 1 or eta <= 0:
        raise ValueError(f"gd_k_predictions: need k_max >= 1 and eta > 0, got k_max={k_max}, eta={eta}")
    lam, m, z, _ = _gd_stats(states)
    return np.einsum("btdj,kbtj->kbtd", m, _gd_poly(lam, eta, k_max) * z[None])


#: Step-size grid of the k-step GD line search.
GD_ETA_GRID = tuple(np.geomspace(1e-3, 0.3, 49))


def fit_gd_k(tune_states: np.ndarray, eval_states: np.ndarray, k_max: int,
             grid: tuple[float, ...] = GD_ETA_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Line-search the step size of every k on ``tune_states``; per-t losses on ``eval_states``.

    Args:
        tune_states, eval_states: ``[B, T + 1, D]`` (different sequences). k_max: largest k. grid: step sizes.

    Returns:
        ``(etas [k_max], per_t [k_max, T])``: the best step size of each k (mean loss over batch and
        positions, non-finite losses of divergent steps excluded) and its per-position loss on ``eval_states``
        in the paper's unit (½ Σ_d error², mean over sequences).
    """
    lam, m, z, y = _gd_stats(tune_states)
    best = np.full(k_max, np.inf)
    etas = np.zeros(k_max)
    with np.errstate(over="ignore", invalid="ignore"):
        for eta in grid:
            pred = np.einsum("btdj,kbtj->kbtd", m, _gd_poly(lam, eta, k_max) * z[None])
            loss = 0.5 * np.mean(np.sum((pred - y[None]) ** 2, -1), axis=(1, 2))
            loss = np.where(np.isfinite(loss), loss, np.inf)
            better = loss < best
            best, etas = np.where(better, loss, best), np.where(better, eta, etas)
    lam, m, z, y = _gd_stats(eval_states)
    per_t = np.stack([0.5 * np.mean(np.sum((np.einsum("btdj,btj->btd", m, _gd_poly(lam, etas[k], k + 1)[k] * z)
                                            - y) ** 2, -1), 0) for k in range(k_max)])
    return etas, per_t


def _richardson_poly(lam: np.ndarray, omega: float, damping: float, k_max: int) -> np.ndarray:
    """q_k(a) = ω Σ_{j<k} (c − ω a)^j for k = 1..k_max with c = ``damping``: ``[k_max, *lam.shape]``.

    k steps of Richardson's iteration x_{j+1} = x_j + ω (s − (A + ρI) x_j) from x_0 = 0 give x_k = q_k(A) s with
    c = 1 − ωρ (the ridge damping ρ = (1 − c)/ω); c = 1 is plain GD's polynomial (:func:`_gd_poly`).
    """
    out, term, acc = [], np.ones_like(lam), np.zeros_like(lam)
    for _ in range(k_max):
        acc = acc + term
        out.append(omega * acc)
        term = term * (damping - omega * lam)
    return np.stack(out)


def prop2_predictions(states: np.ndarray, omega: float, damping: float, scale: float, k_max: int) -> np.ndarray:
    """Predictions of the paper's Proposition 2 algorithm for k = 1..k_max (von Oswald et al. 2023, Sec. 4).

    k steps of Richardson's iteration approximate the preconditioned input x ≈ (A_t + ρI)⁻¹ s_t (A_t = Σ_{i<t}
    x_i x_iᵀ, ρ = (1 − c)/ω, from x_0 = 0), then one GD step reads it out: ŝ_{t+1} = η C_t x_k
    (C_t = Σ_{i<t} y_i x_iᵀ). With c = 1 and η = 1 this is k steps of GD with step ω (:func:`gd_k_predictions`);
    a Chebyshev iteration is another polynomial of the same degree k − 1, so the fitted family below (ω, c, η
    free per k) contains the best Richardson variant, not the best polynomial.

    Args:
        states: ``[B, T + 1, D]``. omega: Richardson step ω > 0. damping: c = 1 − ωρ ∈ (0, 1]. scale: η.
        k_max: largest k (>= 1).

    Returns:
        float64 ``[k_max, B, T, D]``.

    Raises:
        ValueError: if ``k_max < 1``, ``omega <= 0`` or ``damping`` is outside (0, 1].
    """
    if k_max < 1 or omega <= 0 or not 0 < damping <= 1:
        raise ValueError(f"prop2_predictions: need k_max >= 1, omega > 0 and 0 < damping <= 1, got k_max={k_max}, "
                         f"omega={omega}, damping={damping}")
    lam, m, z, _ = _gd_stats(states)
    return scale * np.einsum("btdj,kbtj->kbtd", m, _richardson_poly(lam, omega, damping, k_max) * z[None])


#: Damping grid c = 1 − ωρ of the Proposition 2 fit (c = 1: no ridge term, plain GD's polynomial).
PROP2_DAMPING_GRID = (1.0, 0.995, 0.98, 0.95, 0.9, 0.8, 0.6)


def fit_prop2_k(tune_states: np.ndarray, eval_states: np.ndarray, k_max: int,
                omegas: tuple[float, ...] = GD_ETA_GRID,
                dampings: tuple[float, ...] = PROP2_DAMPING_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Fit Proposition 2's (ω, c, η) for every k on ``tune_states``; per-t losses on ``eval_states``.

    (ω, c) on the grids; for each pair the read-out scale η of every k is the least-squares optimum
    η* = ⟨u, y⟩ / ⟨u, u⟩ of the unit-scale predictions u (closed form), so the fit is never worse than k-step GD
    (:func:`fit_gd_k`, the c = 1, η = 1 members) on the tuning sequences.

    Args:
        tune_states, eval_states: ``[B, T + 1, D]`` (different sequences). k_max: largest k.
        omegas, dampings: the grids of ω and c.

    Returns:
        ``(params [k_max, 3], per_t [k_max, T])``: (ω, c, η) of each k and its per-position loss on
        ``eval_states`` (½ Σ_d error², mean over sequences).
    """
    lam, m, z, y = _gd_stats(tune_states)
    best = np.full(k_max, np.inf)
    params = np.zeros((k_max, 3))
    with np.errstate(over="ignore", invalid="ignore"):
        for omega in omegas:
            for c in dampings:
                u = np.einsum("btdj,kbtj->kbtd", m, _richardson_poly(lam, omega, c, k_max) * z[None])
                uu = np.sum(u * u, axis=(1, 2, 3))
                eta = np.where(uu > 0, np.sum(u * y[None], axis=(1, 2, 3)) / np.where(uu > 0, uu, 1), 0.0)
                loss = 0.5 * np.mean(np.sum((eta[:, None, None, None] * u - y[None]) ** 2, -1), axis=(1, 2))
                loss = np.where(np.isfinite(loss), loss, np.inf)
                better = loss < best
                best = np.where(better, loss, best)
                params = np.where(better[:, None], np.stack([np.full(k_max, omega), np.full(k_max, c), eta], 1),
                                  params)
    lam, m, z, y = _gd_stats(eval_states)
    per_t = []
    for k in range(k_max):
        omega, c, eta = params[k]
        poly = _richardson_poly(lam, omega, c, k + 1)[k] if omega > 0 else np.zeros_like(lam)
        pred = eta * np.einsum("btdj,btj->btd", m, poly * z)
        per_t.append(0.5 * np.mean(np.sum((pred - y) ** 2, -1), 0))
    return params, np.stack(per_t)


def fit_k(model_per_t: np.ndarray, gd_per_t: np.ndarray, t_min: int = 1) -> tuple[int, float]:
    """The k whose GD curve is closest to a model's per-t loss in log space.

    Args:
        model_per_t: ``[T]``. gd_per_t: ``[k_max, T]`` (:func:`fit_gd_k`). t_min: first position compared (t = 0
            has no context: every predictor outputs about 0).

    Returns:
        ``(k, rms)``: the best k (1-based) and the root-mean-square difference of the log losses over t ≥ t_min.
    """
    diff = np.log(gd_per_t[:, t_min:]) - np.log(model_per_t[None, t_min:])
    rms = np.sqrt(np.mean(diff ** 2, axis=1))
    k = int(np.argmin(rms))
    return k + 1, float(rms[k])


def preconditioned_inputs(states: np.ndarray, lam: float) -> np.ndarray:
    """Probe target (S_t S_tᵀ + λI)⁻¹ s_t with S_t = [s_0 … s_t] the states seen up to position t (paper Sec. 4,
    the preconditioned input of its Prop. 2; λ here is the standard ridge coefficient).

    Args:
        states: ``[B, T + 1, D]``. lam: > 0.

    Returns:
        float64 ``[B, T, D]``.

    Raises:
        ValueError: if ``lam <= 0``.
    """
    if lam <= 0:
        raise ValueError(f"preconditioned_inputs: lam must be > 0, got {lam}")
    x, _ = _pairs(states)
    a = np.cumsum(np.einsum("bti,btj->btij", x, x), 1) + lam * np.eye(x.shape[-1])
    return np.linalg.solve(a, x[..., None])[..., 0]


def residual_streams(model, tokens: jax.Array) -> list[np.ndarray]:
    """The residual stream of ``model`` (:class:`~mesagen.runtime.model.Model`) before the first block and after
    every block: ``len(blocks) + 1`` float64 arrays ``[B, T, d]`` (the same computation as ``Model.__call__``)."""

    @eqx.filter_jit
    def run(m, tok):
        tok = tok.astype(jnp.float32)
        x = tok @ m.embed[0] + m.embed[1] if m.embed is not None else tok
        from mesagen.runtime.model import sinusoidal
        pos = sinusoidal(tok.shape[1], m.pos_dim) if m.pos_dim else None
        out = [x]
        for i, block in enumerate(m.blocks):
            x = block(x, pos if i == 0 else None)
            out.append(x)
        return out

    return [np.asarray(x, np.float64) for x in run(model, tokens)]


def probe_r2(features: np.ndarray, targets: np.ndarray, n_fit: int, alpha: float = 1e-3) -> np.ndarray:
    """R² of linear probes fitted per position on sequences ``[:n_fit]`` and scored on ``[n_fit:]``.

    Ridge regression with an intercept (features and targets centred on the fit set), penalty
    ``alpha · trace(XᵀX) / d``; R² = 1 − Σ residual² / Σ (target − fit-set mean)², pooled over target dims.

    Args:
        features: ``[B, T, d]``. targets: ``[B, T, D]``. n_fit: sequences used for fitting (0 < n_fit < B).
        alpha: relative ridge penalty.

    Returns:
        float64 ``[T]``.

    Raises:
        ValueError: if ``n_fit`` leaves no fit or no score sequences, or the batch sizes differ.
    """
    b = features.shape[0]
    if not 0 < n_fit < b or targets.shape[0] != b:
        raise ValueError(f"probe_r2: need 0 < n_fit < B with equal batches, got n_fit={n_fit}, "
                         f"features {features.shape}, targets {targets.shape}")
    out = np.zeros(features.shape[1])
    for t in range(features.shape[1]):
        x, y = features[:n_fit, t], targets[:n_fit, t]
        mx, my = x.mean(0), y.mean(0)
        xc = x - mx
        g = xc.T @ xc
        w = np.linalg.solve(g + alpha * np.trace(g) / g.shape[0] * np.eye(g.shape[0]) + 1e-12 * np.eye(g.shape[0]),
                            xc.T @ (y - my))
        pred = (features[n_fit:, t] - mx) @ w + my
        res = np.sum((targets[n_fit:, t] - pred) ** 2)
        tot = np.sum((targets[n_fit:, t] - my) ** 2)
        out[t] = 1.0 - res / tot if tot > 0 else 0.0
    return out


# ------------------------------------------------------------------------- prompting: EOS and prefix tuning ----
def regression_prompt_states(x: jax.Array, y: jax.Array, eos: jax.Array | None = None,
                             prefix: jax.Array | None = None) -> tuple[jax.Array, int, int]:
    """The state sequence of a few-shot regression prompt (the paper's Sec. 5): ``[p_1 … p_P, x_1, y_1, (e),
    x_2, y_2, (e), …]`` with a learned EOS state ``e`` after every pair and ``P`` learned prefix states in front,
    then one zero state (the constructed tokens need ``T + 1`` states). The learned tokens live in the space of
    the states a dynamics model consumes (R^D), so :func:`mesagen.data.constructed_tokens` builds their tokens
    like any other: the token after ``e`` carries ``e`` in its previous-state slot.

    Args:
        x, y: float32 ``[B, N, D]`` pairs. eos: ``[D]`` or None (no EOS). prefix: ``[P, D]`` or None (no prefix).

    Returns:
        ``(states [B, T + 1, D], offset, stride)``: the model's output at position ``offset + stride · i`` (the
        ``x_i`` token) predicts ``y_i``; ``T = P + stride · N``, ``stride`` 3 with an EOS, else 2.

    Raises:
        ValueError: ``x`` and ``y`` differ in shape, or ``eos`` / ``prefix`` are not ``[D]`` / ``[P, D]``.
    """
    if x.shape != y.shape or x.ndim != 3:
        raise ValueError(f"regression_prompt_states: x and y must both be [B, N, D], got {x.shape} and {y.shape}")
    b, n, d = x.shape
    parts = [x, y]
    if eos is not None:
        if eos.shape != (d,):
            raise ValueError(f"regression_prompt_states: eos must be [D] = [{d}], got {eos.shape}")
        parts.append(jnp.broadcast_to(eos.astype(x.dtype), x.shape))
    seq = jnp.stack(parts, axis=2).reshape(b, len(parts) * n, d)
    p = 0
    if prefix is not None:
        if prefix.ndim != 2 or prefix.shape[1] != d:
            raise ValueError(f"regression_prompt_states: prefix must be [P, D = {d}], got {prefix.shape}")
        p = prefix.shape[0]
        seq = jnp.concatenate([jnp.broadcast_to(prefix.astype(x.dtype), (b, p, d)), seq], axis=1)
    return jnp.concatenate([seq, jnp.zeros_like(seq[:, :1])], axis=1), p, len(parts)


def prompt_pair_losses(model, x: jax.Array, y: jax.Array, eos: jax.Array | None = None,
                       prefix: jax.Array | None = None) -> jax.Array:
    """Per-pair loss of a constructed-token dynamics model prompted with :func:`regression_prompt_states`: at
    the ``x_i`` token the model predicts ``y_i``; loss ½‖ŷ_i − y_i‖² averaged over the prompts (the paper's loss).

    Args:
        model: a :class:`~mesagen.runtime.model.Model` on constructed tokens (``[B, T, 4D]`` → ``[B, T, D]``).
        x, y: float32 ``[B, N, D]``. eos: ``[D]`` or None. prefix: ``[P, D]`` or None.

    Returns:
        float32 ``[N]`` (differentiable in ``eos`` and ``prefix``).

    Raises:
        ValueError: as :func:`regression_prompt_states`.
    """
    from mesagen.data import constructed_tokens
    states, off, stride = regression_prompt_states(x, y, eos, prefix)
    tokens, _ = constructed_tokens(states)
    pred = model(tokens)[:, off::stride][:, :x.shape[1]]
    return 0.5 * jnp.mean(jnp.sum((pred - y) ** 2, -1), 0)


def tune_prompt_tokens(model, x: jax.Array, y: jax.Array, *, eos: jax.Array | None, prefix: jax.Array | None,
                       steps: int, lr: float, tune_eos: bool = True) -> tuple[dict, np.ndarray]:
    """Prompt tuning (the paper's Sec. 5, Lester et al. 2021): Adam (optax) on the learned EOS state and prefix
    states with the model frozen, full batch on the training prompts ``x, y``; the objective is the mean over
    pairs of :func:`prompt_pair_losses`.

    Args:
        model: frozen constructed-token model. x, y: float32 ``[B, N, D]`` training prompts.
        eos: initial ``[D]`` EOS state, or None (no EOS). prefix: initial ``[P, D]`` prefix states, or None.
        steps: Adam steps (≥ 1). lr: Adam learning rate (> 0). tune_eos: whether ``eos`` is tuned (else fixed).

    Returns:
        ``({"eos": [D] | None, "prefix": [P, D] | None}, objective)``: the tuned tokens (numpy float32) and the
        training objective before each step and after the last, float64 ``[steps + 1]``.

    Raises:
        ValueError: ``steps < 1``, ``lr <= 0``, nothing to tune, or shapes as :func:`regression_prompt_states`.
    """
    import optax
    if steps < 1 or not lr > 0:
        raise ValueError(f"tune_prompt_tokens: need steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    params = {"eos": eos if tune_eos else None, "prefix": prefix}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items() if v is not None}
    if not params:
        raise ValueError("tune_prompt_tokens: nothing to tune (eos is None or fixed, and prefix is None)")
    fixed_eos = None if eos is None or tune_eos else jnp.asarray(eos, jnp.float32)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    def objective(p):
        return jnp.mean(prompt_pair_losses(model, x, y, p.get("eos", fixed_eos), p.get("prefix")))

    opt = optax.adam(lr)

    @jax.jit
    def step(p, s):
        val, g = jax.value_and_grad(objective)(p)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, val

    state, hist = opt.init(params), []
    for _ in range(steps):
        params, state, val = step(params, state)
        hist.append(val)                    # device scalars: one transfer at the end, not a sync per step
    hist.append(jax.jit(objective)(params))
    hist = [float(v) for v in hist]
    out = {"eos": fixed_eos if fixed_eos is not None else params.get("eos"), "prefix": params.get("prefix")}
    return {k: None if v is None else np.asarray(v, np.float32) for k, v in out.items()}, np.asarray(hist)


# --------------------------------------------------------------------- the mesa layer in state space ----
def mesa_state_space(attn: GeneratedAttention, dim: int) -> dict:
    """The one-layer mesa (``ridge``) model on constructed tokens read as in-context ridge in *state* space.

    Its keys are ``k_t = A s_{t−1} + N s_t`` and its queries ``q_t = B s_t + …`` (per head, ``A`` the key
    projection of the previous-state slot, ``N`` the sum over the two current-state slots, which carry the same
    s_t, ``B`` the query's). With ``N = 0`` and ``B = A M``, ``M ∝ I``, the layer is ridge regression of
    ``s_i`` on ``s_{i−1}`` with the regulariser ``λ (AᵀA)⁻¹`` (push-through identity: ``Aᵀ(A S Sᵀ Aᵀ + λI)⁻¹A =
    (S Sᵀ + λ (AᵀA)⁻¹)⁻¹``), i.e. a state-space ridge coefficient ``λ / σ²`` along each singular direction of A.
    Components of keys and queries outside A's column space are what a small λ cannot tolerate (they are fitted
    with weight ~1/λ).

    Args:
        attn: the block's :class:`GeneratedAttention` wrapping ``generated:ridge`` (parameter ``lam``), on
            constructed tokens ``[0, s_t, s_t, s_{t−1}]`` of width 4·dim (no positional features).
        dim: state dimension D.

    Returns:
        dict of float64 ``[H]`` arrays: ``lam`` (learned, key space), ``lam_state`` (λ / mean σ²(A), the
        state-space coefficient; inf for a head with A = 0), ``sigma_min`` / ``sigma_max`` of A, ``key_offspan``
        (‖N‖ / ‖A‖, Frobenius), ``query_offspan`` (the part of ``B``
        outside A's column space, relative to ‖B‖); NaN where the denominator is 0.

    Raises:
        ValueError: the layer has no ``lam`` or its input width is not 4·dim.
    """
    params = attn.params()
    wk, wq = np.asarray(attn.wk, np.float64), np.asarray(attn.wq, np.float64)
    if "lam" not in params or wk.shape[0] != 4 * dim:
        raise ValueError(f"mesa_state_space: need a ridge layer (lam) on constructed tokens of width 4·{dim}, got "
                         f"parameters {sorted(params)} and key input width {wk.shape[0]}")
    lam = np.asarray(params["lam"], np.float64)
    out = {k: [] for k in ("lam_state", "sigma_min", "sigma_max", "key_offspan", "query_offspan")}
    def slot(w, s, h):  # the [d_k, D] projection of token slot s in head h
        return w[s * dim:(s + 1) * dim, h].T

    for h in range(wk.shape[1]):
        a = slot(wk, SLOT_PREV, h)
        n = slot(wk, SLOT_CUR_A, h) + slot(wk, SLOT_CUR_B, h)
        b = slot(wq, SLOT_CUR_A, h) + slot(wq, SLOT_CUR_B, h)
        sv = np.linalg.svd(a, compute_uv=False)
        proj = a @ np.linalg.pinv(a)
        nb = np.linalg.norm(b)
        out["lam_state"].append(lam[h] / np.mean(sv ** 2) if sv.max() > 0 else np.inf)
        out["sigma_min"].append(sv.min())
        out["sigma_max"].append(sv.max())
        out["key_offspan"].append(np.linalg.norm(n) / np.linalg.norm(a) if sv.max() > 0 else np.nan)
        out["query_offspan"].append(np.linalg.norm(b - proj @ b) / nb if nb > 0 else np.nan)
    return {"lam": lam, **{k: np.asarray(v) for k, v in out.items()}}

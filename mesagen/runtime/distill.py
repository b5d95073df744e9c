"""Distilling softmax attention layers into linear self-attention (paper claim 5, second part).

von Oswald et al. (2023, arXiv 2309.05858, Sec. 4 / claim 5) report that in a trained multi-layer softmax
Transformer the first layer binds tokens (its output at t decodes ``s_{t-1}``) while the later layers behave like
linear self-attention: each can be swapped for a linear self-attention layer fitted to reproduce it, with
little loss. This module provides that linear layer (:class:`LinearAttention`), the per-layer fit
(:func:`distill_linear_layers`) and the swap comparison (:func:`swap_losses`).

The fit is layer-local ("teacher forcing"): every distilled layer sees the input the *original* model gives that
block (its LN1 output on the training tokens) and is fitted to that block's softmax attention output; the
layers are then swapped into the model together (``eqx.tree_at``), and the swapped model runs through
``Model.__call__`` unchanged, so the trainer's evaluation scores it.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mesagen.runtime.layers import SoftmaxAttention, _normal, _qk_input, _upcast, mixed_einsum


class LinearAttention(eqx.Module):
    """Causal multi-head linear self-attention: per head ``q_t = x_t W_Q``, ``k_t = x_t W_K``, ``v_t = x_t W_V``,

        o_t = sum_{i <= t} v_i (k_i^T q_t)          (normalize=False: the paper's linear self-attention)
        o_t = 1/(t+1) sum_{i <= t} v_i (k_i^T q_t)  (normalize=True: a causal mean)

    and the output ``sum_h o_{t,h} W_O[h]`` (no bias: the softmax layer it replaces has none). This is the
    linear self-attention layer of the paper (Eq. 1 without the softmax; one step of gradient descent on
    the in-context least-squares loss, Sec. 3 / Prop. 1), i.e. the linear transformer of Katharopoulos et al.
    (2020) without its feature map and normaliser. ``normalize=True`` is an addition, not the paper's layer:
    it divides by the number of positions attended (t + 1), as softmax's weights, which sum to one, do. It is
    still linear attention (a fixed, data-independent 1/(t+1) per position) and is the variant that fits:
    distilling layers 1..6 of the 7-layer softmax model (``configs/softmax_7layer.yaml``, 1500 steps, held-out
    loss 0.391) on 256 sequences by 500 Adam steps, the normalised layers reach relative errors 0.005-0.036
    (held out 0.010-0.058, lr 1e-2) while the plain ones stay at 0.12-0.17 (held out 0.25-0.30, lr 2e-3; lr 1e-2
    diverges for them), and swapping all six raises the loss to 0.565 (normalised) against 1.54 (plain): the plain
    layer's output grows with t while a softmax layer's is an average. A learned per-head output scale would be redundant (it is absorbed in ``W_O``), so there is none.

    Attributes:
        wq, wk: ``(d_qk_in, H, K)`` float32 (``d_qk_in = d_model + d_pos``: positional features join the
            query/key path, as in the first softmax layer); wv: ``(d_model, H, V)``; wo: ``(H, V, d_model)``.
        normalize: whether to divide position t's output by t + 1 (static).
    """

    wq: jax.Array
    wk: jax.Array
    wv: jax.Array
    wo: jax.Array
    normalize: bool = eqx.field(static=True, default=False)

    def __init__(self, d_model: int, heads: int, d_k: int, d_v: int, *, key: jax.Array, init_std: float,
                 d_pos: int = 0, normalize: bool = False) -> None:
        """Initialise all projections ~ N(0, init_std^2) (use :meth:`from_softmax` to start from a softmax layer).

        Raises:
            ValueError: a size is < 1 (``d_pos`` < 0) or ``init_std`` is negative.
        """
        for name, v in (("d_model", d_model), ("heads", heads), ("d_k", d_k), ("d_v", d_v)):
            if int(v) < 1:
                raise ValueError(f"LinearAttention: {name} must be >= 1, got {v}")
        if d_pos < 0 or init_std < 0:
            raise ValueError(f"LinearAttention: d_pos and init_std must be >= 0, got {d_pos}, {init_std}")
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.wq = _normal(kq, (d_model + d_pos, heads, d_k), init_std)
        self.wk = _normal(kk, (d_model + d_pos, heads, d_k), init_std)
        self.wv = _normal(kv, (d_model, heads, d_v), init_std)
        self.wo = _normal(ko, (heads, d_v, d_model), init_std)
        self.normalize = bool(normalize)

    @classmethod
    def from_softmax(cls, layer: SoftmaxAttention, *, normalize: bool = False, out_scale=1.0) -> "LinearAttention":
        """The linear layer with a softmax layer's projections: ``W_Q / sqrt(d_k)`` (the softmax's score scale),
        ``W_K``, ``W_V`` and ``out_scale * W_O`` (a scalar, or ``(H,)`` one per head).

        Raises:
            TypeError: ``layer`` is not a :class:`~mesagen.runtime.layers.SoftmaxAttention`.
        """
        if not isinstance(layer, SoftmaxAttention):
            raise TypeError(f"LinearAttention.from_softmax: layer must be a SoftmaxAttention, got {type(layer).__name__}")
        scale = jnp.asarray(out_scale, layer.wo.dtype)
        wo = layer.wo * (scale[:, None, None] if scale.ndim == 1 else scale)
        d_k = jnp.asarray(layer.wq.shape[-1], layer.wq.dtype)
        return _with_weights(layer.wq / jnp.sqrt(d_k), layer.wk, layer.wv, wo, normalize)

    def __call__(self, x: jax.Array, pos: jax.Array | None = None, *, dtype=None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``; ``pos [T, d_pos]`` joins the query/key path only (None for
        every block after the first).

        ``dtype`` (None: the parameters' float32): compute dtype of the projections and of the score / value
        products; the masked scores are formed in float32. The result is in ``dtype``.
        """
        qk_in = _qk_input(x, pos)
        q = mixed_einsum("btd,dhk->bhtk", qk_in, self.wq, dtype)
        k = mixed_einsum("btd,dhk->bhtk", qk_in, self.wk, dtype)
        v = mixed_einsum("btd,dhv->bhtv", x, self.wv, dtype)
        t = x.shape[1]
        scores = _upcast(jnp.einsum("bhtk,bhsk->bhts", q, k), dtype)          # k_s^T q_t
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, 0.0)
        if self.normalize:
            scores = scores / jnp.arange(1, t + 1, dtype=scores.dtype)[:, None]
        o = jnp.einsum("bhts,bhsv->bthv", scores if dtype is None else scores.astype(dtype), v)
        return mixed_einsum("bthv,hvd->btd", o, self.wo, dtype)

    def init_cache(self, batch: int, max_len: int) -> jax.Array:  # noqa: ARG002 -- constant memory
        """Decoding state for :meth:`step`: ``S [batch, H, V, K]`` zeros (``sum_i v_i k_i^T``; constant memory,
        whatever ``max_len``)."""
        h, d_k = self.wq.shape[1:]
        return jnp.zeros((batch, h, self.wv.shape[-1], d_k), self.wv.dtype)

    def step(self, x_t: jax.Array, cache: jax.Array, t: jax.Array, pos_t: jax.Array | None = None):
        """Decode position ``t`` (int scalar): ``S += v_t k_t^T``, ``o_t = S q_t`` (``/ (t + 1)`` if normalised).

        Args:
            x_t: ``[batch, d_model]`` float32.  cache: ``S`` from :meth:`init_cache` or the previous step.
            pos_t: ``[d_pos]`` positional features of position t, or None.

        Returns:
            ``(out [batch, d_model], new S)``; equals :meth:`__call__` at position t to float round-off.
        """
        qk_in = _qk_input(x_t, pos_t)
        q = jnp.einsum("bd,dhk->bhk", qk_in, self.wq)
        k = jnp.einsum("bd,dhk->bhk", qk_in, self.wk)
        v = jnp.einsum("bd,dhv->bhv", x_t, self.wv)
        s = cache + v[..., :, None] * k[..., None, :]
        o = jnp.einsum("bhvk,bhk->bhv", s, q)
        if self.normalize:
            o = o / (jnp.asarray(t, o.dtype) + 1)
        return jnp.einsum("bhv,hvd->bd", o, self.wo), s


def block_inputs(model, tokens: jax.Array) -> list[tuple[jax.Array, jax.Array | None]]:
    """Each block's attention input in ``model`` on ``tokens``: ``[(LN1(x_i) [B, T, d_model] float32, pos_i)]``,
    ``x_i`` the residual stream before block i (:func:`mesagen.runtime.analysis.residual_streams`: the same
    computation as ``Model.__call__``) and ``pos_i`` the positional features ``[T, d_pos]`` (block 0) or None."""
    return [(u, pos) for _, u, pos in _streams_and_inputs(model, tokens)]


def _streams_and_inputs(model, tokens: jax.Array) -> list[tuple[jax.Array, jax.Array, jax.Array | None]]:
    """Per block ``(x_i, LN1(x_i), pos_i)``: the residual stream before block i, the attention input, the
    positional features (:func:`block_inputs`)."""
    from mesagen.runtime.analysis import residual_streams
    from mesagen.runtime.model import sinusoidal
    streams = residual_streams(model, tokens)
    pos = sinusoidal(tokens.shape[1], model.pos_dim) if model.pos_dim else None
    out = []
    for i, block in enumerate(model.blocks):
        x = jnp.asarray(streams[i], jnp.float32)
        out.append((x, block.ln1(x) if block.ln1 is not None else x, pos if i == 0 else None))
    return out


def _rel_error(pred: jax.Array, target: jax.Array) -> jax.Array:
    """``||pred - target||^2 / ||target||^2`` over all entries (float scalar)."""
    return jnp.sum((pred - target) ** 2) / jnp.sum(target ** 2)


def _fit(student: LinearAttention, u: jax.Array, pos, target: jax.Array, *, steps: int, lr: float,
         batch_size: int | None, key: jax.Array) -> tuple[LinearAttention, np.ndarray]:
    """Adam on the relative squared error of ``student(u, pos)`` against ``target`` (both ``[N, T, d_model]``),
    full batch (``batch_size`` None) or on random minibatches; returns the fitted layer and the objective
    before every step ``[steps]``."""
    opt = optax.adam(lr)
    n = u.shape[0]

    def objective(layer, idx):
        uu, tt = (u, target) if idx is None else (u[idx], target[idx])
        return _rel_error(layer(uu, pos), tt)

    def body(carry, k):
        layer, state = carry
        idx = None if batch_size is None else jax.random.choice(k, n, (batch_size,), replace=False)
        loss, grads = eqx.filter_value_and_grad(objective)(layer, idx)
        updates, state = opt.update(grads, state, eqx.filter(layer, eqx.is_inexact_array))
        return (eqx.apply_updates(layer, updates), state), loss

    @eqx.filter_jit
    def run(layer):
        state = opt.init(eqx.filter(layer, eqx.is_inexact_array))
        (layer, _), curve = jax.lax.scan(body, (layer, state), jax.random.split(key, steps))
        return layer, curve

    if steps == 0:
        return student, np.zeros((0,))
    layer, curve = run(student)
    return layer, np.asarray(curve, np.float64)


def distill_linear_layers(model, tokens_train: jax.Array, layers, *, steps: int, lr: float, seed: int = 0,
                          normalize: bool = False, batch_size: int | None = None, init: str = "copy",
                          init_std: float = 0.05, tokens_eval: jax.Array | None = None,
                          sequential: bool = False) -> tuple[object, dict]:
    """Fit a :class:`LinearAttention` to each listed block's attention layer and swap them into the model.

    Paper claim 5 (von Oswald et al. 2023, Sec. 4): the layers after the first of a trained softmax Transformer
    can be replaced by distilled linear self-attention layers with little loss. For every block i in
    ``layers``: the input is that block's LN1 output computed by the *original* model on ``tokens_train``
    (:func:`block_inputs`), the target is the block's attention output on it (the teacher: softmax attention,
    or a :class:`LinearAttention`, which checks the fit). With ``init="copy"`` the linear layer starts from the
    teacher's own projections (softmax: :meth:`LinearAttention.from_softmax`, ``W_Q / sqrt(d_k)``, ``W_K``,
    ``W_V``, ``W_O``); with ``init="random"`` from N(0, init_std²) draws (``seed``). Either way ``W_O`` is then
    rescaled by the least-squares scalar ``c = <o_lin, o_sm> / <o_lin, o_lin>`` (the best output scale of the
    initial layer), and Adam (optax) minimises the mean squared error divided by the target's mean square
    (the relative error: the same minimiser as the MSE, with one learning rate for layers of any output scale).

    Args:
        model: a :class:`~mesagen.runtime.model.Model` (standard or constructed tokens).
        tokens_train: ``[N, T, D_in]`` float tokens the model takes (e.g. ``batch_from_states`` of
            ``sample_states``).
        layers: block indices to distil (e.g. ``range(1, L)``: every layer after the first).
        steps: Adam steps per layer (>= 0). lr: Adam learning rate (> 0).
        seed: PRNG seed of the random initialisation and the minibatches.
        normalize: fit the 1/(t+1)-normalised variant of :class:`LinearAttention` instead of the paper's plain one.
        batch_size: sequences per Adam step (None: all ``N``, full batch).
        init: ``"copy"`` (the teacher's projections) or ``"random"``. init_std: std of the random init.
        tokens_eval: optional ``[M, T, D_in]`` held-out tokens on which the distillation error is also reported.
        sequential: fit the layers in ascending block order, each on the model with the earlier ones already
            swapped: block i's input is then the *swapped* model's LN1 output ``u'_i`` and its target
            ``x_i + a_i(u_i) − x'_i`` (``x`` the original model's stream before block i, ``a_i(u_i)`` the
            teacher's output on the original input, ``x'`` the swapped model's stream), so the student also
            cancels the drift the earlier swaps left in the stream and the stream after the attention matches
            the original's. The errors of the report are relative to that target.

    Returns:
        ``(new_model, report)``: the model with those blocks' ``attn`` replaced, and a JSON-serialisable dict
        ``{"layers": {i: {"init_rel_error", "scaled_init_rel_error", "rel_error", "out_scale", "curve"
        (objective every ~1/20 of the steps), ["eval_init_rel_error", "eval_rel_error"]}}, "steps", "lr",
        "normalize", "init", "batch_size", "n_sequences"}``. Errors are ``||o_lin - o_teacher||^2 /
        ||o_teacher||^2`` over all training (eval) tokens: ``init_rel_error`` of the initial projections,
        ``scaled_init_rel_error`` after the output rescaling (the un-fitted starting point), ``rel_error`` after
        the fit.

    Raises:
        ValueError: ``layers`` is empty or names a block index outside the model or twice; ``steps`` < 0;
            ``lr`` <= 0; ``batch_size`` < 1 or > N; ``tokens_train`` is not 3-d; ``init`` is unknown.
        TypeError: a listed block's ``attn`` is neither :class:`~mesagen.runtime.layers.SoftmaxAttention` nor
            :class:`LinearAttention`.
    """
    layers = [int(i) for i in layers]
    n_blocks = len(model.blocks)
    if not layers or len(set(layers)) != len(layers) or any(not 0 <= i < n_blocks for i in layers):
        raise ValueError(f"distill_linear_layers: layers must be distinct block indices in [0, {n_blocks}), "
                         f"got {layers}")
    if steps < 0 or not lr > 0:
        raise ValueError(f"distill_linear_layers: steps must be >= 0 and lr > 0, got steps={steps}, lr={lr}")
    if init not in ("copy", "random"):
        raise ValueError(f"distill_linear_layers: init must be 'copy' or 'random', got {init!r}")
    if getattr(tokens_train, "ndim", None) != 3:
        raise ValueError(f"distill_linear_layers: tokens_train must be [N, T, D_in], got shape "
                         f"{getattr(tokens_train, 'shape', None)}")
    n = tokens_train.shape[0]
    if batch_size is not None and not 1 <= batch_size <= n:
        raise ValueError(f"distill_linear_layers: batch_size must be in [1, {n}] or None, got {batch_size}")
    for i in layers:
        if not isinstance(model.blocks[i].attn, (SoftmaxAttention, LinearAttention)):
            raise TypeError(f"distill_linear_layers: block {i}'s layer is {type(model.blocks[i].attn).__name__}, "
                            "neither softmax nor linear attention")
    if sequential:
        layers = sorted(layers)
    inputs = _streams_and_inputs(model, tokens_train)
    eval_inputs = _streams_and_inputs(model, tokens_eval) if tokens_eval is not None else None
    apply = eqx.filter_jit(lambda a, u, p: a(u, p))

    def swapped():
        return eqx.tree_at(lambda m: tuple(m.blocks[k].attn for k in layers[:len(new_layers)]), model,
                           tuple(new_layers))

    def problem(orig, teacher, i, current):
        """(student input, pos, target) of block i: the original's, or the swapped model's (``sequential``)."""
        x, u, pos = orig[i]
        target = apply(teacher, u, pos)
        if current is None:
            return u, pos, target
        x_new, u_new, _ = current[i]
        return u_new, pos, x + target - x_new

    new_layers, per_layer = [], {}
    for j, i in enumerate(layers):
        teacher, key = model.blocks[i].attn, jax.random.fold_in(jax.random.PRNGKey(seed), j)
        now = swapped() if sequential and new_layers else None
        current = _streams_and_inputs(now, tokens_train) if now is not None else None
        u, pos, target = problem(inputs, teacher, i, current)
        start = _initial(teacher, init, normalize, init_std, jax.random.fold_in(key, 1))
        o0 = apply(start, u, pos)
        c = float(jnp.sum(o0 * target) / jnp.sum(o0 * o0))
        student = eqx.tree_at(lambda m: m.wo, start, start.wo * c)
        fitted, curve = _fit(student, u, pos, target, steps=steps, lr=lr, batch_size=batch_size, key=key)
        rec = {"init_rel_error": float(_rel_error(o0, target)),
               "scaled_init_rel_error": float(_rel_error(apply(student, u, pos), target)),
               "rel_error": float(_rel_error(apply(fitted, u, pos), target)), "out_scale": c,
               "curve": curve[::max(1, steps // 20)].tolist()}
        if eval_inputs is not None:
            current = _streams_and_inputs(now, tokens_eval) if now is not None else None
            ue, pe, te = problem(eval_inputs, teacher, i, current)
            rec["eval_init_rel_error"] = float(_rel_error(apply(student, ue, pe), te))
            rec["eval_rel_error"] = float(_rel_error(apply(fitted, ue, pe), te))
        per_layer[i] = rec
        new_layers.append(fitted)
    new_model = eqx.tree_at(lambda m: tuple(m.blocks[i].attn for i in layers), model, tuple(new_layers))
    report = {"layers": per_layer, "steps": int(steps), "lr": float(lr), "normalize": bool(normalize), "init": init,
              "batch_size": batch_size, "n_sequences": int(n), "sequential": bool(sequential)}
    return new_model, report


def _initial(teacher, init: str, normalize: bool, init_std: float, key: jax.Array) -> LinearAttention:
    """The starting linear layer for ``teacher`` (softmax or linear attention): its own projections (``copy``)
    or random ones of its shapes (``random``), before the output rescaling."""
    if init == "random":
        d_qk, heads, d_k = teacher.wq.shape
        d_model, _, d_v = teacher.wv.shape
        return LinearAttention(d_model, heads, d_k, d_v, key=key, init_std=init_std, d_pos=d_qk - d_model,
                               normalize=normalize)
    if isinstance(teacher, SoftmaxAttention):
        return LinearAttention.from_softmax(teacher, normalize=normalize)
    return _with_weights(teacher.wq, teacher.wk, teacher.wv, teacher.wo, normalize)


def _with_weights(wq, wk, wv, wo, normalize: bool) -> LinearAttention:
    """A :class:`LinearAttention` holding the given projections (shapes as its attributes)."""
    (d_qk, heads, d_k), (d_model, _, d_v) = wq.shape, wv.shape
    new = LinearAttention(d_model, heads, d_k, d_v, key=jax.random.PRNGKey(0), init_std=0.0, d_pos=d_qk - d_model,
                          normalize=normalize)
    return eqx.tree_at(lambda m: (m.wq, m.wk, m.wv, m.wo), new, (wq, wk, wv, wo))


def swap_losses(model, distilled, layers, loss) -> dict:
    """Held-out loss of ``model``, of ``distilled`` (every block in ``layers`` swapped, from
    :func:`distill_linear_layers`) and of ``model`` with one block swapped at a time.

    Args:
        model: the original model. distilled: the same model with the blocks in ``layers`` replaced.
        layers: the swapped block indices. loss: ``model -> float`` (e.g. ``lambda m: trainer.evaluate(m).mean()``,
            the paper's held-out ½‖ŝ − s‖² averaged over positions).

    Returns:
        ``{"original": float, "all": float, "one": {i: float}}``.

    Raises:
        ValueError: ``distilled`` has a different number of blocks than ``model``.
    """
    if len(distilled.blocks) != len(model.blocks):
        raise ValueError("swap_losses: model and distilled have different depths "
                         f"({len(model.blocks)} vs {len(distilled.blocks)})")
    one = {}
    for i in layers:
        i = int(i)
        one[i] = float(loss(eqx.tree_at(lambda m: m.blocks[i].attn, model, distilled.blocks[i].attn)))
    return {"original": float(loss(model)), "all": float(loss(distilled)), "one": one}

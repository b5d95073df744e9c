"""Sequence layers as equinox modules: a wrapper around any generated layer, and softmax attention.

Both map a block input ``x (batch, time, d_model)`` through per-head projections ``q, k (heads, d_k)``,
``v (heads, d_v)``, a sequence mixer, and an output projection ``(heads * d_v) -> d_model`` -- the multi-head
self-attention layer of the paper's Eq. (1), with the mixer swapped for the generated layer's in-context
solver (Eq. 7 for the mesa layer).

**Parameters** (``PARAMS``, one value per head) with a constrained domain are stored unconstrained and mapped
on every call (:func:`constrain`):

=========================  ==========================================================  ============
domain                     map from the stored raw value r                              value set
=========================  ==========================================================  ============
``real``                   r                                                            R
``positive``               ``exp(r)`` (space ``log``, the default) or ``softplus(r)``   (0, inf)
``unit_interval``          ``sigmoid(r)``                                               (0, 1)
``positive_unit_interval`` ``sigmoid(r)`` (a linear-space gate / decay such as γ)       (0, 1)
``nonpositive``            ``-softplus(r)`` (a log-space gate g = log α)                (-inf, 0)
=========================  ==========================================================  ============

The map of a positive parameter is a per-parameter choice (``model.positive_space`` and ``model.param_space``
of the run config, see :class:`mesagen.runtime.config.ModelConfig`): ``log`` (the default) stores r = log λ,
so an Adam step of the raw value is a relative change of λ; ``softplus`` (the only map before issue 11) moves
λ by sigmoid(r) times less. Measured on ``configs/mesa_1layer.yaml`` (docs/paper.md, "Reparameterising λ"):
``log`` moves λ 1.5x further and lowers the loss by ~1 %; with either map Adam moves the raw value by at
most about the summed learning rate, so neither reaches λ ~ 1e-3 from 1 at the paper's learning rate. Two
per-parameter settings address that: ``model.param_init`` (the initial value in constrained space, instead of
the spec's ``init``; ``param_init`` of :class:`GeneratedAttention`) and ``train.param_lr_scale`` (a learning-rate
multiplier of the raw value, :func:`mesagen.runtime.train.make_optimizer`); the mesa configs learn λ at 100x
the rate and reach λ ≈ 1e-3 (docs/paper.md §5).

**Per-token inputs** (``INPUTS``) are a linear projection of the block input, with a bias, mapped into the
declared domain and space (:func:`input_map`). Their shape is the declared one: ``("B", "T", "H")`` (one
value per token and head: projection ``d_model -> H``), ``("B", "T", "H", "K")`` (per key channel:
``d_model -> H * d_k``) or ``("B", "T", "H", "V")`` (per value channel: ``d_model -> H * d_v``).

=========  ==========================  ======================  =======================================
space      domain                      map of the projection z  used by
=========  ==========================  ======================  =======================================
linear     ``real``                    z
linear     ``positive``                ``softplus(z)``
linear     ``unit_interval``           ``sigmoid(z)``          β of delta / gated_delta / kda
linear     ``positive_unit_interval``  ``sigmoid(z)``          a linear-space gate α
linear     ``nonpositive``             ``-softplus(z)``
log        ``nonpositive``             ``log_sigmoid(z)``      g = log α of simple_gla, gla, gated_delta, kda
log        ``unit_interval``           ``log_sigmoid(z)``
log        ``positive_unit_interval``  ``log_sigmoid(z)``
log        ``positive``                ``log(softplus(z))``
=========  ==========================  ======================  =======================================

**Gate bias.** A *gate* -- an input in domain ``nonpositive`` (log space) or ``positive_unit_interval`` --
has its bias initialised to :data:`GATE_BIAS_INIT` = +3, so that at initialisation (projection weights
~ N(0, init_std²), i.e. z ≈ 3) α = sigmoid(3) ≈ 0.953 (log α ≈ -0.049) for every token. Why +3: a gate near 1
makes the fresh layer behave like its ungated parent (linear attention, the delta rule), which is what the
paper's tasks need, and matches fla's GLA, whose initial gate is exp(log_sigmoid(0) / 16) = 2^(-1/16) ≈ 0.958;
yet the gate still learns, since d log α / dz = 1 - α ≈ 0.047 (a bias of +5 would give α ≈ 0.993 but a
7x smaller gradient). Other inputs (β) start at bias 0 (β = 0.5), as before.
"""

from __future__ import annotations

from types import ModuleType
from typing import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from mesagen.runtime.loader import LayerLoadError

_DOMAINS = ("real", "positive", "unit_interval", "positive_unit_interval", "nonpositive")

#: Reparameterisations of a ``positive`` parameter: ``log`` (value = exp(raw)) or ``softplus``.
POSITIVE_SPACES = ("log", "softplus")

#: Initial bias of a gate projection (domain ``nonpositive`` or ``positive_unit_interval``): α = sigmoid(3) ≈ 0.953.
GATE_BIAS_INIT = 3.0

#: Per-token input shapes the wrapper can produce (axis letters of ``INPUTS[name]["shape"]``).
INPUT_SHAPES = (("B", "T", "H"), ("B", "T", "H", "K"), ("B", "T", "H", "V"))


def constrain(raw: jax.Array, domain: str, space: str = "log") -> jax.Array:
    """Map an unconstrained array into ``domain`` (table in the module docstring).

    Args:
        raw: the stored value, any shape, floating.
        domain: one of ``real``, ``positive``, ``unit_interval``, ``positive_unit_interval``, ``nonpositive``.
        space: for ``positive`` only, ``log`` (exp) or ``softplus``; ignored for the other domains.

    Returns:
        An array of ``raw``'s shape and dtype in the domain.

    Raises:
        LayerLoadError: for an unknown domain or positive space.
    """
    if domain == "real":
        return raw
    if domain == "positive":
        if space == "log":
            return jnp.exp(raw)
        if space == "softplus":
            return jax.nn.softplus(raw)
        raise LayerLoadError(f"unknown space {space!r} for a positive parameter; known: {POSITIVE_SPACES}")
    if domain in ("unit_interval", "positive_unit_interval"):
        return jax.nn.sigmoid(raw)
    if domain == "nonpositive":
        return -jax.nn.softplus(raw)
    raise LayerLoadError(f"unknown parameter domain {domain!r}; known: {_DOMAINS}")


def unconstrain(value: jax.Array, domain: str, space: str = "log") -> jax.Array:
    """Inverse of :func:`constrain` (used once, at initialisation).

    Args:
        value: the constrained value (e.g. a spec's ``init``), any shape.
        domain, space: as for :func:`constrain`.

    Returns:
        The raw value, same shape.

    Raises:
        LayerLoadError: for an unknown domain or space, or a value the map cannot reach (the open ends of the
            interval: λ ≤ 0, α ∉ (0, 1), g ≥ 0).
    """
    value = jnp.asarray(value)
    v = np.asarray(value)
    if domain == "real":
        return value
    if domain == "positive":
        if np.any(v <= 0):
            raise LayerLoadError(f"positive parameter initialised to {value}")
        if space == "log":
            return jnp.log(value)
        if space == "softplus":
            return value + jnp.log(-jnp.expm1(-value))          # softplus^{-1}
        raise LayerLoadError(f"unknown space {space!r} for a positive parameter; known: {POSITIVE_SPACES}")
    if domain in ("unit_interval", "positive_unit_interval"):
        if np.any((v <= 0) | (v >= 1)):
            raise LayerLoadError(f"{domain} parameter initialised to {value}; the sigmoid map reaches (0, 1) only")
        return jnp.log(value) - jnp.log1p(-value)            # logit
    if domain == "nonpositive":
        if np.any(v >= 0):
            raise LayerLoadError(f"nonpositive parameter initialised to {value}; the map -softplus reaches "
                                 "(-inf, 0) only")
        return -value + jnp.log(-jnp.expm1(value))           # softplus^{-1}(-value)
    raise LayerLoadError(f"unknown parameter domain {domain!r}; known: {_DOMAINS}")


def input_map(z: jax.Array, domain: str, space: str) -> jax.Array:
    """Map a per-token projection ``z`` into an input's declared domain and space (module docstring table).

    Args:
        z: the projection plus bias, any shape, floating.
        domain: the input's ``domain``.  space: ``linear`` or ``log``.

    Returns:
        An array of ``z``'s shape and dtype.

    Raises:
        LayerLoadError: for an unsupported space / domain pair (e.g. a log-space ``real`` input).
    """
    if space == "linear":
        if domain == "positive":
            return jax.nn.softplus(z)
        return constrain(z, domain)
    if space == "log":
        if domain in ("nonpositive", "unit_interval", "positive_unit_interval"):
            return jax.nn.log_sigmoid(z)
        if domain == "positive":
            return jnp.log(jax.nn.softplus(z))
    raise LayerLoadError(f"unsupported input space/domain {space!r}/{domain!r}")


_input_map = input_map      # the name before per-token shapes (kept for callers of the private helper)


def is_gate(spec: Mapping) -> bool:
    """Whether an ``INPUTS`` entry is a gate (domain ``nonpositive``, or ``positive_unit_interval``): its
    projection bias starts at :data:`GATE_BIAS_INIT`."""
    return spec.get("domain") in ("nonpositive", "positive_unit_interval")


def input_channels(name: str, spec: Mapping, d_k: int, d_v: int) -> int | None:
    """Channels per head of a per-token input: None for ``("B", "T", "H")``, ``d_k`` for ``(..., "K")``,
    ``d_v`` for ``(..., "V")``.

    Raises:
        LayerLoadError: for any other declared shape.
    """
    shape = tuple(spec.get("shape", ("B", "T", "H")))
    if shape == INPUT_SHAPES[0]:
        return None
    if shape == INPUT_SHAPES[1]:
        return d_k
    if shape == INPUT_SHAPES[2]:
        return d_v
    raise LayerLoadError(f"input {name!r} has shape {shape}; the trainer supports {', '.join(map(str, INPUT_SHAPES))}")


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(key, shape, jnp.float32)


def mixed_einsum(spec: str, x: jax.Array, w: jax.Array, dtype=None) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` computed in ``dtype`` (both operands cast; None: no cast).

    Mixed precision (``train.precision: bfloat16``): the float32 master weight ``w`` is cast at use, so
    gradients reach it in float32 (the cast's VJP casts back).
    """
    if dtype is None:
        return jnp.einsum(spec, x, w)
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype))


def _upcast(x: jax.Array, dtype) -> jax.Array:
    """``x`` in float32 when computed in a reduced ``dtype``; unchanged when ``dtype`` is None (full precision,
    float32 or -- in float64 tests -- float64)."""
    return x if dtype is None else x.astype(jnp.float32)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``x / sqrt(sum x^2 + eps)`` over the last axis (a head's query or key), any shape and floating dtype."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + eps)


def _qk_input(x: jax.Array, pos: jax.Array | None) -> jax.Array:
    """The query/key path input: ``x (..., d_model)`` joined with positional features ``pos (..., d_pos)``
    broadcast over the leading axes (``pos`` None: ``x``)."""
    if pos is None:
        return x
    return jnp.concatenate([x, jnp.broadcast_to(pos, x.shape[:-1] + pos.shape[-1:]).astype(x.dtype)], -1)


class GeneratedAttention(eqx.Module):
    """Multi-head wrapper around a generated layer module (v1 or v2 contract).

    Attributes:
        wq, wk: ``(d_qk_in, heads, d_k)`` query/key projections (``d_qk_in = d_model + d_pos``).
        wv: ``(d_model, heads, d_v)`` value projection.
        wo: ``(heads, d_v, d_model)`` output projection.
        raw_params: the spec's parameters (``PARAMS``) in unconstrained space, e.g. ``{"lam": (heads,)}``.
        input_w, input_b: per-token input projections and biases: ``(d_model, heads)`` / ``(heads,)`` for an
            input of shape ``("B", "T", "H")``; ``(d_model, heads, C)`` / ``(heads, C)`` with C = d_k or d_v
            for ``(..., "K")`` / ``(..., "V")``.
        layer: the generated module (static).
        form: which of the module's ``FORMS`` to run (static).
        param_space: per positive parameter, its reparameterisation ``log`` or ``softplus`` (static).
        scale: the ``scale`` passed to the module (None: its ``DEFAULT_SCALE``; only for modules that declare
            ``DEFAULT_SCALE``, static).
    """

    wq: jax.Array
    wk: jax.Array
    wv: jax.Array
    wo: jax.Array
    raw_params: dict[str, jax.Array]
    input_w: dict[str, jax.Array]
    input_b: dict[str, jax.Array]
    layer: ModuleType = eqx.field(static=True)
    form: str = eqx.field(static=True)
    param_space: tuple[tuple[str, str], ...] = eqx.field(static=True)
    scale: float | None = eqx.field(static=True)
    qk_norm: str = eqx.field(static=True, default="none")

    def __init__(self, layer: ModuleType, d_model: int, heads: int, d_k: int, d_v: int, *, key: jax.Array,
                 init_std: float, d_pos: int = 0, form: str | None = None,
                 param_space: Mapping[str, str] | None = None, positive_space: str = "log",
                 scale: float | None = None, param_init: Mapping[str, float] | None = None,
                 qk_norm: str = "none") -> None:
        """Initialise projections ~ N(0, init_std^2), spec parameters at the module's ``init_params`` (or at
        ``param_init``), input biases at 0 (gates: :data:`GATE_BIAS_INIT`).

        Args:
            layer: a generated ``layer_jax`` module (or :class:`~mesagen.runtime.numba_bridge.NumbaCpuLayer`).
            d_model, heads, d_k, d_v: sizes.  key: PRNG key.  init_std: std of every projection.
            d_pos: positional features joined to the q/k path.  form: one of ``layer.FORMS`` (default its first).
            param_space: ``{name: "log" | "softplus"}`` for positive parameters, overriding ``positive_space``.
            positive_space: the reparameterisation of every other positive parameter.
            scale: passed as ``scale=`` to a module that declares ``DEFAULT_SCALE``; None means its default.
            param_init: ``{name: value}``, the initial value of a spec parameter in constrained space (every
                head), replacing ``init_params``; names the layer lacks are ignored (the model-level setting
                names parameters of other layers too; :class:`~mesagen.runtime.model.Model` checks them).
            qk_norm: ``none`` or ``l2`` (q and k divided by their per-head L2 norm before the layer).

        Raises:
            LayerLoadError: ``form`` not offered; an unknown domain, space or input shape; ``param_space``
                naming a parameter the layer lacks or one that is not positive; a ``param_init`` value outside
                the parameter's domain; ``scale`` given for a module without ``DEFAULT_SCALE`` (v1 modules take
                no scale).
        """
        form = form or layer.FORMS[0]
        if form not in layer.FORMS:
            raise LayerLoadError(f"layer {layer.SPEC_NAME!r} offers forms {layer.FORMS}, not {form!r}")
        if scale is not None and not hasattr(layer, "DEFAULT_SCALE"):
            raise LayerLoadError(f"layer {layer.SPEC_NAME!r} takes no scale (it has no DEFAULT_SCALE; v1 module); "
                                 "remove the block's scale")
        if positive_space not in POSITIVE_SPACES:
            raise LayerLoadError(f"unknown positive_space {positive_space!r}; known: {POSITIVE_SPACES}")
        spaces = {}
        for n, s in layer.PARAMS.items():
            if s["domain"] == "positive":
                spaces[n] = positive_space
        for n, sp in (param_space or {}).items():
            if n not in layer.PARAMS:
                continue                         # the model-level setting names parameters of other layers too
            if layer.PARAMS[n]["domain"] != "positive":
                raise LayerLoadError(f"param_space.{n}: parameter {n!r} of layer {layer.SPEC_NAME!r} has domain "
                                     f"{layer.PARAMS[n]['domain']!r}; only positive parameters have a choice")
            if sp not in POSITIVE_SPACES:
                raise LayerLoadError(f"param_space.{n}: unknown space {sp!r}; known: {POSITIVE_SPACES}")
            spaces[n] = sp
        kq, kk, kv, ko, ki = jax.random.split(key, 5)
        self.wq = _normal(kq, (d_model + d_pos, heads, d_k), init_std)
        self.wk = _normal(kk, (d_model + d_pos, heads, d_k), init_std)
        self.wv = _normal(kv, (d_model, heads, d_v), init_std)
        self.wo = _normal(ko, (heads, d_v, d_model), init_std)
        init = dict(layer.init_params(heads, d_k, d_v, jnp.float32))
        self.raw_params = {}
        for n, s in layer.PARAMS.items():
            value = init[n]
            if param_init and n in param_init:
                value = jnp.full(jnp.shape(value), param_init[n], jnp.float32)
            try:
                self.raw_params[n] = unconstrain(value, s["domain"], spaces.get(n, "log"))
            except LayerLoadError as exc:
                if not (param_init and n in param_init):
                    raise
                raise LayerLoadError(f"model.param_init.{n}: {param_init[n]!r} is outside the domain "
                                     f"{s['domain']!r} of parameter {n!r} of layer {layer.SPEC_NAME!r} "
                                     f"({exc})") from None
        in_keys = jax.random.split(ki, max(len(layer.INPUTS), 1))
        self.input_w, self.input_b = {}, {}
        for k, (n, s) in zip(in_keys, layer.INPUTS.items()):
            c = input_channels(n, s, d_k, d_v)
            input_map(jnp.zeros((), jnp.float32), s["domain"], s["space"])      # unsupported pair: fail now
            tail = () if c is None else (c,)
            self.input_w[n] = _normal(k, (d_model, heads) + tail, init_std)
            self.input_b[n] = jnp.full((heads,) + tail, GATE_BIAS_INIT if is_gate(s) else 0.0, jnp.float32)
        self.layer, self.form = layer, form
        self.param_space = tuple(sorted(spaces.items()))
        self.scale = scale
        if qk_norm not in ("none", "l2"):
            raise LayerLoadError(f"unknown qk_norm {qk_norm!r}; known: ('none', 'l2')")
        self.qk_norm = qk_norm

    def params(self) -> dict[str, jax.Array]:
        """The spec's parameters in constrained space, e.g. ``{"lam": exp(raw)}``: name -> ``(heads,)``."""
        spaces = dict(self.param_space)
        return {n: constrain(self.raw_params[n], s["domain"], spaces.get(n, "log"))
                for n, s in self.layer.PARAMS.items()}

    def inputs(self, x: jax.Array, dtype=None) -> dict[str, jax.Array]:
        """The per-token inputs for a block input ``x (..., d_model)`` (``(batch, time, d_model)`` in training,
        ``(batch, d_model)`` when decoding): name -> ``(..., heads)`` or ``(..., heads, d_k | d_v)`` as
        declared, mapped into the input's domain and space; float32 (projections computed in ``dtype``)."""
        out = {}
        for n, s in self.layer.INPUTS.items():
            w = self.input_w[n]
            z = (mixed_einsum("...d,dh->...h", x, w, dtype) if w.ndim == 2
                 else mixed_einsum("...d,dhc->...hc", x, w, dtype))
            out[n] = input_map(_upcast(z, dtype) + self.input_b[n], s["domain"], s["space"])
        return out

    def _qkv(self, x: jax.Array, pos: jax.Array | None, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Float32 ``q, k (..., heads, d_k)``, ``v (..., heads, d_v)`` of ``x (..., d_model)`` (projections in
        ``dtype``, cast to float32 at the layer boundary; L2-normalised q, k if ``qk_norm == "l2"``)."""
        qk_in = _qk_input(x, pos)
        q = _upcast(mixed_einsum("...d,dhk->...hk", qk_in, self.wq, dtype), dtype)
        k = _upcast(mixed_einsum("...d,dhk->...hk", qk_in, self.wk, dtype), dtype)
        v = _upcast(mixed_einsum("...d,dhv->...hv", x, self.wv, dtype), dtype)
        if self.qk_norm == "l2":
            q, k = l2_normalize(q), l2_normalize(k)
        return q, k, v

    def _extra(self) -> dict:
        return {"scale": self.scale} if hasattr(self.layer, "DEFAULT_SCALE") else {}

    def __call__(self, x: jax.Array, pos: jax.Array | None = None, *, dtype=None) -> jax.Array:
        """Apply the layer.

        Args:
            x: ``(batch, time, d_model)`` float32 (or ``dtype``).
            pos: optional ``(time, d_pos)`` features concatenated to the query/key path only.
            dtype: compute dtype of the projections (None: float32, as the parameters); the generated layer
                itself always runs in float32 (its modules refuse a bfloat16 q: cast at the boundary).

        Returns:
            ``(batch, time, d_model)`` in ``dtype`` (float32 if None).
        """
        q, k, v = self._qkv(x, pos, dtype)
        o, _ = self.layer.forward(q, k, v, self.params(), form=self.form, **self._extra(), **self.inputs(x, dtype))
        return mixed_einsum("bthv,hvd->btd", o, self.wo, dtype)

    def init_cache(self, batch: int, max_len: int):
        """Decoding state for :meth:`step`: the generated module's ``init_state`` (``[B, H, ...]`` in the
        parameters' dtype, its size independent of ``max_len``: constant memory per token)."""
        del max_len
        if not hasattr(self.layer, "step"):
            raise LayerLoadError(f"layer {self.layer.SPEC_NAME!r} ({type(self.layer).__name__}) has no step "
                                 "function; decode with the jax backend")
        h, d_k = self.wq.shape[1:]
        return self.layer.init_state(batch, h, d_k, self.wv.shape[-1], self.params(), self.wq.dtype)

    def step(self, x_t: jax.Array, cache, t: jax.Array, pos_t: jax.Array | None = None):
        """Decode one position with the module's ``step(state, q_t, k_t, v_t, params, **inputs_t)``.

        Args:
            x_t: ``(batch, d_model)`` float32 block input at position ``t``.
            cache: the state from :meth:`init_cache` or the previous step.  t: the position (unused: the
                state carries the past).  pos_t: ``(d_pos,)`` positional features of position t, or None.

        Returns:
            ``(out (batch, d_model), new cache)``; equals :meth:`__call__` at position t to float round-off.
        """
        del t
        q, k, v = self._qkv(x_t, pos_t, None)
        o, cache = self.layer.step(cache, q, k, v, self.params(), **self._extra(), **self.inputs(x_t))
        return jnp.einsum("bhv,hvd->bd", o, self.wo), cache


class SoftmaxAttention(eqx.Module):
    """Causal multi-head softmax self-attention (paper Eq. 1), scaled by ``1/sqrt(d_k)``.

    Attributes:
        wq, wk: ``(d_qk_in, heads, d_k)``; wv: ``(d_model, heads, d_v)``; wo: ``(heads, d_v, d_model)``.
    """

    wq: jax.Array
    wk: jax.Array
    wv: jax.Array
    wo: jax.Array

    def __init__(self, d_model: int, heads: int, d_k: int, d_v: int, *, key: jax.Array, init_std: float,
                 d_pos: int = 0) -> None:
        """Initialise all projections ~ N(0, init_std^2)."""
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.wq = _normal(kq, (d_model + d_pos, heads, d_k), init_std)
        self.wk = _normal(kk, (d_model + d_pos, heads, d_k), init_std)
        self.wv = _normal(kv, (d_model, heads, d_v), init_std)
        self.wo = _normal(ko, (heads, d_v, d_model), init_std)

    def __call__(self, x: jax.Array, pos: jax.Array | None = None, *, dtype=None) -> jax.Array:
        """``(batch, time, d_model) -> (batch, time, d_model)``; ``pos (time, d_pos)`` joins q/k only.

        ``dtype`` (None: float32): compute dtype of the projections and of the score / value products; the
        softmax itself is taken in float32. The result is in ``dtype``.
        """
        qk_in = _qk_input(x, pos)
        q = mixed_einsum("btd,dhk->bhtk", qk_in, self.wq, dtype)
        k = mixed_einsum("btd,dhk->bhtk", qk_in, self.wk, dtype)
        v = mixed_einsum("btd,dhv->bhtv", x, self.wv, dtype)
        t = x.shape[1]
        scores = _upcast(jnp.einsum("bhtk,bhsk->bhts", q, k), dtype) / jnp.sqrt(q.shape[-1])
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
        p = jax.nn.softmax(scores, axis=-1)
        o = jnp.einsum("bhts,bhsv->bthv", p if dtype is None else p.astype(dtype), v)
        return mixed_einsum("bthv,hvd->btd", o, self.wo, dtype)

    def init_cache(self, batch: int, max_len: int) -> tuple[jax.Array, jax.Array]:
        """KV cache for :meth:`step`: ``(k (batch, heads, max_len, d_k), v (batch, heads, max_len, d_v))``
        zeros in the parameters' dtype (memory grows with the positions decoded: softmax attention keeps every
        key/value)."""
        h, d_k = self.wq.shape[1:]
        return (jnp.zeros((batch, h, max_len, d_k), self.wq.dtype),
                jnp.zeros((batch, h, max_len, self.wv.shape[-1]), self.wv.dtype))

    def step(self, x_t: jax.Array, cache, t: jax.Array, pos_t: jax.Array | None = None):
        """Decode position ``t`` (int scalar, < max_len): write its key/value into the cache and attend over
        positions 0..t.

        Args:
            x_t: ``(batch, d_model)`` float32.  cache: from :meth:`init_cache` or the previous step.
            pos_t: ``(d_pos,)`` positional features of position t, or None.

        Returns:
            ``(out (batch, d_model), new cache)``; equals :meth:`__call__` at position t to float round-off.
        """
        qk_in = _qk_input(x_t, pos_t)
        q = jnp.einsum("bd,dhk->bhk", qk_in, self.wq)
        k = jnp.einsum("bd,dhk->bhk", qk_in, self.wk)
        v = jnp.einsum("bd,dhv->bhv", x_t, self.wv)
        kc = jax.lax.dynamic_update_slice_in_dim(cache[0], k[:, :, None].astype(cache[0].dtype), t, axis=2)
        vc = jax.lax.dynamic_update_slice_in_dim(cache[1], v[:, :, None].astype(cache[1].dtype), t, axis=2)
        scores = jnp.einsum("bhk,bhsk->bhs", q, kc) / jnp.sqrt(q.shape[-1])
        scores = jnp.where(jnp.arange(kc.shape[2]) <= t, scores, -jnp.inf)
        o = jnp.einsum("bhs,bhsv->bhv", jax.nn.softmax(scores, axis=-1), vc)
        return jnp.einsum("bhv,hvd->bd", o, self.wo), (kc, vc)

"""Sequence layers as equinox modules: a wrapper around any generated layer, and softmax attention.

Both map a block input ``x (batch, time, d_model)`` through per-head projections ``q, k (heads, d_k)``,
``v (heads, d_v)``, a sequence mixer, and an output projection ``(heads * d_v) -> d_model`` -- the multi-head
self-attention layer of the paper's Eq. (1), with the mixer swapped for the generated layer's in-context
solver (Eq. 7 for the mesa layer).

Parameters with a constrained domain are stored unconstrained and mapped on every call:
``positive`` -> softplus, ``unit_interval`` -> sigmoid, ``real`` -> identity. Per-token inputs a spec declares
(e.g. DeltaNet's ``beta``) are produced as that map of a per-head linear projection of the block input; a
``log``-space input is the log of the mapped value (``log_sigmoid`` for a unit-interval gate).
"""

from __future__ import annotations

from types import ModuleType

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from mesagen.runtime.loader import LayerLoadError

_DOMAINS = ("real", "positive", "unit_interval")


def constrain(raw: jax.Array, domain: str) -> jax.Array:
    """Map an unconstrained array into ``domain`` (softplus / sigmoid / identity).

    Raises:
        LayerLoadError: for an unknown domain.
    """
    if domain == "real":
        return raw
    if domain == "positive":
        return jax.nn.softplus(raw)
    if domain == "unit_interval":
        return jax.nn.sigmoid(raw)
    raise LayerLoadError(f"unknown parameter domain {domain!r}; known: {_DOMAINS}")


def unconstrain(value: jax.Array, domain: str) -> jax.Array:
    """Inverse of :func:`constrain` (used once, at initialisation).

    Raises:
        LayerLoadError: for an unknown domain or a value outside it.
    """
    value = jnp.asarray(value)
    if domain == "real":
        return value
    if domain == "positive":
        if np.any(np.asarray(value) <= 0):
            raise LayerLoadError(f"positive parameter initialised to {value}")
        return value + jnp.log(-jnp.expm1(-value))          # softplus^{-1}
    if domain == "unit_interval":
        if np.any((np.asarray(value) <= 0) | (np.asarray(value) >= 1)):
            raise LayerLoadError(f"unit-interval parameter initialised to {value}")
        return jnp.log(value) - jnp.log1p(-value)            # logit
    raise LayerLoadError(f"unknown parameter domain {domain!r}; known: {_DOMAINS}")


def _input_map(z: jax.Array, domain: str, space: str) -> jax.Array:
    if space == "linear":
        return constrain(z, domain)
    if space == "log":
        if domain == "unit_interval":
            return jax.nn.log_sigmoid(z)
        if domain == "positive":
            return jnp.log(jax.nn.softplus(z))
    raise LayerLoadError(f"unsupported input space/domain {space!r}/{domain!r}")


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(key, shape, jnp.float32)


class GeneratedAttention(eqx.Module):
    """Multi-head wrapper around a generated layer module.

    Attributes:
        wq, wk: ``(d_qk_in, heads, d_k)`` query/key projections (``d_qk_in = d_model + d_pos``).
        wv: ``(d_model, heads, d_v)`` value projection.
        wo: ``(heads, d_v, d_model)`` output projection.
        raw_params: the spec's parameters (``PARAMS``) in unconstrained space, e.g. ``{"lam": (heads,)}``.
        input_w, input_b: per-token input projections ``(d_model, heads)`` and biases ``(heads,)``.
        layer: the generated module (static).
        form: which of the module's ``FORMS`` to run (static).
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

    def __init__(self, layer: ModuleType, d_model: int, heads: int, d_k: int, d_v: int, *, key: jax.Array,
                 init_std: float, d_pos: int = 0, form: str | None = None) -> None:
        """Initialise projections ~ N(0, init_std^2) and spec parameters at the module's ``init_params``.

        Raises:
            LayerLoadError: if ``form`` is not offered by the module or a domain is unknown.
        """
        form = form or layer.FORMS[0]
        if form not in layer.FORMS:
            raise LayerLoadError(f"layer {layer.SPEC_NAME!r} offers forms {layer.FORMS}, not {form!r}")
        kq, kk, kv, ko, ki = jax.random.split(key, 5)
        self.wq = _normal(kq, (d_model + d_pos, heads, d_k), init_std)
        self.wk = _normal(kk, (d_model + d_pos, heads, d_k), init_std)
        self.wv = _normal(kv, (d_model, heads, d_v), init_std)
        self.wo = _normal(ko, (heads, d_v, d_model), init_std)
        init = layer.init_params(heads, d_k, d_v, jnp.float32)
        self.raw_params = {n: unconstrain(init[n], spec["domain"]) for n, spec in layer.PARAMS.items()}
        in_keys = jax.random.split(ki, max(len(layer.INPUTS), 1))
        self.input_w = {n: _normal(k, (d_model, heads), init_std) for k, n in zip(in_keys, layer.INPUTS)}
        self.input_b = {n: jnp.zeros((heads,), jnp.float32) for n in layer.INPUTS}
        self.layer, self.form = layer, form

    def params(self) -> dict[str, jax.Array]:
        """The spec's parameters in constrained space, e.g. ``{"lam": softplus(raw)}``."""
        return {n: constrain(self.raw_params[n], s["domain"]) for n, s in self.layer.PARAMS.items()}

    def __call__(self, x: jax.Array, pos: jax.Array | None = None) -> jax.Array:
        """Apply the layer.

        Args:
            x: ``(batch, time, d_model)`` float32.
            pos: optional ``(time, d_pos)`` features concatenated to the query/key path only.

        Returns:
            ``(batch, time, d_model)``.
        """
        qk_in = x if pos is None else jnp.concatenate([x, jnp.broadcast_to(pos, x.shape[:2] + pos.shape[-1:])], -1)
        q = jnp.einsum("btd,dhk->bthk", qk_in, self.wq)
        k = jnp.einsum("btd,dhk->bthk", qk_in, self.wk)
        v = jnp.einsum("btd,dhv->bthv", x, self.wv)
        inputs = {n: _input_map(jnp.einsum("btd,dh->bth", x, self.input_w[n]) + self.input_b[n],
                                s["domain"], s["space"]) for n, s in self.layer.INPUTS.items()}
        o, _ = self.layer.forward(q, k, v, self.params(), form=self.form, **inputs)
        return jnp.einsum("bthv,hvd->btd", o, self.wo)


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

    def __call__(self, x: jax.Array, pos: jax.Array | None = None) -> jax.Array:
        """``(batch, time, d_model) -> (batch, time, d_model)``; ``pos (time, d_pos)`` joins q/k only."""
        qk_in = x if pos is None else jnp.concatenate([x, jnp.broadcast_to(pos, x.shape[:2] + pos.shape[-1:])], -1)
        q = jnp.einsum("btd,dhk->bhtk", qk_in, self.wq)
        k = jnp.einsum("btd,dhk->bhtk", qk_in, self.wk)
        v = jnp.einsum("btd,dhv->bhtv", x, self.wv)
        t = x.shape[1]
        scores = jnp.einsum("bhtk,bhsk->bhts", q, k) / jnp.sqrt(q.shape[-1])
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
        o = jnp.einsum("bhts,bhsv->bthv", jax.nn.softmax(scores, axis=-1), v)
        return jnp.einsum("bthv,hvd->btd", o, self.wo)

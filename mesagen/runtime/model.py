"""The shared Transformer: embedding (optional) -> blocks (any layer kind, hybrids allowed) -> readout.

Paper Table 1: constructed-token models have no embedding, LayerNorm, MLP or bias, clip activations to
[-4, 4] after every layer and read the prediction from the first D entries; standard-token models embed
``s_t`` (D -> d_model), use pre-LN blocks with a GELU MLP, sinusoidal positions on the first layer's q/k path,
and a learned output projection; byte tokens (the text task) look up a ``(256, d_model)`` embedding table and
return logits over the 256 bytes (output projection untied, or tied to the table's transpose).

Mixed precision: ``Model.__call__(tokens, dtype=jnp.bfloat16)`` computes embeddings, projections, MLPs and the
read-out in bfloat16 from the float32 parameters; LayerNorm, softmax, the residual stream, the logits and
every generated layer stay float32. Decoding (:meth:`Model.init_cache`, :meth:`Model.step`) runs one position
at a time through each layer's ``step`` (generated layers: the module's ``step``, constant memory; softmax: a
KV cache).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from mesagen.runtime.config import BlockConfig, ModelConfig
from mesagen.runtime.layers import GeneratedAttention, SoftmaxAttention
from mesagen.runtime.loader import LayerLoadError, load_layer_module, resolve_layer_path


def sinusoidal(time: int, dim: int, start=0) -> jax.Array:
    """Sinusoidal positional features (Vaswani et al. 2017) of positions ``start .. start + time - 1``,
    ``(time, dim)`` float32 (``start`` may be a traced int: decoding asks for one position at a time)."""
    pos = (start + jnp.arange(time, dtype=jnp.float32))[:, None]
    freq = jnp.exp(-jnp.log(10_000.0) * (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    ang = pos * freq[None]
    return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)[:, :dim]


def _matmul(x: jax.Array, w: jax.Array, dtype=None) -> jax.Array:
    """``x @ w``, both operands cast to ``dtype`` first (None: no cast; mixed precision casts float32 masters)."""
    return x @ w if dtype is None else x.astype(dtype) @ w.astype(dtype)


class LayerNorm(eqx.Module):
    """LayerNorm over the last axis (eps 1e-5) with learned scale and shift, ``(..., d) -> (..., d)``."""

    scale: jax.Array
    shift: jax.Array

    def __init__(self, d: int) -> None:
        self.scale, self.shift = jnp.ones((d,), jnp.float32), jnp.zeros((d,), jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(var + 1e-5) * self.scale + self.shift


class MLP(eqx.Module):
    """``x -> W2 GELU(W1 x + b1) + b2``, ``(..., d) -> (..., d)``."""

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array

    def __init__(self, d: int, hidden: int, *, key: jax.Array, init_std: float) -> None:
        k1, k2 = jax.random.split(key)
        self.w1 = init_std * jax.random.normal(k1, (d, hidden), jnp.float32)
        self.w2 = init_std * jax.random.normal(k2, (hidden, d), jnp.float32)
        self.b1, self.b2 = jnp.zeros((hidden,), jnp.float32), jnp.zeros((d,), jnp.float32)

    def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
        """``dtype`` (None: the parameters' float32): compute dtype of both matmuls; the result is in it."""
        if dtype is None:
            return jax.nn.gelu(x @ self.w1 + self.b1) @ self.w2 + self.b2
        h = x.astype(dtype) @ self.w1.astype(dtype) + self.b1.astype(dtype)
        return jax.nn.gelu(h) @ self.w2.astype(dtype) + self.b2.astype(dtype)


class Block(eqx.Module):
    """``x + layer(LN(x))`` then ``x + MLP(LN(x))`` (each LN / MLP optional), then optional clipping."""

    attn: eqx.Module
    ln1: LayerNorm | None
    ln2: LayerNorm | None
    mlp: MLP | None
    clip: float | None = eqx.field(static=True)

    def __call__(self, x: jax.Array, pos: jax.Array | None, dtype=None) -> jax.Array:
        """``(batch, time, d_model) -> (batch, time, d_model)``; ``dtype``: compute dtype of layer and MLP (the
        residual stream ``x`` keeps its dtype, float32)."""
        kw = {} if dtype is None else {"dtype": dtype}
        x = x + self.attn(self._in(self.ln1, x, dtype), pos, **kw).astype(x.dtype)
        if self.mlp is not None:
            x = x + self.mlp(self._in(self.ln2, x, dtype), dtype).astype(x.dtype)
        return jnp.clip(x, -self.clip, self.clip) if self.clip is not None else x

    @staticmethod
    def _in(ln, x, dtype):
        y = ln(x) if ln is not None else x
        return y if dtype is None else y.astype(dtype)

    def step(self, x_t: jax.Array, cache, t: jax.Array, pos_t: jax.Array | None):
        """One decoding position: ``x_t (batch, d_model)`` float32 -> ``(batch, d_model)``, new layer cache
        (float32 throughout)."""
        a, cache = self.attn.step(self.ln1(x_t) if self.ln1 is not None else x_t, cache, t, pos_t)
        x_t = x_t + a
        if self.mlp is not None:
            x_t = x_t + self.mlp(self.ln2(x_t) if self.ln2 is not None else x_t)
        return (jnp.clip(x_t, -self.clip, self.clip) if self.clip is not None else x_t), cache


def build_layer(block: BlockConfig, model: ModelConfig, *, key: jax.Array, d_pos: int) -> eqx.Module:
    """Instantiate one block's sequence layer from its config.

    Raises:
        LayerLoadError: if a generated module cannot be loaded or checked.
    """
    heads, d_k = block.heads or model.heads, block.d_k or model.d_k
    d_v = block.d_v or model.d_v or d_k
    if block.layer == "softmax":
        return SoftmaxAttention(model.d_model, heads, d_k, d_v, key=key, init_std=model.init_std, d_pos=d_pos)
    path = resolve_layer_path(block.layer)
    module = load_layer_module(path, block.spec_sha256)
    if block.backend == "numba_cpu":
        from mesagen.runtime.numba_bridge import NumbaCpuLayer

        module = NumbaCpuLayer(load_layer_module(path.with_name("layer_numba_cpu.py"), module.SPEC_SHA256), module)
    return GeneratedAttention(module, model.d_model, heads, d_k, d_v, key=key, init_std=model.init_std,
                              d_pos=d_pos, form=block.form, param_space=model.param_space,
                              positive_space=model.positive_space, scale=block.scale,
                              param_init=model.param_init, qk_norm=block.qk_norm)


def spec_param_names(model: "Model") -> set[str]:
    """Names of the spec parameters (``PARAMS``) of every generated layer of ``model``."""
    return {n for b in model.blocks if isinstance(b.attn, GeneratedAttention) for n in b.attn.layer.PARAMS}


def check_param_names(model: "Model", names, field: str) -> None:
    """Raise :class:`LayerLoadError` if ``names`` (keys of a per-parameter setting such as
    ``model.param_space``) include one that no generated layer of ``model`` has; ``field`` names the setting."""
    known = spec_param_names(model)
    unknown = sorted(set(names) - known)
    if unknown:
        raise LayerLoadError(f"{field} names {', '.join(unknown)}, which no layer of the model has "
                             f"(parameters: {', '.join(sorted(known)) or 'none'})")


class Model(eqx.Module):
    """Next-state predictor, or byte-level language model (``tokens: bytes``).

    Attributes:
        embed: ``(D, d_model)`` input embedding and bias (standard tokens), ``(256, d_model)`` table and bias
            (byte tokens), or None.
        blocks: the blocks, in order.
        ln_f: final LayerNorm (if ``layernorm``).
        readout: ``(d_model, D)`` output projection and bias (standard tokens); ``(d_model, 256)`` (untied) or
            None (tied: the embedding table's transpose) and a ``(256,)`` bias (byte tokens); None for
            constructed tokens (they read the first D entries).
        discrete: whether inputs are integer token ids (byte tokens).
    """

    embed: tuple[jax.Array, jax.Array] | None
    blocks: tuple[Block, ...]
    ln_f: LayerNorm | None
    readout: tuple[jax.Array | None, jax.Array] | None
    out_dim: int = eqx.field(static=True)
    pos_dim: int = eqx.field(static=True)
    discrete: bool = eqx.field(static=True, default=False)

    def __init__(self, config: ModelConfig, out_dim: int, *, key: jax.Array) -> None:
        """Build the model.

        Args:
            config: the architecture.
            out_dim: state dimension D (the vocabulary size, 256, for byte tokens).
            key: PRNG key (split once per block plus embedding and readout).

        Raises:
            LayerLoadError: if a generated layer cannot be loaded, ``config.param_space`` or
                ``config.param_init`` names a parameter no generated layer of the model has, or a
                ``param_init`` value is outside its parameter's domain.
        """
        keys = jax.random.split(key, len(config.blocks) + 2)
        d, std = config.d_model, config.init_std
        standard = config.tokens in ("standard", "bytes")
        self.discrete = config.tokens == "bytes"
        self.embed = (std * jax.random.normal(keys[0], (out_dim, d), jnp.float32), jnp.zeros((d,), jnp.float32)) if standard else None
        self.readout = (std * jax.random.normal(keys[1], (d, out_dim), jnp.float32), jnp.zeros((out_dim,), jnp.float32)) if standard else None
        if config.tie_embeddings:
            self.readout = (None, self.readout[1])
        self.blocks = tuple(
            Block(attn=build_layer(b, config, key=k, d_pos=config.pos_dim if i == 0 else 0),
                  ln1=LayerNorm(d) if config.layernorm else None,
                  ln2=LayerNorm(d) if config.layernorm and config.mlp else None,
                  mlp=MLP(d, config.mlp_ratio * d, key=jax.random.fold_in(k, 1), init_std=std) if config.mlp else None,
                  clip=config.clip_activations)
            for i, (b, k) in enumerate(zip(config.blocks, keys[2:])))
        for field in ("param_space", "param_init"):
            check_param_names(self, getattr(config, field), f"model.{field}")
        self.ln_f = LayerNorm(d) if config.layernorm else None
        self.out_dim, self.pos_dim = out_dim, config.pos_dim

    def __call__(self, tokens: jax.Array, dtype=None) -> jax.Array:
        """Predict the next state (or the next byte's logits) at every position.

        Args:
            tokens: ``(batch, time, 4D)`` constructed or ``(batch, time, D)`` standard tokens, float32; or
                ``(batch, time)`` integer byte ids in [0, 256) (byte tokens).
            dtype: compute dtype of embeddings, projections, MLPs and read-out (None: float32, i.e. as the
                parameters); ``jnp.bfloat16`` for mixed precision (module docstring).

        Returns:
            ``(batch, time, D)`` predictions of ``s_{t+1}``, or ``(batch, time, 256)`` float32 logits of the
            next byte.
        """
        if self.discrete:
            x = self.embed[0][tokens] + self.embed[1]
        else:
            tokens = tokens.astype(jnp.float32)
            x = _matmul(tokens, self.embed[0], dtype) + self.embed[1] if self.embed is not None else tokens
        x = x.astype(jnp.float32) if dtype is not None else x   # the residual stream stays float32
        pos = sinusoidal(tokens.shape[1], self.pos_dim) if self.pos_dim else None
        for i, block in enumerate(self.blocks):
            x = block(x, pos if i == 0 else None, dtype)
        return self._head(x, dtype)

    def _head(self, x: jax.Array, dtype=None) -> jax.Array:
        """Final LayerNorm and read-out of ``x (..., d_model)``; logits / predictions in float32 (or x's dtype)."""
        if self.ln_f is not None:
            x = self.ln_f(x)
        if self.readout is not None:
            w = self.readout[0] if self.readout[0] is not None else self.embed[0].T
            out = _matmul(x, w, dtype)
            return (out.astype(jnp.float32) if dtype is not None else out) + self.readout[1]
        return x[..., :self.out_dim]

    def init_cache(self, batch: int, max_len: int) -> tuple:
        """Per-block decoding caches for :meth:`step` (generated layers: the module's ``init_state``; softmax:
        a ``max_len`` KV cache).

        Raises:
            LayerLoadError: a block's layer has no ``step`` (e.g. the numba_cpu backend).
        """
        return tuple(b.attn.init_cache(batch, max_len) for b in self.blocks)

    def step(self, token_t: jax.Array, cache: tuple, t: jax.Array) -> tuple[jax.Array, tuple]:
        """Decode position ``t``: the next-byte logits after ``token_t``, given the caches of positions < t.

        Args:
            token_t: ``(batch,)`` integer byte ids (byte tokens) or ``(batch, D)`` standard tokens at position t.
            cache: from :meth:`init_cache` or the previous step.  t: int scalar position (< the caches' max_len).

        Returns:
            ``(logits (batch, out_dim) float32, new cache)``: equal to ``self(tokens)[:, t]`` to float
            round-off (float32; float64 if the parameters are float64).

        Raises:
            ValueError: constructed tokens (no decoding of the dynamics task's token construction).
        """
        if self.embed is None:
            raise ValueError("decoding needs standard or bytes tokens (constructed tokens have no step)")
        x = self.embed[0][token_t] + self.embed[1] if self.discrete else token_t @ self.embed[0] + self.embed[1]
        pos_t = sinusoidal(1, self.pos_dim, t)[0] if self.pos_dim else None
        new = []
        for i, (block, c) in enumerate(zip(self.blocks, cache)):
            x, c = block.step(x, c, t, pos_t if i == 0 else None)
            new.append(c)
        return self._head(x), tuple(new)

"""The shared Transformer: embedding (optional) -> blocks (any layer kind, hybrids allowed) -> readout.

Paper Table 1: constructed-token models have no embedding, LayerNorm, MLP or bias, clip activations to
[-4, 4] after every layer and read the prediction from the first D entries; standard-token models embed
``s_t`` (D -> d_model), use pre-LN blocks with a GELU MLP, sinusoidal positions on the first layer's q/k path,
and a learned output projection.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from mesagen.runtime.config import BlockConfig, ModelConfig
from mesagen.runtime.layers import GeneratedAttention, SoftmaxAttention
from mesagen.runtime.loader import LayerLoadError, load_layer_module, resolve_layer_path


def sinusoidal(time: int, dim: int) -> jax.Array:
    """Sinusoidal positional features (Vaswani et al. 2017), ``(time, dim)`` float32."""
    pos = jnp.arange(time, dtype=jnp.float32)[:, None]
    freq = jnp.exp(-jnp.log(10_000.0) * (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    ang = pos * freq[None]
    return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)[:, :dim]


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

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(x @ self.w1 + self.b1) @ self.w2 + self.b2


class Block(eqx.Module):
    """``x + layer(LN(x))`` then ``x + MLP(LN(x))`` (each LN / MLP optional), then optional clipping."""

    attn: eqx.Module
    ln1: LayerNorm | None
    ln2: LayerNorm | None
    mlp: MLP | None
    clip: float | None = eqx.field(static=True)

    def __call__(self, x: jax.Array, pos: jax.Array | None) -> jax.Array:
        x = x + self.attn(self.ln1(x) if self.ln1 is not None else x, pos)
        if self.mlp is not None:
            x = x + self.mlp(self.ln2(x) if self.ln2 is not None else x)
        return jnp.clip(x, -self.clip, self.clip) if self.clip is not None else x


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
                              param_init=model.param_init)


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
    """Next-state predictor.

    Attributes:
        embed: ``(D, d_model)`` input embedding and bias (standard tokens) or None.
        blocks: the blocks, in order.
        ln_f: final LayerNorm (if ``layernorm``).
        readout: ``(d_model, D)`` output projection and bias (standard tokens) or None (constructed tokens
            read the first D entries).
    """

    embed: tuple[jax.Array, jax.Array] | None
    blocks: tuple[Block, ...]
    ln_f: LayerNorm | None
    readout: tuple[jax.Array, jax.Array] | None
    out_dim: int = eqx.field(static=True)
    pos_dim: int = eqx.field(static=True)

    def __init__(self, config: ModelConfig, out_dim: int, *, key: jax.Array) -> None:
        """Build the model.

        Args:
            config: the architecture.
            out_dim: state dimension D.
            key: PRNG key (split once per block plus embedding and readout).

        Raises:
            LayerLoadError: if a generated layer cannot be loaded, ``config.param_space`` or
                ``config.param_init`` names a parameter no generated layer of the model has, or a
                ``param_init`` value is outside its parameter's domain.
        """
        keys = jax.random.split(key, len(config.blocks) + 2)
        d, std = config.d_model, config.init_std
        standard = config.tokens == "standard"
        self.embed = (std * jax.random.normal(keys[0], (out_dim, d), jnp.float32), jnp.zeros((d,), jnp.float32)) if standard else None
        self.readout = (std * jax.random.normal(keys[1], (d, out_dim), jnp.float32), jnp.zeros((out_dim,), jnp.float32)) if standard else None
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

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Predict the next state at every position.

        Args:
            tokens: ``(batch, time, 4D)`` constructed or ``(batch, time, D)`` standard tokens, float32.

        Returns:
            ``(batch, time, D)`` predictions of ``s_{t+1}``.
        """
        tokens = tokens.astype(jnp.float32)
        x = tokens @ self.embed[0] + self.embed[1] if self.embed is not None else tokens
        pos = sinusoidal(tokens.shape[1], self.pos_dim) if self.pos_dim else None
        for i, block in enumerate(self.blocks):
            x = block(x, pos if i == 0 else None)
        if self.ln_f is not None:
            x = self.ln_f(x)
        if self.readout is not None:
            return x @ self.readout[0] + self.readout[1]
        return x[..., :self.out_dim]

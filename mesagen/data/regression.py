"""In-context linear regression (paper Sec. 5, few-shot prompting of models trained on dynamics).

Each sequence has its own ``W ~ N(0, 1/D)`` (or a Haar-orthogonal one, matching the dynamics teachers), inputs
``x_i ~ U(-1, 1)^D`` and targets ``y_i = W x_i + eps``. Prompts interleave them as ``[x_1, y_1, x_2, y_2, ...]``.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from pydantic import BaseModel, ConfigDict, Field


class RegressionConfig(BaseModel):
    """Frozen configuration of the in-context regression task.

    Attributes:
        dim: input and output dimension D (10).
        num_pairs: pairs N per sequence.
        noise_std: std of the target noise (0.01).
        teacher: ``orthogonal`` (Haar, like the dynamics task) or ``gaussian`` (entries N(0, 1/D)).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dim: int = Field(10, ge=1)
    num_pairs: int = Field(25, ge=1)
    noise_std: float = Field(0.01, ge=0.0)
    teacher: Literal["orthogonal", "gaussian"] = "orthogonal"


@functools.partial(jax.jit, static_argnames=("config", "batch"))
def sample_regression(key: jax.Array, config: RegressionConfig, batch: int) -> tuple[jax.Array, jax.Array]:
    """Draw regression pairs ``y_i = W x_i + eps`` with a fresh W per sequence.

    Args:
        key: PRNG key (split once into W, x and noise keys).
        config: task configuration (static).
        batch: number of sequences B (static).

    Returns:
        ``(x, y)``, each float32 ``(batch, num_pairs, dim)``.
    """
    d, n = config.dim, config.num_pairs
    k_w, k_x, k_eps = jax.random.split(key, 3)
    if config.teacher == "orthogonal":
        w = jax.random.orthogonal(k_w, d, (batch,), dtype=jnp.float32)
    else:
        w = jax.random.normal(k_w, (batch, d, d), jnp.float32) / jnp.sqrt(d)
    x = jax.random.uniform(k_x, (batch, n, d), jnp.float32, minval=-1.0, maxval=1.0)
    y = jnp.einsum("bij,bnj->bni", w, x) + config.noise_std * jax.random.normal(k_eps, (batch, n, d), jnp.float32)
    return x, y


def interleave(x: jax.Array, y: jax.Array) -> jax.Array:
    """Prompt tokens ``[x_1, y_1, x_2, y_2, ...]``.

    Args:
        x: ``(batch, pairs, D)``.
        y: ``(batch, pairs, D)``.

    Returns:
        ``(batch, 2 * pairs, D)``; a model predicting the next token is scored on y_i at the x_i positions.
    """
    b, n, d = x.shape
    return jnp.stack([x, y], axis=2).reshape(b, 2 * n, d)

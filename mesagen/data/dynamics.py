"""Linear-dynamics tasks of von Oswald et al. (arXiv 2309.05858, Sec. 3 and App. A).

Each sequence follows ``s_{t+1} = W* s_t + eps`` with a per-sequence teacher ``W*``; a model sees the states in
order and is scored on predicting the next one. All samplers are pure functions of a PRNG key and a frozen,
hashable :class:`DynamicsConfig`, jitted with the config as a *static* argument: a changed config hashes
differently and therefore retraces, so no stale constant can survive a configuration change.

Key discipline: every sampler splits its key exactly once into one sub-key per random quantity; no key is
consumed twice. The fixed-teacher and nonlinear variants draw their *shared* teacher from
``PRNGKey(config.teacher_seed)`` -- a separate stream that deliberately reproduces the same teacher in every
batch (that is what "fixed" means) and never touches the data key.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Samples are float32 whatever jax_enable_x64 says (training and its bit-identical resume rely on it).
F32 = jnp.float32

TaskKind = Literal["fully_observed", "partially_observed", "contracting", "nonlinear", "fixed_teacher"]


class DynamicsConfig(BaseModel):
    """Frozen configuration of a linear-dynamics task (paper Sec. 3, App. A; defaults = paper's Table 1 task).

    Attributes:
        kind: which variant (``fully_observed`` is the paper's main task).
        state_dim: observed dimension D (10; the partially observed task uses ``obs_dim``).
        seq_len: number of predictions T per sequence (50); T + 1 states are drawn.
        noise_std: standard deviation of the Gaussian transition noise (0.01).
        clip: states are clipped to ``[-clip, clip]`` after every transition (10; 2 for ``contracting``).
        hidden_dim: hidden dimension of the partially observed task (15).
        obs_dim: observed dimension of the partially observed task (5).
        obs_std: std of the per-sequence observation matrix entries C*_ij (sqrt(0.5): docs/paper.md §1's N(0, 0.5)
            read as variance 0.5).
        eig_low: lower end of the uniform eigenvalue range of the contracting task (0.3).
        eig_high: upper end, and the extra eigenvalue, of the contracting task (0.9).
        mlp_gain: the nonlinear task's fixed MLP* uses N(0, mlp_gain / fan_in) entries ("variance 1.1"
            read per fan-in, so that the map keeps states O(1)).
        teacher_seed: seed of the shared teacher (fixed-teacher W*, nonlinear MLP*).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: TaskKind = "fully_observed"
    state_dim: int = Field(10, ge=1)
    seq_len: int = Field(50, ge=1)
    noise_std: float = Field(0.01, ge=0.0)
    clip: float = Field(10.0, gt=0.0)
    hidden_dim: int = Field(15, ge=1)
    obs_dim: int = Field(5, ge=1)
    obs_std: float = Field(0.5 ** 0.5, gt=0.0)
    eig_low: float = 0.3
    eig_high: float = 0.9
    mlp_gain: float = Field(1.1, gt=0.0)
    teacher_seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "DynamicsConfig":
        if not self.eig_low <= self.eig_high:
            raise ValueError(f"eig_low ({self.eig_low}) must not exceed eig_high ({self.eig_high})")
        return self

    @property
    def observed_dim(self) -> int:
        """Dimension of the states a model sees (``obs_dim`` if partially observed, else ``state_dim``)."""
        return self.obs_dim if self.kind == "partially_observed" else self.state_dim

    @property
    def latent_dim(self) -> int:
        """Dimension of the state the dynamics act on."""
        return self.hidden_dim if self.kind == "partially_observed" else self.state_dim


def _rollout(transition, s1: jax.Array, noise: jax.Array, clip: float) -> jax.Array:
    """Iterate ``s <- clip(transition(s) + noise_t)``.

    Args:
        transition: maps ``(batch, n)`` states to ``(batch, n)``.
        s1: first states, ``(batch, n)``.
        noise: transition noise, ``(time, batch, n)`` with ``time = T``.
        clip: clip value.

    Returns:
        States ``(batch, T + 1, n)``, float32.
    """
    def body(s, eps):
        nxt = jnp.clip(transition(s) + eps, -clip, clip)
        return nxt, nxt

    _, rest = jax.lax.scan(body, s1, noise)
    return jnp.concatenate([s1[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)


def _contracting_matrices(key: jax.Array, batch: int, n: int, low: float, high: float) -> jax.Array:
    """``W = U diag(lam) U^-1``, ``lam`` = (n-1) draws of U[low, high] plus one ``high`` (App. A), ``(batch, n, n)``."""
    k_u, k_lam = jax.random.split(key)
    u = jax.random.normal(k_u, (batch, n, n), F32)
    lam = jnp.concatenate([jax.random.uniform(k_lam, (batch, n - 1), F32, minval=low, maxval=high),
                           jnp.full((batch, 1), high, F32)], axis=1)
    return jnp.linalg.solve(jnp.swapaxes(u, 1, 2), jnp.swapaxes(u * lam[:, None, :], 1, 2)).swapaxes(1, 2)


def _gelu_mlp(key: jax.Array, n: int, gain: float):
    """Fixed teacher MLP*(h) = B GELU(A h) with N(0, gain/n) entries; returns a batched map ``(batch, n)``."""
    k_a, k_b = jax.random.split(key)
    a = jax.random.normal(k_a, (n, n), F32) * jnp.sqrt(gain / n)
    b = jax.random.normal(k_b, (n, n), F32) * jnp.sqrt(gain / n)
    return lambda h: jax.nn.gelu(h @ a.T) @ b.T


@functools.partial(jax.jit, static_argnames=("config", "batch"))
def sample_system(key: jax.Array, config: DynamicsConfig, batch: int) -> tuple[jax.Array, jax.Array]:
    """Draw teachers and sequences (paper Sec. 3 "linear dynamics", App. A variants).

    Fully observed: ``W*`` Haar-orthogonal per sequence, ``s_1 ~ U(-1, 1)^D``,
    ``s_{t+1} = clip(W* s_t + eps)``, ``eps ~ N(0, noise_std^2 I)``. Other kinds as in :class:`DynamicsConfig`.

    Args:
        key: PRNG key (consumed once, split into one sub-key per random quantity).
        config: task configuration (static: a new config retraces).
        batch: number of sequences B (static).

    Returns:
        ``(w, states)``: the transition matrices ``(batch, n, n)`` (n = latent dim) and the observed states,
        float32 ``(batch, seq_len + 1, observed_dim)``.
    """
    n, t = config.latent_dim, config.seq_len
    k_w, k_s, k_eps, k_c = jax.random.split(key, 4)
    s1 = jax.random.uniform(k_s, (batch, n), F32, minval=-1.0, maxval=1.0)
    noise = config.noise_std * jax.random.normal(k_eps, (t, batch, n), F32)
    teacher_key = jax.random.PRNGKey(config.teacher_seed)
    if config.kind == "contracting":
        w = _contracting_matrices(k_w, batch, n, config.eig_low, config.eig_high)
    elif config.kind == "fixed_teacher":
        w = jnp.broadcast_to(jax.random.orthogonal(teacher_key, n, dtype=F32), (batch, n, n))
    else:
        w = jax.random.orthogonal(k_w, n, (batch,), dtype=F32)
    if config.kind == "nonlinear":
        mlp = _gelu_mlp(teacher_key, n, config.mlp_gain)
        def transition(s): return jnp.einsum("bij,bj->bi", w, mlp(s))
    else:
        def transition(s): return jnp.einsum("bij,bj->bi", w, s)
    states = _rollout(transition, s1, noise, config.clip)
    if config.kind == "partially_observed":
        c = config.obs_std * jax.random.normal(k_c, (batch, config.obs_dim, n), F32)
        states = jnp.einsum("boh,bth->bto", c, states)
    return w, states


def sample_states(key: jax.Array, config: DynamicsConfig, batch: int) -> jax.Array:
    """Observed states only: ``sample_system(key, config, batch)[1]``, float32 ``(batch, seq_len + 1, D)``."""
    return sample_system(key, config, batch)[1]


def raw_tokens(states: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Standard-token inputs and targets: the model sees ``s_t`` and predicts ``s_{t+1}`` (paper Sec. 3).

    Args:
        states: ``(batch, T + 1, D)``.

    Returns:
        ``(inputs, targets)``, both ``(batch, T, D)``; position t (0-based) has t context pairs before it.
    """
    return states[:, :-1], states[:, 1:]


def constructed_tokens(states: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Constructed tokens ``e_t = [0, s_t, s_t, s_{t-1}]`` with ``s_0 = 0`` (paper Sec. 3, Prop. 1).

    The prediction of ``s_{t+1}`` is read from the first D entries (the zero slot).

    Args:
        states: ``(batch, T + 1, D)``.

    Returns:
        ``(inputs (batch, T, 4D), targets (batch, T, D))``.
    """
    cur, targets = states[:, :-1], states[:, 1:]
    prev = jnp.concatenate([jnp.zeros_like(cur[:, :1]), cur[:, :-1]], axis=1)
    return jnp.concatenate([jnp.zeros_like(cur), cur, cur, prev], axis=-1), targets

"""Run a generated ``layer_numba_cpu`` module inside JAX: forward and backward through host callbacks.

:func:`numba_layer` wraps a module's ``forward`` / ``backward`` (docs/contract.md §11) in a ``jax.custom_vjp`` whose
primal and cotangent rules call the Numba code with ``jax.pure_callback``, so a JAX model (and its
``jax.grad``) can use the Numba CPU backend. Imports nothing from the compiler side.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def numba_layer(module, scale: float | str | None = None) -> Callable:
    """A JAX-differentiable ``apply(q, k, v, params, initial_state, inputs) -> (o, final_state)``.

    Args:
        module: a generated ``layer_numba_cpu`` module (``forward``, ``backward``, ``State``, ``_PARAM_NAMES``).
        scale: passed as ``scale=`` to the module's ``forward`` and ``backward`` (contract v2); None passes
            nothing, so the module uses its default (and v1 modules, which take no scale, work unchanged).

    Returns:
        ``apply`` taking q, k [B, T, H, K]; v [B, T, H, V]; params dict name -> [H]; initial_state a
        ``module.State`` of [B, H, ...] arrays (pass ``module.init_state(...)`` for the default); inputs dict
        name -> [B, T, H] / [B, T, H, K] / [B, T, H, V] as the module declares. Returns (o [B, T, H, V], final State as JAX arrays). Gradients flow to every
        argument through ``module.backward`` (the checkpointed adjoint recurrence).

    Raises:
        ValueError: q not float32 / float64 or another argument not real floating (at trace time, see
            :func:`compute_dtype`); from the module, at trace time of the callback, on inconsistent shapes.
    """
    state_cls = module.State
    scale_kw = {} if scale is None else {"scale": scale}

    def _fwd_host(q, k, v, params, st, inputs):
        o, fin = module.forward(np.asarray(q), np.asarray(k), np.asarray(v),
                                {n: np.asarray(x) for n, x in params.items()},
                                initial_state=state_cls(*(np.asarray(x) for x in st)), output_final_state=True,
                                **scale_kw, **{n: np.asarray(x) for n, x in inputs.items()})
        return o, tuple(fin)

    def _bwd_host(q, k, v, params, st, inputs, do, dfin):
        g = module.backward(np.asarray(q), np.asarray(k), np.asarray(v),
                            {n: np.asarray(x) for n, x in params.items()}, np.asarray(do),
                            initial_state=state_cls(*(np.asarray(x) for x in st)),
                            dfinal_state=state_cls(*(np.asarray(x) for x in dfin)), **scale_kw,
                            **{n: np.asarray(x) for n, x in inputs.items()})
        dt = np.asarray(q).dtype
        cast = lambda x: np.asarray(x, dtype=dt)  # noqa: E731
        return (cast(g["dq"]), cast(g["dk"]), cast(g["dv"]), {n: cast(g["d" + n]) for n in params},
                tuple(cast(x) for x in g["dinitial_state"]), {n: cast(g["d" + n]) for n in inputs})

    def _primal(q, k, v, params, st, inputs):
        shapes = (jax.ShapeDtypeStruct(q.shape[:-1] + v.shape[-1:], q.dtype),
                  tuple(jax.ShapeDtypeStruct(x.shape, q.dtype) for x in st))
        return jax.pure_callback(_fwd_host, shapes, q, k, v, params, tuple(st), inputs)

    @jax.custom_vjp
    def apply_(q, k, v, params, st, inputs):
        return _primal(q, k, v, params, st, inputs)

    def fwd(q, k, v, params, st, inputs):
        return _primal(q, k, v, params, st, inputs), (q, k, v, params, st, inputs)

    def bwd(res, cot):
        q, k, v, params, st, inputs = res
        do, dfin = cot
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), q.dtype), (q, k, v, params, st, inputs))
        return jax.pure_callback(_bwd_host, like, q, k, v, params, st, inputs, do, tuple(dfin))

    apply_.defvjp(fwd, bwd)

    def apply(q, k, v, params, initial_state, inputs=None):
        """See :func:`numba_layer`."""
        dt = compute_dtype(module.SPEC_NAME, q)
        k, v = (_real(module.SPEC_NAME, n, x, dt) for n, x in (("k", k), ("v", v)))
        st = tuple(_real(module.SPEC_NAME, f"initial_state.{n}", x, dt)
                   for n, x in zip(state_cls._fields, initial_state))
        params = {n: _real(module.SPEC_NAME, f"parameter {n!r}", x, dt) for n, x in params.items()}
        inputs = {n: _real(module.SPEC_NAME, f"input {n!r}", x, dt) for n, x in (inputs or {}).items()}
        o, fin = apply_(q, k, v, params, st, inputs)
        return o, state_cls(*fin)

    return apply


def compute_dtype(layer: str, q) -> np.dtype:
    """The compute dtype of a layer call: q's dtype, which must be float32 or float64 (the dtype policy).

    Args:
        layer: the layer's name, for the message.  q: the queries (any array-like).

    Returns:
        ``np.dtype(float32)`` or ``np.dtype(float64)``.

    Raises:
        ValueError: q has another dtype (float16, bfloat16, integer, bool, complex), naming layer, dtype and fix.
    """
    dt = np.dtype(jnp.asarray(q).dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"{layer}: q has dtype {dt}, but this layer computes in q's dtype, which must be float32 "
                         f"or float64; cast q first (e.g. q.astype(jnp.float32))")
    return dt


def _real(layer: str, what: str, x, dt):
    """``x`` cast to the compute dtype ``dt``; ValueError when it is not real floating (int, bool, complex)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{layer}: {what} has dtype {x.dtype}; it must be a real floating array (it is cast to the "
                         f"compute dtype {dt}, q's dtype)")
    return x.astype(dt)


class NumbaCpuLayer:
    """The generated-layer contract (docs/contract.md §10) of a spec, with ``forward`` run by its ``layer_numba_cpu`` module.

    The trainer treats it exactly like a ``layer_jax`` module: ``PARAMS``, ``INPUTS``, ``FORMS``,
    ``init_params``, ``init_state``, ``forward``. The default initial state is built by the JAX module's
    ``init_state`` inside JAX, so gradients reach parameters that only enter through it (λ in P₀ = I/λ);
    the recurrence and its adjoint run in Numba through :func:`numba_layer`.

    Args:
        numba_module: the spec's generated ``layer_numba_cpu`` module.
        jax_module: the same spec's generated ``layer_jax`` module (same ``SPEC_SHA256``).

    Raises:
        ValueError: the two modules come from different specs or codegen formats.
    """

    FORMS = ("recurrent",)

    def __init__(self, numba_module, jax_module) -> None:
        for attr in ("SPEC_NAME", "SPEC_SHA256", "CODEGEN_FORMAT"):
            if getattr(numba_module, attr) != getattr(jax_module, attr):
                raise ValueError(f"numba and jax modules disagree on {attr}: "
                                 f"{getattr(numba_module, attr)!r} != {getattr(jax_module, attr)!r}")
        self.SPEC_NAME, self.SPEC_SHA256 = jax_module.SPEC_NAME, jax_module.SPEC_SHA256
        self.CODEGEN_FORMAT, self.PARAMS, self.INPUTS = jax_module.CODEGEN_FORMAT, jax_module.PARAMS, jax_module.INPUTS
        self.State = jax_module.State
        if hasattr(jax_module, "DEFAULT_SCALE"):                 # contract v2: forward takes scale=
            self.DEFAULT_SCALE = jax_module.DEFAULT_SCALE
        self._jax, self._numba = jax_module, numba_module
        self._applies = {None: numba_layer(numba_module)}

    def init_params(self, num_heads, d_k, d_v, dtype=jnp.float32):
        """Initial parameters (the JAX module's)."""
        return self._jax.init_params(num_heads, d_k, d_v, dtype)

    def init_state(self, batch, num_heads, d_k, d_v, params, dtype=jnp.float32):
        """Default initial state (the JAX module's, differentiable in the parameters)."""
        return self._jax.init_state(batch, num_heads, d_k, d_v, params, dtype)

    def forward(self, q, k, v, params, *, initial_state=None, output_final_state=False, form="recurrent",
                scale=None, **inputs):
        """Same signature and result as the JAX module's ``forward`` (recurrent form only).

        ``scale`` (a Python float or None, static) is passed on to a v2 module; None means its default.

        Raises:
            ValueError: a form other than ``"recurrent"``; q not float32 / float64; k, v, params, inputs or
                the initial state not real floating (they are cast to q's dtype); a scale for a v1 module.
        """
        if scale is not None and not hasattr(self, "DEFAULT_SCALE"):
            raise ValueError(f"{self.SPEC_NAME}: this module takes no scale (v1, no DEFAULT_SCALE)")
        if scale not in self._applies:
            self._applies[scale] = numba_layer(self._numba, scale)
        if form != "recurrent":
            raise ValueError(f"{self.SPEC_NAME}: the numba_cpu backend offers {self.FORMS}, not {form!r}")
        compute_dtype(self.SPEC_NAME, q)
        B, _, H, K = q.shape
        state = initial_state if initial_state is not None else \
            self._jax.init_state(B, H, K, v.shape[-1], params, q.dtype)
        o, final = self._applies[scale](q, k, v, params, state, inputs)
        return o, (self.State(*final) if output_final_state else None)

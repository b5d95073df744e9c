"""mesagen: a compiler for in-context-objective sequence layers.

A spec (YAML) states an in-context learning problem -- loss, regression weights, regulariser, model, solver,
readout -- and mesagen derives its solver with sympy, verifies every identity numerically, and emits
standalone JAX and Numba layer modules (von Oswald et al., arXiv 2309.05858).

Importing mesagen sets ``PJRT_NPROC=1`` on jaxlib 0.10.x unless ``PJRT_NPROC`` / ``NPROC`` is set: it avoids a
deadlock of jaxlib's CPU LAPACK kernels (see :mod:`mesagen._xla_cpu`).
"""

from mesagen._xla_cpu import apply_lapack_deadlock_workaround as _apply_lapack_deadlock_workaround

__version__ = "0.1.0"

_apply_lapack_deadlock_workaround()

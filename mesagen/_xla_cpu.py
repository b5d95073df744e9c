"""Work around a deadlock of jaxlib 0.10's CPU LAPACK kernels (issue 7, item 8).

What hangs: jaxlib 0.10.x runs the batch of a LAPACK custom call (``lapack_strsm_ffi`` behind
``jnp.linalg.solve`` / ``inv``, also ``getrf`` and ``potrf``) through ``jax::ParallelBatchMap``, which schedules
the chunks on XLA:CPU's intra-op thread pool and then blocks in ``BlockingCounter::Wait``. XLA's thunk executor
runs independent thunks of one program concurrently on that same pool. When as many LAPACK calls run at once as
the pool has threads, every pool thread waits for chunks that no free thread is left to run: a deadlock with
0 % CPU (seen as a trainer step with two ``closed_form`` ridge layers stuck in equinox's
``block_until_ready``; gdb shows both ``tf_XLAEigen`` threads in ``lapack_strsm_ffi -> ParallelBatchMap ->
BlockingCounter::Wait``). The pool has one thread per CPU of the process's affinity, so 2-core machines hang
on programs that merely have two batched solves side by side; ``tests/test_xla_cpu_deadlock.py`` reproduces
it with eight independent ``jnp.linalg.solve`` calls of 100 x 20 x 20 float32 systems in one ``jax.jit``.
Cholesky (``potrf``) takes the same path, so a Cholesky closed form does not avoid it. XLA flags
(``--xla_cpu_multi_thread_eigen=false``, ``--xla_cpu_use_thunk_runtime=false``) do not help. Open-source
jaxlib builds from 0.11.1 on compile the parallel batch path out.

The workaround: a one-thread intra-op pool (environment variable ``PJRT_NPROC=1``, read by the XLA:CPU client
when it starts) runs every LAPACK batch inline, so nothing can wait on the pool. It costs XLA's intra-op
parallelism on the CPU: on the 2-core development machine, benchmarks/train_steps.py's 2-layer models at
B = 256 trained 18 % slower with linear layers (3.59 → 2.95 steps/s) and 34 % slower with the old ridge
layer (2.25 → 1.49), measured side by side; GPU backends are unaffected. Set ``PJRT_NPROC=2`` (or your core
count) to trade that back if your programs never run two batched LAPACK calls side by side. It is applied by ``import mesagen`` -- before any JAX backend
has started -- when the installed jaxlib is affected and the user has set neither ``PJRT_NPROC`` nor
``NPROC`` (the variables XLA reads; set one to choose the pool size yourself).
"""

from __future__ import annotations

import os
import re
from importlib import metadata

#: jaxlib versions whose CPU LAPACK kernels block on the intra-op pool: [0.10.0, 0.11.1).
AFFECTED = ((0, 10, 0), (0, 11, 1))

#: Environment variables the XLA:CPU client reads for its pool size (either one set means: leave it alone).
POOL_VARIABLES = ("PJRT_NPROC", "NPROC")


def _version_tuple(text: str) -> tuple[int, int, int]:
    """``"0.10.2"`` -> ``(0, 10, 2)`` (missing or non-numeric parts count as 0)."""
    parts = [int(m.group()) if (m := re.match(r"\d+", p)) else 0 for p in text.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def jaxlib_is_affected(version: str | None = None) -> bool:
    """Whether a jaxlib version has the blocking LAPACK batch path.

    Args:
        version: a version string such as ``"0.10.2"``; default: the installed jaxlib (via package metadata,
            without importing it). No jaxlib installed counts as not affected.

    Returns:
        True for versions in ``[0.10.0, 0.11.1)``.
    """
    if version is None:
        try:
            version = metadata.version("jaxlib")
        except metadata.PackageNotFoundError:
            return False
    return AFFECTED[0] <= _version_tuple(version) < AFFECTED[1]


def apply_lapack_deadlock_workaround(environ: dict[str, str] | None = None, version: str | None = None) -> bool:
    """Set ``PJRT_NPROC=1`` if the installed jaxlib can deadlock and the user chose no pool size.

    Only effective before the first JAX computation of the process (the CPU client reads the variable when it
    starts); ``import mesagen`` calls it, and the CLI and trainer import mesagen first.

    Args:
        environ: the environment to change (default ``os.environ``).
        version: the jaxlib version (default: the installed one).

    Returns:
        True if the variable was set by this call.
    """
    env = os.environ if environ is None else environ
    if any(v in env for v in POOL_VARIABLES) or not jaxlib_is_affected(version):
        return False
    env["PJRT_NPROC"] = "1"
    return True

"""Issue 7 item 8: jaxlib 0.10's CPU LAPACK kernels deadlock XLA's intra-op pool (mesagen._xla_cpu).

The hangs run in child processes -- the pool size is fixed when a process's CPU client starts -- pinned to
two CPUs (the pool has one thread per CPU of the affinity, and two threads are enough to deadlock), with
``PJRT_NPROC`` / ``NPROC`` removed from their environment so that only ``import mesagen`` can apply the
workaround. Without it both children hang (0 % CPU, every pool thread in ``BlockingCounter::Wait``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mesagen._xla_cpu import apply_lapack_deadlock_workaround, jaxlib_is_affected

ROOT = Path(__file__).resolve().parents[1]

PIN = textwrap.dedent("""
    import os
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[:2])
    import mesagen  # applies the workaround before JAX starts its CPU client
""")

#: Eight independent batched solves side by side in one program: the smallest hang found (jax 0.10.2).
EIGHT_SOLVES = PIN + textwrap.dedent("""
    import jax, jax.numpy as jnp
    a = jnp.eye(20) * 3 + 0.1 * jax.random.normal(jax.random.key(0), (100, 20, 20))
    b = jax.random.normal(jax.random.key(1), (100, 20, 1))
    f = jax.jit(lambda a, b: [jnp.linalg.solve(a + i, b * i) for i in range(8)])
    for i in range(3):
        jax.block_until_ready(f(a, b + i))
    print("finished")
""")

#: The issue's input: a trainer step of a model with two closed-form ridge layers (paper sizes, batch 16).
TWO_CLOSED_FORM_RIDGE_LAYERS = PIN + textwrap.dedent("""
    from mesagen.runtime.config import RunConfig
    from mesagen.runtime.train import Trainer
    cfg = RunConfig.model_validate({
        "name": "two_closed_form", "task": {"state_dim": 10, "seq_len": 50},
        "model": {"tokens": "constructed", "d_model": 40, "heads": 2, "d_k": 20, "clip_activations": 4.0,
                  "init_std": 0.1, "blocks": [{"layer": "generated:ridge", "form": "closed_form"}] * 2},
        "train": {"steps": 2, "batch_size": 16, "schedule": {"peak_lr": 1e-3}, "progress": False},
        "eval": {"batch": 8, "tune_batch": 8}})
    trainer = Trainer(cfg)
    state = trainer.initial_state()
    for _ in range(2):
        state, loss = trainer.step(state)
    print("finished", float(loss))
""")


def _run_child(code: str, timeout: float) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC", "XLA_FLAGS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child process hung for {timeout:.0f} s (XLA:CPU LAPACK deadlock)")
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_eight_independent_solves_finish():
    assert "finished" in _run_child(EIGHT_SOLVES, timeout=120)


def test_trainer_step_with_two_closed_form_ridge_layers_finishes():
    assert "finished" in _run_child(TWO_CLOSED_FORM_RIDGE_LAYERS, timeout=300)


@pytest.mark.parametrize("version,affected", [("0.9.2", False), ("0.10.0", True), ("0.10.2", True),
                                              ("0.11.0", True), ("0.11.1", False), ("0.12.0.1", False),
                                              ("0.10.2rc1", True)])
def test_affected_versions(version, affected):
    assert jaxlib_is_affected(version) is affected


def test_workaround_respects_the_users_choice():
    env: dict[str, str] = {}
    assert apply_lapack_deadlock_workaround(env, "0.10.2") and env == {"PJRT_NPROC": "1"}
    env = {"NPROC": "8"}
    assert not apply_lapack_deadlock_workaround(env, "0.10.2") and env == {"NPROC": "8"}
    env = {"PJRT_NPROC": "4"}
    assert not apply_lapack_deadlock_workaround(env, "0.10.2") and env == {"PJRT_NPROC": "4"}
    env = {}
    assert not apply_lapack_deadlock_workaround(env, "0.11.2") and env == {}

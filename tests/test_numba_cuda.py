"""Run the Numba-CUDA checks in their own processes (pytest shares one process per worker).

* tests/cuda/sim_checks.py with NUMBA_ENABLE_CUDASIM=1 (the simulator must be chosen before numba loads);
* tests/cuda/ptx_checks.py without it, compiling every kernel with ``cuda.compile_ptx`` (no GPU needed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(checks: str, sim: bool, select: str | None = None) -> None:
    env = dict(os.environ)
    env["NUMBA_ENABLE_CUDASIM"] = "1" if sim else "0"
    if not sim:  # the PTX checks inspect the code users get: numba's default optimisation, not conftest's -O0
        env["NUMBA_OPT"] = "3"  # (at -O0 a float32 kernel keeps float64 conversions that -O3 folds away)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")] + [env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:benchmark",
           str(ROOT / "tests" / "cuda" / checks)] + (["-k", select] if select else [])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


#: The simulator checks in groups, one process each, so that pytest-xdist spreads them over the workers; together
#: they select every test of tests/cuda/sim_checks.py (``test_groups_cover_every_check`` holds them to it).
SIM_GROUPS = {
    "forward_backward": "simulator_is_active or forward_and_backward",
    "state_and_widths": "given_state_step or two_widths",
    "races": "race_free or missing_barrier or shared_array",
    "dtypes_nonfinite": "dtype_policy or non_finite",
    "v2_layers": "v2_against_reference",
    "solver_layers": "exact_and_implicit_solver",
    "kernel_layers": "kernel_layers_forward_backward",
}


@pytest.mark.parametrize("group", list(SIM_GROUPS))
def test_cuda_simulator_checks(group):
    _run("sim_checks.py", sim=True, select=SIM_GROUPS[group])


def test_groups_cover_every_check():
    """Every ``test_*`` function of sim_checks.py is selected by exactly one group (a new check cannot be missed)."""
    import ast

    tree = ast.parse((ROOT / "tests" / "cuda" / "sim_checks.py").read_text())
    names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    for name in names:
        hits = [g for g, expr in SIM_GROUPS.items() if any(w in name for w in expr.split(" or "))]
        assert len(hits) == 1, (name, hits)


def test_cuda_ptx_checks():
    _run("ptx_checks.py", sim=False)

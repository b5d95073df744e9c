"""Run the Numba-CUDA checks in their own processes (pytest shares one process per worker).

* tests/cuda/sim_checks.py with NUMBA_ENABLE_CUDASIM=1 (the simulator must be chosen before numba loads);
* tests/cuda/ptx_checks.py without it, compiling every kernel with ``cuda.compile_ptx`` (no GPU needed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(checks: str, sim: bool) -> None:
    env = dict(os.environ)
    env["NUMBA_ENABLE_CUDASIM"] = "1" if sim else "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")] + [env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:benchmark",
                           str(ROOT / "tests" / "cuda" / checks)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_cuda_simulator_checks():
    _run("sim_checks.py", sim=True)


def test_cuda_ptx_checks():
    _run("ptx_checks.py", sim=False)

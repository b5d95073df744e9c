"""Run the Numba-CUDA checks in their own processes (pytest shares one process per worker).

* tests/cuda/sim_checks.py with NUMBA_ENABLE_CUDASIM=1 (the simulator must be chosen before numba loads);
* tests/cuda/ptx_checks.py without it, compiling every kernel with ``cuda.compile_ptx`` (no GPU needed).

Both in groups of one process each (SIM_GROUPS, PTX_GROUPS): each process pays the imports once, and no group is
much longer than the others, which would leave one pytest-xdist worker running it alone at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pytest(checks: str, sim: bool, *args: str) -> subprocess.CompletedProcess:
    """Run pytest on tests/cuda/CHECKS with ``args`` in a child process, with or without the simulator."""
    env = dict(os.environ)
    env["NUMBA_ENABLE_CUDASIM"] = "1" if sim else "0"
    if not sim:  # the PTX checks inspect the code users get: numba's default optimisation, not conftest's -O0
        env["NUMBA_OPT"] = "3"  # (at -O0 a float32 kernel keeps float64 conversions that -O3 folds away)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")] + [env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:benchmark",
           str(ROOT / "tests" / "cuda" / checks), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _run(checks: str, sim: bool, select: str | None = None) -> None:
    proc = _pytest(checks, sim, *(["-k", select] if select else []))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


#: The simulator checks in groups by layer, one process each, so that pytest-xdist spreads them over the workers
#: and each process compiles a layer's Numba CPU module (the backward's reference) once for all of that layer's
#: checks: compiling it costs more CPU than simulating the layer. Each group runs every check of its layers
#: (``[name]`` / ``[name-...]`` select a test's parameters exactly: ``[delta]`` is not ``[gated_delta]``) and
#: the listed checks that take no layer; ``test_groups_cover_every_check`` holds them to selecting every test of
#: tests/cuda/sim_checks.py exactly once.
SIM_GROUPS = {
    "ridge_linear": (("ridge", "linear"), ("simulator_is_active", "two_widths_in_one_process")),
    "gd_gated_delta": (("gd", "gated_delta"), ("shared_array",)),
    "kda_retention": (("kda", "retention"), ()),
    "simple_gla_delta_gla": (("simple_gla", "delta", "gla"), ()),
    "solver_kernel_layers": (("implicit_delta", "rls_forgetting", "mesanet", "softmax", "forgetting_attn"), ()),
}


def _select(group: str) -> str:
    layers, checks = SIM_GROUPS[group]
    return " or ".join([f"[{n}] or [{n}-" for n in layers] + list(checks))


@pytest.mark.parametrize("group", list(SIM_GROUPS))
def test_cuda_simulator_checks(group):
    _run("sim_checks.py", sim=True, select=_select(group))


def test_groups_cover_every_check():
    """Every test of sim_checks.py (as pytest collects it) is selected by exactly one group (a new check or layer
    cannot be missed), matching as ``-k`` does (case-insensitive substrings of the test's name)."""
    proc = _pytest("sim_checks.py", True, "--collect-only")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = [x.split("::", 1)[1] for x in proc.stdout.splitlines() if "sim_checks.py::" in x]
    assert len(names) > 50, proc.stdout[-2000:]
    for name in names:
        hits = [g for g in SIM_GROUPS if any(w.lower() in name.lower() for w in _select(g).split(" or "))]
        assert len(hits) == 1, (name, hits)


#: The PTX checks in two processes (xdist spreads them; one would be the suite's longest test): the sm_90 cases and
#: everything else, complementary selections, so no check can fall between them.
PTX_GROUPS = {"sm90": "sm90", "rest": "not sm90"}


@pytest.mark.parametrize("group", list(PTX_GROUPS))
def test_cuda_ptx_checks(group):
    _run("ptx_checks.py", sim=False, select=PTX_GROUPS[group])

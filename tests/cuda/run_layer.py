"""Run one generated CUDA module in the simulator against expected results (a child process of the tests).

Usage: ``NUMBA_ENABLE_CUDASIM=1 python run_layer.py LAYER_NUMBA_CUDA.py CASE.npz [MODULE CASE ...]`` (any
number of pairs, run in one process). The npz holds the inputs (``q k v do``, ``param_<name>``,
``input_<name>``) and the expected outputs (``o``, ``state_<i>``, ``grad_<name>``, e.g. from the Numba CPU
module of the same spec). Runs forward and backward under the race detector of racecheck.py and exits 1 with a
message on a race or a mismatch beyond 1e-10 relative (of the largest expected entry, at least 1e-3).
"""

from __future__ import annotations

import importlib.util
import os
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
sys.setswitchinterval(1e-6)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import racecheck  # noqa: E402,F401  (patches the simulator)


def main(*paths: str) -> int:
    """Run every (module, case) pair; return the exit status (0: all equal)."""
    if not paths or len(paths) % 2:
        print("usage: run_layer.py MODULE CASE [MODULE CASE ...]")
        return 2
    status = 0
    for n in range(0, len(paths), 2):
        print(paths[n], end=": ")
        status |= run(paths[n], paths[n + 1], f"layer_numba_cuda_under_test_{n // 2}")
    return status


def run(module_path: str, case_path: str, name: str) -> int:
    """Load the module, run the case, return the exit status (0: all equal)."""
    spec = importlib.util.spec_from_file_location(name, module_path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    case = dict(np.load(case_path))
    params = {n[6:]: x for n, x in case.items() if n.startswith("param_")}
    inputs = {n[6:]: x for n, x in case.items() if n.startswith("input_")}
    o, st = m.forward(case["q"], case["k"], case["v"], params, output_final_state=True, **inputs)
    g = m.backward(case["q"], case["k"], case["v"], params, case["do"], dfinal_state=st, **inputs)
    got = {"o": o, **{f"state_{i}": x for i, x in enumerate(st)}}
    got.update({f"grad_{n}": x for n, x in g.items() if n != "dinitial_state"})
    bad = []
    for n, want in case.items():
        if n.startswith(("o", "state_", "grad_")):
            err = np.max(np.abs(got[n] - want)) / max(np.max(np.abs(want)), 1e-3) if want.size else 0.0
            if not np.all(np.isfinite(got[n])) or err > 1e-10:
                bad.append(f"{n}: relative error {err:.3e}")
    print("\n".join(bad) or "ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

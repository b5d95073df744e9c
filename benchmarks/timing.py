"""Shared timing helper of the benchmark scripts (imported as ``from timing import median_seconds``)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time in seconds of ``repeats`` calls of ``fn`` after one warm-up call (compilation).

    ``fn`` must block until its work is done (``jax.block_until_ready``, a CUDA synchronise, ...).
    """
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)

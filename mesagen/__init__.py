"""mesagen: a compiler for in-context-objective sequence layers.

A spec (YAML) states an in-context learning problem -- loss, regression weights, regulariser, model, solver,
readout -- and mesagen derives its solver with sympy, verifies every identity numerically, and emits
standalone JAX and Numba layer modules (von Oswald et al., arXiv 2309.05858).
"""

__version__ = "0.1.0"

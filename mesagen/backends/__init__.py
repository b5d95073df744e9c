"""Code-generation backends, one printer per target, behind one protocol and a registry by name."""

from mesagen.backends.common import CODEGEN_FORMAT, Backend, header
from mesagen.backends.jax_backend import JaxBackend
from mesagen.backends.markdown import MarkdownBackend
from mesagen.backends.numba_cpu import NumbaCpuBackend
from mesagen.backends.numba_cuda import NumbaCudaBackend

#: Registry: backend name → instance. Order = emission order.
BACKENDS: dict[str, Backend] = {
    "jax": JaxBackend(),
    "numba_cpu": NumbaCpuBackend(),
    "numba_cuda": NumbaCudaBackend(),
    "md": MarkdownBackend(),
}

__all__ = ["BACKENDS", "Backend", "CODEGEN_FORMAT", "header"]

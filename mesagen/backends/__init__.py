"""Code-generation backends, one printer per target, behind one protocol and a registry by name."""

from mesagen.backends.common import CODEGEN_FORMAT, Backend, header
from mesagen.backends.jax_backend import JaxBackend
from mesagen.backends.markdown import MarkdownBackend

#: Registry: backend name → instance. Order = emission order.
BACKENDS: dict[str, Backend] = {
    "jax": JaxBackend(),
    "md": MarkdownBackend(),
}

__all__ = ["BACKENDS", "Backend", "CODEGEN_FORMAT", "header"]

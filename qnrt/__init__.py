"""qnrt: run QuickNet-style CNNs from .qnb files with Numba kernels and one
statically planned activation arena. Imports only numpy, numba and pillow."""
from .graph import Graph, GraphError, Node, ValueInfo

__version__ = "0.1.0"
__all__ = ["Session", "Graph", "GraphError", "Node", "ValueInfo", "__version__"]


def __getattr__(name):  # Session pulls in numba; load it only when asked for
    if name in ("Session", "SessionOptions", "NodeArg"):
        from . import session
        return getattr(session, name)
    raise AttributeError(name)

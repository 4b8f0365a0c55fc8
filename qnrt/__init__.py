"""qnrt: run QuickNet-style CNNs from .qnb files with Numba kernels and one
statically planned activation arena. Imports only numpy, numba and pillow."""
import os as _os

from .errors import (ArenaLimitError, FormatError, GraphError, ImageError, InvalidArgument,
                     LimitError, Limits, QnrtError)
from .graph import Graph, Node, ValueInfo
from .threads import OversubscriptionWarning

# Installed, exporters/ and models/ are the subpackages qnrt.exporters and
# qnrt.models (pyproject's package-dir). A source checkout run without
# installing keeps them beside qnrt/: let the same names resolve there.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (not _os.path.isdir(_os.path.join(__path__[0], "exporters"))
        and _os.path.isfile(_os.path.join(_root, "exporters", "__init__.py"))
        and _os.path.isfile(_os.path.join(_root, "pyproject.toml"))):
    __path__.append(_root)

__version__ = "0.1.0"
__all__ = ["Session", "SessionOptions", "Graph", "Node", "ValueInfo", "Limits", "QnrtError",
           "FormatError", "GraphError", "ArenaLimitError", "LimitError", "InvalidArgument",
           "ImageError", "IgnoredOptionWarning", "OversubscriptionWarning", "__version__"]


def __getattr__(name):  # Session pulls in numba; load it only when asked for
    if name in ("Session", "SessionOptions", "NodeArg", "IgnoredOptionWarning"):
        from . import session
        return getattr(session, name)
    raise AttributeError(name)

"""The exceptions qnrt raises for bad input, all exported from `qnrt`.

    QnrtError              the base: catch this to catch them all
    +- FormatError         a file that is not a well-formed .qnb (format.load)
    +- GraphError          a graph the runtime refuses: unknown op, bad shape,
    |  |                   bad wiring (Session(...), Session.run's planning)
    |  +- ArenaLimitError  no schedule fits Session(arena_limit=...)
    |  +- LimitError       a tensor, workspace or arena beyond Session(limits=...)
    +- InvalidArgument     a bad call: unknown input name, wrong shape or dtype
    +- ImageError          an image that cannot be read or preprocessed

Each is also a ValueError, as these were before the hierarchy existed. The
module imports nothing, so `import qnrt` stays light.
"""
from __future__ import annotations

from dataclasses import dataclass


class QnrtError(Exception):
    """Anything qnrt refuses about its input, with a message saying what."""


class FormatError(QnrtError, ValueError):
    """A file that is not a well-formed .qnb file (the message says what and where)."""


class GraphError(QnrtError, ValueError):
    """A graph that cannot be executed: unknown op, bad shape, bad wiring."""


class InvalidArgument(QnrtError, ValueError):
    """Bad input to run(): unknown name, wrong shape or wrong dtype."""


class ImageError(QnrtError, ValueError):
    """An image that cannot be read or preprocessed."""


class ArenaLimitError(GraphError):
    """No schedule fits Session(arena_limit=...); `smallest` is the smallest
    arena reachable for these input shapes, in bytes."""

    def __init__(self, message: str, smallest: int):
        super().__init__(message)
        self.smallest = smallest


class LimitError(GraphError):
    """A shape or size beyond the session's Limits, found before anything is
    allocated; the message names the tensor, the figure and the limit."""


@dataclass(frozen=True)
class Limits:
    """What one session may ask of the machine, checked with Python integers
    (no overflow) before any allocation. The defaults suit a Raspberry Pi with
    1-8 GiB; raise them for bigger machines, lower them for a small device."""
    max_dim: int = 1 << 20  # any one dimension of any tensor
    max_tensor_bytes: int = 1 << 30  # any one activation tensor
    max_workspace_bytes: int = 1 << 30  # any one kernel's scratch
    max_arena_bytes: int = 2 << 30  # the whole activation arena
    max_decoded_bytes: int = 1 << 30  # a file's Deep-Compressed weights, decoded

    def __post_init__(self):
        for name in ("max_dim", "max_tensor_bytes", "max_workspace_bytes", "max_arena_bytes",
                     "max_decoded_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, not {value!r}")


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"

"""Temporary files for atomic writes (write beside the target, then rename).

A temporary file is named `.<target>.<pid>.<random>.tmp`: a writer killed
before its rename (SIGKILL, power loss) leaves one behind, and the next write
to the same target removes those whose process is gone."""
from __future__ import annotations

import os
import tempfile


def temp_beside(path: str, suffix: str = ".tmp") -> tuple[int, str]:
    """(fd, name) of a new temporary file in `path`'s folder; stale ones of
    dead writers to the same target are removed first."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    base = os.path.basename(path)
    remove_stale(folder, base, suffix)
    return tempfile.mkstemp(prefix=f".{base}.{os.getpid()}.", suffix=suffix, dir=folder)


def remove_stale(folder: str, base: str, suffix: str = ".tmp") -> list[str]:
    """Remove the temporary files of writers to `base` that no longer run."""
    prefix, removed = f".{base}.", []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        pid = name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

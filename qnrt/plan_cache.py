"""The schedule search's answers, kept on disk, so that a device process
does not search again for a model and input shape it has planned before.

A key is a hash of everything the answer depends on: the graph's structure
(ops, wiring, attributes, tensor shapes, not weight values), the input
shapes, the kernel choice, the arena limit, and the source of the compiler,
streaming, planner and kernels. The value is the groups (first and last node
and each op's rows per band), which the compiler checks and simulates again:
a stale or edited entry can cost a search, never a wrong plan.

Where: $QNRT_PLAN_DIR, else $XDG_CACHE_HOME/qnrt/plans, else
~/.cache/qnrt/plans. QNRT_PLAN_CACHE=0 turns it off. A folder that cannot be
written is skipped silently.
"""
from __future__ import annotations

import hashlib
import json
import os

from .atomic import temp_beside

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = ("compiler.py", "streaming.py", "planner.py", "plan_cache.py")
FORMAT = 1


def folder() -> str | None:
    if os.environ.get("QNRT_PLAN_CACHE", "1") == "0":
        return None
    if os.environ.get("QNRT_PLAN_DIR"):
        return os.environ["QNRT_PLAN_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "qnrt", "plans")


_source_digest: str | None = None


def _sources() -> str:
    global _source_digest  # one hash per process: the files do not change under it
    if _source_digest is None:
        from .backend import source_hash
        h = hashlib.sha256(source_hash().encode())
        for name in _SOURCES:
            with open(os.path.join(_PACKAGE, name), "rb") as f:
                h.update(f.read())
        _source_digest = h.hexdigest()
    return _source_digest


def key(graph, shapes: dict, choice, arena_limit) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT, _sources(), sorted((k, list(v)) for k, v in shapes.items()),
                         repr(choice), arena_limit]).encode())
    for node in graph.nodes:
        h.update(repr((node.op, node.name, node.inputs, node.outputs,
                       sorted((k, repr(v)) for k, v in node.attrs.items()))).encode())
    for name, value in sorted(graph.initializers.items()):
        h.update(repr((name, tuple(value.shape), str(value.dtype))).encode())
    return h.hexdigest()[:32]


def load(k: str) -> list | None:
    """[(first node, last node, band, rows per op)] or None."""
    where = folder()
    if where is None:
        return None
    try:
        with open(os.path.join(where, f"{k}.json")) as f:
            data = json.load(f)
        return [(g["first"], g["last"], int(g["band"]), tuple(int(r) for r in g["rows"]))
                for g in data["groups"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(k: str, groups) -> None:
    """Write atomically; any failure leaves no file and raises nothing."""
    where = folder()
    if where is None:
        return
    data = {"groups": [{"first": g.links[0].node.name, "last": g.links[-1].node.name,
                        "band": g.band, "rows": list(g.rows)} for g in groups]}
    tmp = None
    try:
        os.makedirs(where, exist_ok=True)
        fd, tmp = temp_beside(os.path.join(where, f"{k}.json"))
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, os.path.join(where, f"{k}.json"))
    except OSError:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)

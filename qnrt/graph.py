"""The one graph IR shared by exporters, runtime and tools.

Tensors are named; a node reads and writes names. Attribute names and
semantics follow ONNX (pads are [x1_begin, x2_begin, ..., x1_end, x2_end]),
so an ONNX graph maps onto this one node for node. Runtime tensors are
float32; int64 appears only in constants (shapes, axes) that are folded away.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Shape = tuple  # of int; a str entry is a symbolic dimension (e.g. "N")


def unique_name(base: str, taken: set) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first not in `taken` (which gets it)."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


from .errors import GraphError  # noqa: E402  (defined with the others, re-exported here)


@dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def where(self) -> str:
        return f"node '{self.name or self.outputs[0]}' ({self.op})"


@dataclass
class ValueInfo:
    name: str
    shape: Shape
    dtype: str = "float32"


@dataclass(frozen=True)
class TensorEncoding:
    """How a file stores an initializer other than raw: the .qnb encoding code
    and its payload, which must decode to exactly the initializer's value
    (qnrt.format.save checks that, so a rewrite that changes the value cannot
    be written with a stale payload)."""
    code: int
    payload: bytes = field(repr=False)


@dataclass
class Graph:
    nodes: list[Node]
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    name: str = "graph"
    encodings: dict[str, TensorEncoding] = field(default_factory=dict)  # initializer name ->

    def copy(self) -> "Graph":
        """A graph that rewrites can change without touching this one (arrays shared)."""
        import copy as _copy
        return Graph([Node(n.op, list(n.inputs), list(n.outputs), _copy.deepcopy(n.attrs), n.name)
                      for n in self.nodes],
                     [ValueInfo(v.name, tuple(v.shape), v.dtype) for v in self.inputs],
                     [ValueInfo(v.name, tuple(v.shape), v.dtype) for v in self.outputs],
                     dict(self.initializers), _copy.deepcopy(self.metadata), self.name,
                     dict(self.encodings))

    def producers(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs if o}

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    users.setdefault(i, []).append(n)
        return users

    def parameter_count(self) -> int:
        return int(sum(a.size for a in self.initializers.values()))

    def fresh_name(self, base: str) -> str:
        taken = set(self.initializers) | {v.name for v in self.inputs}
        taken |= {o for n in self.nodes for o in n.outputs}
        return unique_name(base, taken)

    def validate(self) -> None:
        """Every input is defined before use, names are unique, graph is a DAG."""
        known = set(self.initializers) | {v.name for v in self.inputs}
        for node in self.nodes:
            for i in node.inputs:
                if i and i not in known:
                    raise GraphError(f"{node.where()} reads '{i}', which nothing defines "
                                     "before it")
            for o in node.outputs:
                if o in known:
                    raise GraphError(f"{node.where()} redefines '{o}'")
                known.add(o)
        for out in self.outputs:
            if out.name not in known:
                raise GraphError(f"graph output '{out.name}' is never produced")

    def toposort(self) -> None:
        """Order nodes so every input is produced before it is read (Kahn's
        algorithm, the file's order kept where it is free: O(n log n))."""
        import heapq

        known = set(self.initializers) | {v.name for v in self.inputs} | {""}
        producer = {o: k for k, n in enumerate(self.nodes) for o in n.outputs if o}
        waiting = [0] * len(self.nodes)
        readers: dict[int, list[int]] = {}
        for k, n in enumerate(self.nodes):
            for i in set(n.inputs):
                if i in known:
                    continue
                if i not in producer:
                    raise GraphError(f"{n.where()} reads '{i}', which nothing produces")
                waiting[k] += 1
                readers.setdefault(producer[i], []).append(k)
        ready = [k for k, w in enumerate(waiting) if w == 0]
        heapq.heapify(ready)
        ordered = []
        while ready:
            k = heapq.heappop(ready)
            ordered.append(self.nodes[k])
            for r in readers.get(k, ()):
                waiting[r] -= 1
                if waiting[r] == 0:
                    heapq.heappush(ready, r)
        if len(ordered) < len(self.nodes):
            stuck = next(n for k, n in enumerate(self.nodes) if waiting[k])
            raise GraphError(f"{stuck.where()} has inputs that are never produced "
                             "or form a cycle")
        self.nodes = ordered

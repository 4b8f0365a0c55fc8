"""The compiler: graph + concrete input shapes -> Program.

    shapes     every tensor's shape, from each op's shape rule
    kernels    one kernel variant per node (KernelChoice: auto, reference,
               or forced per op type, node name or variant name)
    lifetimes  the step that writes each tensor and the last that reads it
    sharing    aliases (Reshape & co.) and in-place elementwise outputs share
               their input's buffer
    memory     one arena: tensors and kernel workspaces planned by
               qnrt.planner, which sees only sizes and lifetimes
    views      each tensor and workspace as a view into the arena

A Program runs without allocating activation memory: Session.run copies the
inputs into their views and calls each step's kernel.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .graph import Graph, GraphError
from .ops import Kernel, get_op
from .planner import ALIGN, READ_AFTER_RUN, Buffer, Plan, plan

FLOAT = np.dtype(np.float32).itemsize


@dataclass(frozen=True)
class KernelChoice:
    """Which kernel variant runs each node.

    reference: every op on its reference variant.
    forced: {key: variant name}; a key is an op type ("Conv"), a node name, or
    the variant the automatic choice would take ("conv.dw3x3.padded"). The
    node name wins over the variant name, which wins over the op type.
    """
    reference: bool = False
    forced: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, kernels) -> "KernelChoice":
        """From Session's `kernels` argument: None/"auto", "reference", or a mapping."""
        if kernels is None or kernels == "auto":
            return cls()
        if kernels == "reference":
            return cls(reference=True)
        if isinstance(kernels, Mapping):
            from .ops import all_variants
            known = {v for names in all_variants().values() for v in names}
            for key, name in kernels.items():
                if name != "reference" and name not in known:
                    raise ValueError(f"kernels[{key!r}] = {name!r} is not a kernel variant; "
                                     f"they are {sorted(known)} (or 'reference')")
            return cls(forced=dict(kernels))
        raise ValueError("kernels must be 'auto', 'reference' or a mapping of op type, node "
                         f"name or variant name to a variant name, not {kernels!r}")

    def kernel(self, node, in_shapes, out_shapes, consts) -> Kernel:
        op = get_op(node.op)
        spec = op.spec(node, in_shapes, out_shapes, consts)
        auto = op.reference if self.reference else op.choose(spec)
        name = (self.forced.get(node.name) or self.forced.get(auto.name)
                or self.forced.get(node.op))
        if name == "reference":
            name = op.reference.name
        return op.build(node, spec, variant=name or auto.name)


@dataclass
class Step:
    node_name: str
    op: str
    kernel: Kernel
    inputs: list  # arena views or constant arrays (None: omitted)
    outputs: list
    workspace: np.ndarray | None


@dataclass
class Program:
    """Everything a run needs for one set of input shapes, fixed before it runs."""
    shapes: dict
    steps: list[Step]
    memory: Plan
    tensor_buffer: dict  # tensor name -> the buffer it lives in
    views: dict  # tensor name -> arena view
    arena: np.ndarray = field(repr=False)


def infer_shapes(graph: Graph, input_shapes: dict[str, tuple] | None = None) -> dict[str, tuple]:
    """Concrete shape of every tensor, given concrete input shapes.

    Each op's shape rule lives beside its kernels in qnrt/ops/<op>.
    """
    shapes: dict[str, tuple] = {k: tuple(v.shape) for k, v in graph.initializers.items()}
    for vi in graph.inputs:
        shape = tuple((input_shapes or {}).get(vi.name, vi.shape))
        if any(not isinstance(d, (int, np.integer)) or d < 1 for d in shape):
            raise GraphError(f"input '{vi.name}' needs a concrete shape, got {shape}")
        shapes[vi.name] = tuple(int(d) for d in shape)
    for node in graph.nodes:
        in_shapes = [shapes[i] if i else None for i in node.inputs]
        try:
            outs = get_op(node.op).infer(node, in_shapes, graph.initializers)
        except GraphError:
            raise
        except Exception as exc:  # a rule's assertion becomes a named error
            raise GraphError(f"{node.where()}: cannot infer output shape from inputs "
                             f"{in_shapes}: {exc}") from exc
        for name, shape in zip(node.outputs, outs):
            if any(int(d) < 0 for d in shape):
                raise GraphError(f"{node.where()} gives '{name}' an invalid shape {shape}")
            shapes[name] = tuple(int(d) for d in shape)
    return shapes


def last_uses(graph: Graph) -> dict[str, int]:
    """tensor -> index of the last step that reads it."""
    last = {}
    for i, node in enumerate(graph.nodes):
        for t in node.inputs:
            if t:
                last[t] = i
    return last


def nbytes(shape) -> int:
    return FLOAT * int(np.prod(shape, dtype=np.int64))


def compile_program(graph: Graph, consts: dict, input_shapes: dict,
                    choice: KernelChoice = KernelChoice()) -> Program:
    """The program for `graph` (toposorted, rewritten) at these input shapes."""
    shapes = infer_shapes(graph, input_shapes)
    last_use = last_uses(graph)
    outputs = {v.name for v in graph.outputs}
    tensor_buffer: dict[str, str] = {}
    buffers: dict[str, Buffer] = {}
    members: dict[str, list[str]] = {}

    def end_of(tensor, default):
        return READ_AFTER_RUN if tensor in outputs else last_use.get(tensor, default)

    def new_buffer(tensor, first):
        buffers[tensor] = Buffer(tensor, nbytes(shapes[tensor]), first, end_of(tensor, first))
        tensor_buffer[tensor] = tensor
        members[tensor] = [tensor]

    def join(tensor, buf):  # tensor shares buf's bytes
        tensor_buffer[tensor] = buf
        members[buf].append(tensor)
        buffers[buf].last = max(buffers[buf].last, end_of(tensor, 0))

    for v in graph.inputs:
        new_buffer(v.name, -1)
    kernels = []
    for i, node in enumerate(graph.nodes):
        op = get_op(node.op)
        in_shapes = [shapes[t] if t else None for t in node.inputs]
        out_shapes = [shapes[t] for t in node.outputs]
        kernels.append(choice.kernel(node, in_shapes, out_shapes, consts))
        buf = tensor_buffer.get(node.inputs[0] if node.inputs else "")
        for k, out in enumerate(node.outputs):
            if k == 0 and buf and op.alias:
                join(out, buf)
            elif (k == 0 and buf and op.inplace and out_shapes[0] == in_shapes[0]
                  and all(last_use.get(t) == i and t not in outputs for t in members[buf])):
                join(out, buf)
            else:
                new_buffer(out, i)
    workspaces = {i: Buffer(f"{node.name or node.outputs[0]}:workspace", int(kernel.workspace),
                            i, i)
                  for i, (node, kernel) in enumerate(zip(graph.nodes, kernels))
                  if kernel.workspace}
    memory = plan(list(buffers.values()) + list(workspaces.values()), len(graph.nodes))
    try:
        arena = aligned_empty(memory.arena_bytes)
    except (MemoryError, ValueError):
        raise GraphError(f"the activation arena for inputs {input_shapes} needs "
                         f"{memory.arena_bytes / 2**20:,.1f} MiB, more than this machine "
                         "can allocate") from None
    offsets = memory.offsets()
    views = {t: arena[offsets[b]:offsets[b] + nbytes(shapes[t])]
             .view(np.float32).reshape(shapes[t]) for t, b in tensor_buffer.items()}
    steps = []
    for i, (node, kernel) in enumerate(zip(graph.nodes, kernels)):
        ins = [views[t] if t in views else consts.get(t) if t else None for t in node.inputs]
        outs = [views[t] for t in node.outputs]
        b = workspaces.get(i)  # by step: node names need not be unique
        ws = arena[b.offset:b.offset + b.size] if b else None
        steps.append(Step(node.name, node.op, kernel, ins, outs, ws))
    return Program(shapes, steps, memory, tensor_buffer, views, arena)


def aligned_empty(nbytes: int) -> np.ndarray:
    raw = np.empty(max(nbytes, 1) + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes]

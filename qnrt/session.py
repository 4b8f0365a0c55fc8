"""qnrt.Session: load a .qnb, plan one activation arena per input shape,
run the Numba kernels over it. Shaped like onnxruntime.InferenceSession."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import numpy as np

from . import format as qnb
from .graph import Graph, GraphError, infer_shapes
from .ops import Kernel, get_op
from .planner import ALIGN, Buffer, Plan, aligned, plan
from .rewrite import optimize, quantize_pointwise_int8

_ONNX_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}
AFTER_RUN = 1 << 30  # lifetime end for graph outputs: read after the last step


class InvalidArgument(ValueError):
    """Bad input to run(): unknown name, wrong shape or wrong dtype."""


@dataclass
class NodeArg:
    name: str
    shape: list
    type: str


@dataclass
class ModelMetadata:
    graph_name: str
    producer_name: str
    custom_metadata_map: dict


@dataclass
class Step:
    node_name: str
    op: str
    kernel: Kernel
    inputs: list  # arena views or constant arrays
    outputs: list
    workspace: np.ndarray | None


@dataclass
class Program:
    """Everything a run needs for one set of input shapes, fixed before it runs."""
    shapes: dict
    steps: list[Step]
    memory: Plan
    tensor_buffer: dict  # tensor name -> buffer name
    views: dict  # tensor name -> arena view
    arena: np.ndarray = field(repr=False)


class Session:
    """Session(path_or_bytes_or_graph, sess_options=None, providers=None, *, verify=True,
               input_shapes=None, weights="fp32")

    `input_shapes` ({name: shape}) fixes dynamic dimensions at creation and plans
    the arena then; without it, each new input shape is planned on first use.

    `providers` and `sess_options` are accepted for drop-in compatibility with
    onnxruntime and ignored: qnrt has one provider, its Numba kernels.

    `weights="int8"` quantizes the large pointwise convolutions' weights at
    creation (rewrite.quantize_pointwise_int8: int8 per output channel, the
    float32 arrays dropped): at batch 1 on small images their layers read 4x
    fewer weight bytes; elsewhere they are dequantized once. Default "fp32".
    """

    def __init__(self, model, sess_options=None, providers=None, *, verify: bool = True,
                 input_shapes: dict | None = None, weights: str = "fp32"):
        if weights not in ("fp32", "int8"):
            raise ValueError(f"weights must be 'fp32' or 'int8', not {weights!r}")
        if isinstance(model, Graph):
            graph = model.copy()  # the caller's graph stays as it was
        elif isinstance(model, (bytes, bytearray, memoryview)):
            graph = qnb.loads(bytes(model))
        elif isinstance(model, (str, os.PathLike)):
            graph = qnb.load(os.fspath(model), verify=verify)
        else:
            raise TypeError(f"Session takes a .qnb path, its bytes or a Graph, not {type(model).__name__}")
        graph = optimize(graph)
        if weights == "int8":
            graph = quantize_pointwise_int8(graph)
        graph.validate()
        graph.toposort()
        for node in graph.nodes:
            get_op(node.op)  # unknown ops fail now, not at the first run
        self._graph = graph
        self._output_names = [v.name for v in graph.outputs]
        self._consts = {k: _as_float32(k, v) for k, v in graph.initializers.items()}
        self._programs: dict[tuple, Program] = {}
        self._lock = threading.Lock()
        if input_shapes:  # fix dynamic dimensions now, and plan before the first run
            self._fix_input_shapes(input_shapes)
            self.prepare()

    # -- onnxruntime-shaped API -------------------------------------------------
    def get_inputs(self) -> list[NodeArg]:
        return [NodeArg(v.name, list(v.shape), _ONNX_TYPES.get(v.dtype, v.dtype))
                for v in self._graph.inputs]

    def get_outputs(self) -> list[NodeArg]:
        return [NodeArg(v.name, list(v.shape), _ONNX_TYPES.get(v.dtype, v.dtype))
                for v in self._graph.outputs]

    def get_modelmeta(self) -> ModelMetadata:
        return ModelMetadata(self._graph.name, "qnrt", dict(self._graph.metadata))

    def get_providers(self) -> list[str]:
        return ["NumbaExecutionProvider"]

    @property
    def metadata(self) -> dict:
        return self._graph.metadata

    @property
    def graph(self) -> Graph:
        return self._graph

    def run(self, output_names, input_feed: dict, run_options=None) -> list[np.ndarray]:
        if isinstance(output_names, str):
            output_names = [output_names]
        names = output_names or self._output_names
        for n in names:
            if n not in self._output_names:
                raise InvalidArgument(f"'{n}' is not an output of this model; outputs are "
                                      f"{sorted(self._output_names)}")
        shapes = self._check_feed(input_feed)
        with self._lock:
            program = self.prepare(shapes)
            for name, value in input_feed.items():
                np.copyto(program.views[name], value)
            for step in program.steps:
                step.kernel.run(step.inputs, step.outputs, step.workspace)
            return [program.views[n].copy() for n in names]

    def _fix_input_shapes(self, given: dict) -> None:
        inputs = {v.name: v for v in self._graph.inputs}
        for name, shape in given.items():
            if name not in inputs:
                raise InvalidArgument(f"input_shapes names '{name}'; the model's inputs are "
                                      f"{sorted(inputs)}")
            v, shape = inputs[name], tuple(int(d) for d in shape)
            if len(shape) != len(v.shape) or any(
                    not isinstance(d, str) and d != s for d, s in zip(v.shape, shape)):
                raise InvalidArgument(f"input_shapes gives '{name}' shape {shape}; the model "
                                      f"takes {tuple(v.shape)}")
            v.shape = shape

    # -- planning ----------------------------------------------------------------
    def prepare(self, input_shapes: dict | None = None) -> Program:
        """The program (kernels, arena, offsets) for these input shapes; made once."""
        shapes = self._concrete_input_shapes(input_shapes or {})
        key = tuple(sorted(shapes.items()))
        if key not in self._programs:
            self._programs[key] = self._build(shapes)
        return self._programs[key]

    def _concrete_input_shapes(self, given: dict) -> dict:
        """Given shapes, else the model's; a symbolic dimension defaults to 1, or for
        an image's H and W to the preprocessing size the metadata names."""
        size = list(self._graph.metadata.get("preprocess.size", [])) or [1, 1]
        out = {}
        for v in self._graph.inputs:
            shape = list(given.get(v.name, v.shape))
            for k, d in enumerate(shape):
                if isinstance(d, str):
                    shape[k] = int(size[k - 2]) if len(shape) == 4 and k >= 2 else 1
            out[v.name] = tuple(int(d) for d in shape)
        return out

    def _check_feed(self, feed: dict) -> dict:
        if not isinstance(feed, dict):
            raise InvalidArgument("input_feed must be a dict of input name -> numpy array")
        expected = {v.name: v for v in self._graph.inputs}
        extra = sorted(set(feed) - set(expected))
        missing = sorted(set(expected) - set(feed))
        if extra or missing:
            raise InvalidArgument(f"inputs do not match the model: missing {missing}, "
                                  f"unknown {extra}; the model takes {sorted(expected)}")
        shapes = {}
        for name, value in feed.items():
            v = expected[name]
            if not isinstance(value, np.ndarray):
                raise InvalidArgument(f"input '{name}' must be a numpy array, "
                                      f"not {type(value).__name__}")
            if value.dtype != np.float32:
                raise InvalidArgument(f"input '{name}' has dtype {value.dtype}; the model "
                                      f"takes float32 (use x.astype(np.float32))")
            if value.ndim != len(v.shape) or any(
                    not isinstance(d, str) and d != s for d, s in zip(v.shape, value.shape)):
                raise InvalidArgument(f"input '{name}' has shape {value.shape}; the model "
                                      f"takes {tuple(v.shape)}")
            if value.size == 0:
                raise InvalidArgument(f"input '{name}' is empty (shape {value.shape})")
            shapes[name] = value.shape
        return shapes

    def _build(self, input_shapes: dict) -> Program:
        graph, consts = self._graph, self._consts
        shapes = infer_shapes(graph, input_shapes)
        last_use = _last_uses(graph)
        outputs = {v.name for v in graph.outputs}
        tensor_buffer: dict[str, str] = {}
        buffers: dict[str, Buffer] = {}
        members: dict[str, list[str]] = {}

        def new_buffer(tensor, first):
            buffers[tensor] = Buffer(tensor, 4 * int(np.prod(shapes[tensor])), first,
                                     AFTER_RUN if tensor in outputs else last_use.get(tensor, first))
            tensor_buffer[tensor] = tensor
            members[tensor] = [tensor]

        def join(tensor, buf):  # tensor shares buf's bytes
            tensor_buffer[tensor] = buf
            members[buf].append(tensor)
            end = AFTER_RUN if tensor in outputs else last_use.get(tensor, 0)
            buffers[buf].last = max(buffers[buf].last, end)

        for v in graph.inputs:
            new_buffer(v.name, -1)
        kernels = []
        for i, node in enumerate(graph.nodes):
            op = get_op(node.op)
            in_shapes = [shapes[t] if t else None for t in node.inputs]
            out_shapes = [shapes[t] for t in node.outputs]
            kernel = op.prepare(node, in_shapes, out_shapes, consts)
            kernels.append(kernel)
            src = node.inputs[0] if node.inputs else ""
            buf = tensor_buffer.get(src)
            for k, out in enumerate(node.outputs):
                if k == 0 and buf and op.alias:
                    join(out, buf)
                elif (k == 0 and buf and op.inplace and out_shapes[0] == in_shapes[0]
                      and all(last_use.get(t) == i and t not in outputs for t in members[buf])):
                    join(out, buf)
                else:
                    new_buffer(out, i)
        kernels = _lean_kernels(kernels, list(buffers.values()))
        workspaces = {i: Buffer(f"{node.name or node.outputs[0]}:workspace",
                                int(kernel.workspace), i, i)
                      for i, (node, kernel) in enumerate(zip(graph.nodes, kernels))
                      if kernel.workspace}
        memory = plan(list(buffers.values()) + list(workspaces.values()), len(graph.nodes))
        try:
            arena = _aligned_empty(memory.arena_bytes)
        except MemoryError:
            raise GraphError(f"the activation arena for inputs {input_shapes} needs "
                             f"{memory.arena_bytes / 2**20:,.1f} MiB, more than this machine "
                             "can allocate") from None
        offsets = memory.offsets()
        views = {t: arena[offsets[b]:offsets[b] + 4 * int(np.prod(shapes[t]))]
                 .view(np.float32).reshape(shapes[t]) for t, b in tensor_buffer.items()}
        steps = []
        for i, (node, kernel) in enumerate(zip(graph.nodes, kernels)):
            ins = [views[t] if t in views else consts.get(t) if t else None for t in node.inputs]
            outs = [views[t] for t in node.outputs]
            b = workspaces.get(i)  # by step: node names need not be unique
            ws = arena[b.offset:b.offset + b.size] if b else None
            steps.append(Step(node.name, node.op, kernel, ins, outs, ws))
        return Program(shapes, steps, memory, tensor_buffer, views, arena)


def _lean_kernels(kernels: list[Kernel], tensors: list[Buffer]) -> list[Kernel]:
    """Swap in a kernel's low-workspace fallback wherever its scratch memory would
    make that step the arena's peak: the tensors alone set the bound we keep."""
    live = [0] * len(kernels)
    for b in tensors:
        for s in range(max(b.first, 0), min(b.last, len(kernels) - 1) + 1):
            live[s] += aligned(b.size)
    bound = max(live, default=0)
    out = []
    for step, kernel in enumerate(kernels):
        while kernel.fallback is not None and live[step] + aligned(kernel.workspace) > bound:
            kernel = kernel.fallback
        out.append(kernel)
    return out


def _last_uses(graph: Graph) -> dict[str, int]:
    last = {}
    for i, node in enumerate(graph.nodes):
        for t in node.inputs:
            if t:
                last[t] = i
    return last


def _aligned_empty(nbytes: int) -> np.ndarray:
    raw = np.empty(max(nbytes, 1) + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes]


def _as_float32(name: str, value: np.ndarray) -> np.ndarray:
    if value.dtype == np.float32 or value.dtype.kind in "iub":
        return value
    if value.dtype.kind == "f":
        return value.astype(np.float32)
    raise GraphError(f"constant '{name}' has unsupported dtype {value.dtype}")

"""qnrt.Session: load a .qnb, compile one program (kernels + planned arena)
per input shape, run it. Shaped like onnxruntime.InferenceSession; the
compiling is qnrt.compiler's."""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from . import format as qnb
from .compiler import KernelChoice, Program, compile_program
from .graph import Graph, GraphError
from .ops import get_op
from .rewrite import optimize, quantize_pointwise_int8
from .threads import WorkerPool, blas_threads, resolve_threads, warn_oversubscribed

_ONNX_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}


from .errors import InvalidArgument, Limits, QnrtError  # noqa: E402  (re-exported here)
from .validate import validate  # noqa: E402


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


class IgnoredOptionWarning(UserWarning):
    """An ONNX Runtime option qnrt accepts for compatibility but does not act on."""


@dataclass
class SessionOptions:
    """The ONNX Runtime SessionOptions fields people set. intra_op_num_threads
    is the Session's num_threads (0: every core); qnrt runs the steps one after
    another, so an inter_op_num_threads other than 0 or 1 is named in one
    IgnoredOptionWarning. An onnxruntime SessionOptions object is accepted too."""
    intra_op_num_threads: int = 0
    inter_op_num_threads: int = 0
    log_severity_level: int = 2


_OWN_PROVIDERS = ("CPUExecutionProvider", "NumbaExecutionProvider")


def _warn_ignored(sess_options, providers) -> None:
    names = [p if isinstance(p, str) else p[0] for p in providers or []]
    other = [p for p in names if p not in _OWN_PROVIDERS]
    if other:
        warnings.warn(f"qnrt runs its own CPU kernels; providers {other} are ignored",
                      IgnoredOptionWarning, stacklevel=3)
    if sess_options is not None and getattr(sess_options, "inter_op_num_threads", 0) not in (0, 1):
        warnings.warn("qnrt runs the steps one after another: sess_options "
                      "inter_op_num_threads is ignored (intra_op_num_threads splits each step)",
                      IgnoredOptionWarning, stacklevel=3)


class Session:
    """Session(path_or_bytes_or_graph, sess_options=None, providers=None, *, verify=True,
               input_shapes=None, weights="fp32", kernels="auto", max_programs=8,
               arena_limit=None, streaming=True, limits=None, num_threads=None)

    `input_shapes` ({name: shape}) fixes dynamic dimensions at creation and plans
    the arena then; without it, each new input shape is planned on first use.

    `providers` and `sess_options` are accepted for drop-in compatibility with
    onnxruntime: qnrt has one provider, its own CPU kernels, and a provider or
    option it cannot honour is named in one IgnoredOptionWarning.

    `num_threads` (else sess_options.intra_op_num_threads; 0 or neither: every
    core the process may use, at most qnrt.threads.MAX_PARTS): the threads a
    run uses, the caller's and num_threads - 1 workers of this Session's own.
    Large kernels split into parts that run on them; outputs are the same bits
    for every thread count. While a run is in progress numpy's BLAS runs on
    one thread (qnrt.threads.BlasThreads). Runs of several Sessions at once
    that add up to more threads than cores get one OversubscriptionWarning.

    `arena_limit` (bytes) picks the fastest schedule whose activation arena
    fits, streaming more of the network band by band (qnrt.streaming); if none
    fits, preparing raises ArenaLimitError naming the smallest arena reachable.
    Without it, the lowest-peak schedule that costs at most a few percent of
    speed runs. `streaming=False` runs every node whole (the unfused plan);
    outputs are bit-identical either way.

    `limits` (qnrt.Limits: max_dim, max_tensor_bytes, max_workspace_bytes,
    max_arena_bytes) bounds what planning may allocate; beyond them it raises
    qnrt.LimitError before allocating anything.

    `max_programs` bounds the per-shape program cache (each holds its arena):
    past it, the least recently used program is dropped, so a stream of
    changing input sizes does not grow the process without bound.

    `weights="int8"` quantizes the large pointwise convolutions' weights at
    creation (rewrite.quantize_pointwise_int8: int8 per output channel, the
    float32 arrays dropped): at batch 1 on small images their layers read 4x
    fewer weight bytes; elsewhere they are dequantized once. Default "fp32".

    `kernels` chooses kernel variants: "auto" (the fastest that applies),
    "reference" (every op on its reference: slow, for checking), or a mapping
    from an op type, node name or variant name to a variant name, e.g.
    {"Conv": "conv.im2col"} or {"conv.dw3x3.padded": "conv.reference"}. An
    unknown variant is a ValueError; one that does not apply to a node is a
    GraphError naming the node. `Session.kernel_names()` says what ran.
    """

    def __init__(self, model, sess_options=None, providers=None, *, verify: bool = True,
                 input_shapes: dict | None = None, weights: str = "fp32", kernels="auto",
                 max_programs: int = 8, arena_limit: int | None = None,
                 streaming: bool = True, limits: Limits | None = None,
                 num_threads: int | None = None):
        if weights not in ("fp32", "int8"):
            raise ValueError(f"weights must be 'fp32' or 'int8', not {weights!r}")
        if arena_limit is not None and (isinstance(arena_limit, bool)
                                        or not isinstance(arena_limit, int) or arena_limit < 1):
            raise ValueError(f"arena_limit must be a positive number of bytes, not {arena_limit!r}")
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(f"limits must be a qnrt.Limits, not {type(limits).__name__}")
        self._arena_limit = arena_limit
        self._streaming = bool(streaming)
        self._limits = limits or Limits()
        if not isinstance(max_programs, int) or max_programs < 1:
            raise ValueError(f"max_programs must be a positive int, not {max_programs!r}")
        _warn_ignored(sess_options, providers)
        if num_threads is None and sess_options is not None:
            num_threads = getattr(sess_options, "intra_op_num_threads", 0)
        self._threads = resolve_threads(num_threads)
        self._pool: WorkerPool | None = None  # its threads start at the first split step
        self._warned_oversubscribed = False
        self._max_programs = max_programs
        self._kernel_choice = KernelChoice.parse(kernels)
        if isinstance(model, Graph):
            graph = model.copy()  # the caller's graph stays as it was
        elif isinstance(model, (bytes, bytearray, memoryview)):
            graph = qnb.loads(bytes(model), max_decoded_bytes=self._limits.max_decoded_bytes)
        elif isinstance(model, (str, os.PathLike)):
            graph = qnb.load(os.fspath(model), verify=verify,
                             max_decoded_bytes=self._limits.max_decoded_bytes)
        else:
            raise TypeError(f"Session takes a .qnb path, its bytes or a Graph, not {type(model).__name__}")
        validate(graph, self._limits.max_dim)  # before any rewrite or kernel sees it
        for node in graph.nodes:
            get_op(node.op)  # unknown ops fail now, not at the first run
        graph.toposort()
        graph.validate()
        with _refusals("prepare the graph"):
            graph = optimize(graph)
            if weights == "int8":
                graph = quantize_pointwise_int8(graph)
            graph.validate()
            graph.toposort()
        self._graph = graph
        self._output_names = [v.name for v in graph.outputs]
        self._consts = {k: _as_float32(k, v) for k, v in graph.initializers.items()}
        self._programs: OrderedDict[tuple, Program] = OrderedDict()  # least recent first
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
    def kernel_backend(self) -> str:
        """"aot" (the `qnrt compile` build: no numba in the process) or "jit"."""
        from .backend import backend
        return backend().name

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
        input_feed = self._as_arrays(input_feed)
        shapes = self._check_feed(input_feed)
        with self._lock:
            program = self.prepare(shapes)
            for name, value in input_feed.items():
                np.copyto(program.views[name], value)
            blas = blas_threads()
            if blas.enter(self._threads) and not self._warned_oversubscribed:
                self._warned_oversubscribed = True
                warn_oversubscribed(self._threads)
            try:
                for step in program.steps:
                    step.kernel.run(step.inputs, step.outputs, step.workspace)
            finally:
                blas.exit(self._threads)
            return [program.views[n].copy() for n in names]

    @property
    def num_threads(self) -> int:
        """The threads a run uses (the caller's included)."""
        return self._threads

    def _worker_pool(self) -> WorkerPool | None:
        if self._threads > 1 and self._pool is None:
            self._pool = WorkerPool(self._threads)
            weakref.finalize(self, self._pool.close)  # the workers end with the Session
        return self._pool

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
        """The program (kernels, arena, offsets) for these input shapes: made once,
        kept while it is among the `max_programs` most recently used."""
        shapes = self._concrete_input_shapes(input_shapes or {})
        key = tuple(sorted(shapes.items()))
        if key in self._programs:
            self._programs.move_to_end(key)
        else:
            with _refusals(f"plan inputs {shapes}"):
                program = compile_program(self._graph, self._consts, shapes,
                                          self._kernel_choice, streaming=self._streaming,
                                          arena_limit=self._arena_limit, limits=self._limits,
                                          pool=self._worker_pool())
            self._programs[key] = program
            while len(self._programs) > self._max_programs:
                self._programs.popitem(last=False)
        return self._programs[key]

    def kernel_names(self, input_shapes: dict | None = None) -> list[tuple[str, str]]:
        """(node name, kernel variant) of every node at these input shapes (a
        streamed group's nodes each with their own variant)."""
        return [m for s in self.prepare(input_shapes).steps for m in s.members]

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

    @staticmethod
    def _as_arrays(feed):
        """Nested lists of numbers become float32 arrays, as ONNX Runtime takes them."""
        if not isinstance(feed, dict):
            return feed
        out = {}
        for name, value in feed.items():
            if isinstance(value, (list, tuple)):
                try:
                    value = np.asarray(value, dtype=np.float32)
                except (ValueError, TypeError):
                    raise InvalidArgument(f"input '{name}': a list must be a rectangular "
                                          "nest of numbers") from None
            out[name] = value
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


@contextlib.contextmanager
def _refusals(doing: str):
    """The last line of defence of the documented-exceptions contract: a
    malformed graph that gets past validation and trips a rewrite or a shape
    rule in an unforeseen way is a GraphError, not a stray KeyError."""
    try:
        yield
    except (QnrtError, MemoryError):
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, ZeroDivisionError,
            OverflowError) as exc:
        raise GraphError(f"cannot {doing}: the graph is malformed "
                         f"({type(exc).__name__}: {exc})") from exc


def _as_float32(name: str, value: np.ndarray) -> np.ndarray:
    if value.dtype == np.float32 or value.dtype.kind in "iub":
        return value
    if value.dtype.kind == "f":
        return value.astype(np.float32)
    raise GraphError(f"constant '{name}' has unsupported dtype {value.dtype}")

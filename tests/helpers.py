"""Shared test helpers: ONNX Runtime as the reference engine, the one
closeness rule, and the tools/ scripts loaded as modules."""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name: str):
    """tools/<name>.py as a module (loaded once per process; registered in
    sys.modules first, where dataclasses look their module up)."""
    key = f"qnrt_tools_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(ROOT, "tools",
                                                                         f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


def assert_close(ours, ref, rel: float = 1e-4, per_element: bool = False) -> float:
    """Max abs error at most `rel` x the output scale (max(1, max |ref|)), or with
    per_element, at most `rel` x max(1, |ref|) element by element. Returns the error."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    if ref.size == 0:
        return 0.0
    err = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    if per_element:
        bound = rel * np.maximum(1.0, np.abs(ref.astype(np.float64)))
        assert np.all(err <= bound), (f"max abs error {err.max():.3g} "
                                      f"(|ref| max {np.abs(ref).max():.3g})")
        return float(err.max())
    scale = max(1.0, float(np.max(np.abs(ref))))
    assert err.max() <= rel * scale, f"max abs error {err.max():.3g} > {rel:g} x scale {scale:.3g}"
    return float(err.max())


def ort_session(model, threads: int = 1) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for an onnx ModelProto, on `threads` threads."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def ort_run(graph_or_model, feed: dict, outputs=None) -> list[np.ndarray]:
    """Run a qnrt Graph (exported to ONNX) or an onnx ModelProto."""
    import onnx

    if isinstance(graph_or_model, onnx.ModelProto):
        model = graph_or_model
    else:
        from qnrt.exporters.onnx_export import to_onnx
        model = to_onnx(graph_or_model)
    return ort_session(model).run(outputs, feed)


def _dtype(a):
    return {np.dtype(np.float32): TensorProto.FLOAT,
            np.dtype(np.int64): TensorProto.INT64}[np.asarray(a).dtype]


def ort_run_nodes(nodes, inputs, initializers=None, outputs=("y",), opset=OPSET, threads=1):
    """Run a graph of onnx NodeProtos. `inputs`/`initializers` map names to
    arrays; returns the list of output arrays."""
    initializers = initializers or {}
    graph = helper.make_graph(
        nodes, "ref",
        [helper.make_tensor_value_info(k, _dtype(v), list(np.shape(v))) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return ort_session(model, threads).run(list(outputs), dict(inputs))


def one_node(op, inputs, initializers=None, attrs=None, input_names=None, opset=OPSET,
             n_outputs=1):
    """Run one `op` node. input_names (default: inputs then initializers, in
    dict order) may contain "" for an omitted optional input."""
    initializers = initializers or {}
    names = input_names if input_names is not None else [*inputs, *initializers]
    outs = ["y"] + [f"y{i}" for i in range(1, n_outputs)]
    node = helper.make_node(op, names, outs, **(attrs or {}))
    return ort_run_nodes([node], inputs, initializers, outs, opset)

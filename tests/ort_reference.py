"""Reference results from onnxruntime for small hand-built ONNX graphs."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _dtype(a):
    return {np.dtype(np.float32): TensorProto.FLOAT,
            np.dtype(np.int64): TensorProto.INT64}[np.asarray(a).dtype]


def ort_run(nodes, inputs, initializers=None, outputs=("y",), opset=OPSET, threads=1):
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
    return session(model, threads).run(list(outputs), dict(inputs))


def session(model, threads=1):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def one_node(op, inputs, initializers=None, attrs=None, input_names=None, opset=OPSET,
             n_outputs=1):
    """Run one `op` node. input_names (default: inputs then initializers, in
    dict order) may contain "" for an omitted optional input."""
    initializers = initializers or {}
    names = input_names if input_names is not None else [*inputs, *initializers]
    outs = ["y"] + [f"y{i}" for i in range(1, n_outputs)]
    node = helper.make_node(op, names, outs, **(attrs or {}))
    return ort_run([node], inputs, initializers, outs, opset)

"""Shared test helpers: ONNX Runtime as the reference engine."""
from __future__ import annotations

import numpy as np


def ort_run(graph_or_model, feed: dict, outputs=None) -> list[np.ndarray]:
    import onnx
    import onnxruntime as ort

    if isinstance(graph_or_model, onnx.ModelProto):
        model = graph_or_model
    else:
        from exporters.onnx_export import to_onnx
        model = to_onnx(graph_or_model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(outputs, feed)


def assert_close(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> float:
    """Max abs error under `rel` of the output scale; returns the error."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = max(1.0, float(np.max(np.abs(ref))))
    err = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64))))
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x scale {scale:.3g}"
    return err

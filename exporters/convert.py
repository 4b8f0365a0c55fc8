"""One entry point for every source format: import, fix shapes, attach
metadata, optimize, check that the runtime can plan it, write .qnb atomically."""
from __future__ import annotations

import os
from collections import Counter

from qnrt import format as qnb
from qnrt.image import ImageError, check_preprocess
from qnrt.graph import Graph, GraphError
from qnrt.rewrite import optimize
from qnrt.validate import validate

PREPROCESS_KEYS = {"size": int, "mean": float, "std": float, "scale": float,
                   "mode": str, "resample": str, "channel_order": str, "native_size": int}


def load_any(path: str, input_shape=None, report: Counter | None = None) -> Graph:
    """An IR graph from .onnx, .h5/.keras, .qnb, or a QuickNet PyTorch state dict
    (.safetensors, .pt/.pth/.bin: exporters.torch_weights). ONNX is cleaned up
    on import (exporters.cleanup); `report` receives what that did."""
    ext = os.path.splitext(path)[1].lower()
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    if ext == ".onnx":
        from .onnx_checks import check_model, malformed, survives_shape_inference
        from .onnx_import import from_onnx
        import onnx

        try:
            model = onnx.load(path)
        except Exception as exc:  # protobuf raises its own DecodeError types
            raise GraphError(f"{path}: not a readable ONNX file ({type(exc).__name__}: "
                             f"{exc})") from None
        check_model(model, path)  # exporters.onnx_checks: every field the importer reads
        survives_shape_inference(model, path, input_shape)
        shapes = None
        if input_shape:
            inits = {i.name for i in model.graph.initializer}
            first = next(i.name for i in model.graph.input if i.name not in inits)
            shapes = {first: tuple(input_shape)}
        with malformed(path):
            return from_onnx(model, shapes, cleanup=True, report=report)
    if ext in (".h5", ".hdf5", ".keras"):
        from .keras_h5 import from_h5

        return from_h5(path, input_shape=input_shape)
    if ext == ".qnb":
        return qnb.load(path)
    if ext in (".safetensors", ".pt", ".pth", ".bin"):
        from .torch_weights import load_quicknet

        try:
            return load_quicknet(path)  # H, W symbolic; finalize applies input_shape
        except (KeyError, TypeError, IndexError) as exc:
            raise GraphError(f"{path}: not a QuickNet state dict ({type(exc).__name__}: "
                             f"{exc})") from None
    raise GraphError(f"{path}: unknown model format '{ext}' (expected .onnx, .h5, .qnb, "
                     ".safetensors or .pt/.pth/.bin)")


def parse_preprocess(items) -> dict:
    meta = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("preprocess.")
        if not sep or key not in PREPROCESS_KEYS:
            raise GraphError(f"--preprocess '{item}': expected KEY=VALUE with KEY one of "
                             f"{', '.join(PREPROCESS_KEYS)}")
        kind = PREPROCESS_KEYS[key]
        try:
            if kind is str:
                meta[f"preprocess.{key}"] = value
            elif key in ("size", "mean", "std", "native_size"):
                meta[f"preprocess.{key}"] = [kind(v) for v in value.split(",")]
            else:
                meta[f"preprocess.{key}"] = kind(value)
        except ValueError:
            raise GraphError(f"--preprocess '{item}': '{value}' is not a valid {key}") from None
    try:
        check_preprocess(meta)
    except ImageError as exc:
        raise GraphError(f"--preprocess: {exc}") from None
    return meta


def finalize(graph: Graph, input_shape=None, labels=None, metadata=None, log=None) -> dict:
    """Optimize in place and make sure the runtime can plan the graph; returns a summary."""
    before = Counter(n.op for n in graph.nodes)
    if input_shape:
        graph.inputs[0].shape = tuple(input_shape)
    if labels:
        graph.metadata["labels"] = list(labels)
    graph.metadata.update(metadata or {})
    for v in graph.outputs:
        if v.shape is None:
            raise GraphError(f"output '{v.name}' has no shape, and ONNX shape inference "
                             "could not find one")
    validate(graph)  # before the rewrites: they assume well-formed nodes
    optimize(graph)
    graph.validate()
    graph.toposort()
    for v in graph.inputs + graph.outputs:  # the runtime's kernels are float32 throughout
        if v.dtype != "float32":
            raise GraphError(f"'{v.name}' is {v.dtype}; qnrt runs models whose inputs and "
                             "outputs are float32")
    classes = graph.outputs[0].shape[-1] if graph.outputs and graph.outputs[0].shape else None
    if labels and isinstance(classes, int) and len(labels) != classes:
        raise GraphError(f"{len(labels)} labels given for a model with {classes} classes")
    after = Counter(n.op + ("+" + n.attrs["activation"] if n.attrs.get("activation") else "")
                    for n in graph.nodes)
    from qnrt.session import Session

    session = Session(graph)  # fails on an unsupported op
    symbolic = any(isinstance(d, str) for v in graph.inputs for d in v.shape[1:])
    if symbolic and "preprocess.size" not in graph.metadata:
        if log:
            log("input size is dynamic and no preprocess size given: kernels are checked "
                "when a Session first sees a shape")
    else:
        session.prepare()  # every kernel validates its node before anything is written
    summary = {"nodes_before": sum(before.values()), "nodes_after": len(graph.nodes),
               "ops_before": dict(before), "ops_after": dict(after),
               "parameters": graph.parameter_count()}
    if log:
        log(f"{summary['nodes_before']} nodes -> {summary['nodes_after']} after folding "
            f"and fusion; {summary['parameters']:,} parameters")
        log("ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(after.items())))
    return summary


def convert(src: str, dst: str, input_shape=None, labels=None, preprocess=(),
            log=None, nchw_input: bool = False) -> dict:
    """Any model -> .qnb. ONNX is cleaned up on import (exporters.cleanup). The
    model's input interface is kept (an NHWC input stays NHWC, its Transpose to
    NCHW being the one layout change); nchw_input=True instead makes such an
    input NCHW and drops the Transpose, so callers must feed NCHW."""
    from .cleanup import summary as cleanup_summary

    report: Counter = Counter()
    check_destination(dst)
    graph = load_any(src, input_shape, report)
    if nchw_input:
        from .cleanup import nchw_input as to_nchw

        changed = to_nchw(graph, report)
        if log:
            log(f"inputs now NCHW: {', '.join(changed)}" if changed else
                "--nchw-input: no NHWC input followed by Transpose(0, 3, 1, 2) found")
        if changed and input_shape:  # the given shape was in the model's own layout
            n, h, w, c = input_shape
            input_shape = (n, c, h, w)
    label_list = read_labels(labels) if labels else None
    summary = finalize(graph, input_shape, label_list, parse_preprocess(preprocess), log)
    # standalone BatchNormalization after a Conv is folded by qnrt.rewrite.optimize
    report["batch norms fused"] += (summary["ops_before"].get("BatchNormalization", 0)
                                    - summary["ops_after"].get("BatchNormalization", 0))
    summary["cleanup"] = dict(+report)
    if log:
        source = report.get("nodes in source")
        log("cleanup" + (f" ({source} source nodes -> {summary['nodes_before']})" if source
                         else "") + ": " + cleanup_summary(report))
    size = qnb.save(graph, dst)
    if log:
        log(f"wrote {dst} ({size / 2**20:.2f} MiB)")
    summary["bytes"] = size
    return summary


def read_labels(path: str) -> list[str]:
    """One class label per non-blank line of a UTF-8 text file."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def check_destination(dst: str) -> None:
    """Fail before any work if the output cannot be written there."""
    folder = os.path.dirname(os.path.abspath(dst))
    if os.path.isdir(dst):
        raise GraphError(f"{dst} is a folder; give the .qnb file to write")
    if not os.path.isdir(folder):
        raise GraphError(f"cannot write {dst}: folder {folder} does not exist")

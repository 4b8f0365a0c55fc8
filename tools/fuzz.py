"""Seeded mutational fuzzing of what a device is sent: .qnb files run through
`qnrt.Session` and ONNX files through `qnrt convert`.

Every case is made from (seed, case number) alone, so any finding can be
replayed with `--replay N`. Cases run in a pool of worker processes, each
under an address-space limit (RLIMIT_AS) and watched by a per-case time limit:
a worker that crashes or overruns is recorded and replaced, and the campaign
goes on. The contract checked: only documented exceptions (qnrt.QnrtError and
its subclasses) come out; no crash, no hang, no MemoryError (the Limits must
refuse a size before anything that large is allocated).

    python tools/fuzz.py --cases 100000 --seed 1            # both targets
    python tools/fuzz.py --target onnx --cases 2000 --workers 2
    python tools/fuzz.py --target qnb --seed 1 --replay 1234  # one case, in process

Mutation kinds (.qnb): bitflip and truncate (bytes, both checksums recomputed),
field (a header or tensor-table field set to an edge value, checksums
recomputed), swap (two tensors' data exchanged), semantic (a graph edit: wiring,
arity, attribute types and ranges, metadata, cycles, ops), synthetic (a random
small graph with random attributes). ONNX: proto (one structural edit of the
ModelProto: data types, attributes, shapes, names, initializers, opsets),
bytes (bit flips and truncations of the serialized file), synthetic (a random
small ONNX graph).
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import wait

import numpy as np

QNB_KINDS = ("bitflip", "truncate", "field", "swap", "semantic", "synthetic")
ONNX_KINDS = ("proto", "proto", "bytes", "synthetic")
EDGE_INTS = [0, 1, 2, 3, -1, -2, 7, 2**31 - 1, 2**32 - 1, 2**62, 2**63 - 1, -2**63]
EDGE_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, float("inf"), float("-inf"),
               float("nan")]
# Session limits for fuzzed models: small enough that two workers under RLIMIT_AS
# never get near the machine's memory; anything the limits let through must fit
FUZZ_LIMITS = dict(max_dim=1 << 16, max_tensor_bytes=64 << 20, max_workspace_bytes=64 << 20,
                   max_arena_bytes=256 << 20, max_decoded_bytes=64 << 20)
HEADROOM = 1536 << 20  # address space a worker may add to what it had after warming up


# ------------------------------------------------------------------ .qnb mutations

def _u64(buf, at):
    return struct.unpack_from("<Q", buf, at)[0]


def refresh_checksums(buf: bytearray) -> bytearray:
    """Both CRCs recomputed (docs/qnb-format.md), so the damage reaches the parsers."""
    if len(buf) < 88:
        return buf
    data_off, data_n = _u64(buf, 64), _u64(buf, 72)
    if data_off + data_n <= len(buf):
        struct.pack_into("<I", buf, 84, zlib.crc32(bytes(buf[data_off:data_off + data_n])))
    if data_off <= len(buf):
        zeroed = bytes(buf[:80]) + b"\0" * 8 + bytes(buf[88:data_off])
        struct.pack_into("<I", buf, 80, zlib.crc32(zeroed))
    return buf


def _graph_bytes(graph) -> bytes:
    from qnrt import format as qnb

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "g.qnb")
        qnb.save(graph, path)
        with open(path, "rb") as f:
            return f.read()


_BASES: dict = {}


def qnb_bases() -> list:
    """(name, Graph, bytes) of the models mutated: a small QuickNet, the same
    Deep-Compressed, and a handful of one-op graphs."""
    if "qnb" not in _BASES:
        from qnrt.exporters.compress import compress_graph
        from qnrt.models import quicknet

        small = quicknet.build(width=0.125, labels=[str(i) for i in range(10)])
        dc = small.copy()
        compress_graph(dc, min_size=256)
        bases = [("quicknet", small), ("quicknet_dc", dc)]
        rng = np.random.default_rng(12345)
        for k in range(6):
            g = synthetic_graph(rng, sane=True)
            if g is not None:
                bases.append((f"synthetic{k}", g))
        _BASES["qnb"] = [(name, g, _graph_bytes(g)) for name, g in bases]
    return _BASES["qnb"]


SYNTH_OPS = ["Conv", "MaxPool", "AveragePool", "Relu", "LeakyRelu", "Sigmoid", "Clip",
             "Resize", "Pad", "Softmax", "Transpose", "Reshape", "Flatten", "Add", "Mul",
             "Div", "Concat", "Split", "Slice", "ReduceMean", "GlobalAveragePool", "Gemm",
             "BatchNormalization", "ConvTranspose", "Reciprocal", "Sqrt", "Log", "Pow",
             "HardSwish", "PRelu", "Upsample", "Squeeze", "Unsqueeze", "MatMul"]


def _pick(rng, items):
    return items[int(rng.integers(0, len(items)))]


def _ints(rng, n, lo, hi, edgy):
    if edgy and rng.random() < 0.3:
        return [int(_pick(rng, EDGE_INTS)) for _ in range(n)]
    return [int(v) for v in rng.integers(lo, hi + 1, n)]


def synthetic_graph(rng, sane: bool = False):
    """A random chain of 1-3 ops on an NCHW input, with attributes drawn from
    legal values and (unless sane) edge values."""
    from qnrt.graph import Graph, Node, ValueInfo

    edgy = not sane
    n, c, h, w = 1, int(rng.integers(1, 5)), int(rng.integers(1, 10)), int(rng.integers(1, 10))
    inits, nodes, x = {}, [], "x"
    for k in range(int(rng.integers(1, 4))):
        op, y, name = _pick(rng, SYNTH_OPS), f"t{k}", f"n{k}"
        attrs, ins = {}, [x]
        if op in ("Conv", "ConvTranspose"):
            kh, kw = _ints(rng, 2, 1, 3, edgy)
            group = _pick(rng, [1, c]) if op == "Conv" else 1
            cout = int(rng.integers(1, 5)) * (group if group > 0 else 1)
            wshape = (cout, c // max(group, 1), kh, kw) if op == "Conv" else (c, cout, kh, kw)
            if all(0 < d < 64 for d in wshape):
                inits[f"w{k}"] = rng.standard_normal(wshape).astype(np.float32)
            else:
                inits[f"w{k}"] = np.ones((1, 1, 1, 1), np.float32)
            ins.append(f"w{k}")
            if rng.random() < 0.5:
                inits[f"b{k}"] = rng.standard_normal(abs(cout) % 64 or 1).astype(np.float32)
                ins.append(f"b{k}")
            attrs = {"kernel_shape": [kh, kw], "strides": _ints(rng, 2, 1, 3, edgy),
                     "pads": _ints(rng, 4, 0, 2, edgy), "dilations": _ints(rng, 2, 1, 2, edgy),
                     "group": group}
            c = cout
        elif op in ("MaxPool", "AveragePool"):
            attrs = {"kernel_shape": _ints(rng, 2, 1, 3, edgy), "strides": _ints(rng, 2, 1, 3, edgy),
                     "pads": _ints(rng, 4, 0, 1, edgy), "ceil_mode": int(rng.integers(0, 2))}
            if op == "AveragePool":
                attrs["count_include_pad"] = int(rng.integers(0, 2))
            if rng.random() < 0.3:
                attrs["dilations"] = _ints(rng, 2, 1, 2, edgy)
            if rng.random() < 0.2:
                attrs["auto_pad"] = _pick(rng, ["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET",
                                                "bogus"])
        elif op in ("Resize", "Upsample"):
            scales = [1.0, 1.0] + [float(_pick(rng, [0.5, 1.0, 2.0, 3.0, 1.5]))
                                   for _ in range(2)]
            if edgy and rng.random() < 0.3:
                scales[int(rng.integers(0, 4))] = float(_pick(rng, EDGE_FLOATS + [2.0**40]))
            inits[f"s{k}"] = np.array(scales, np.float32)
            if op == "Resize":
                ins += ["", f"s{k}"]
                attrs = {"mode": _pick(rng, ["nearest", "linear", "cubic"]),
                         "coordinate_transformation_mode": _pick(rng, ["half_pixel",
                                                                       "asymmetric",
                                                                       "align_corners"])}
            else:
                ins.append(f"s{k}")
        elif op == "Pad":
            inits[f"p{k}"] = np.array(_ints(rng, 8, 0, 2, edgy), np.int64)
            ins.append(f"p{k}")
            attrs = {"mode": _pick(rng, ["constant", "reflect", "edge", "wrap"])}
        elif op in ("Softmax", "Flatten", "Concat", "Split"):
            attrs = {"axis": int(rng.integers(-4, 4)) if not edgy or rng.random() < 0.7
                     else _pick(rng, EDGE_INTS)}
            if op == "Concat":
                ins.append(x)
        elif op == "Transpose":
            attrs = {"perm": [int(v) for v in rng.permutation(4)] if rng.random() < 0.8
                     else _ints(rng, 4, -1, 5, edgy)}
        elif op == "Reshape":
            inits[f"r{k}"] = np.array(_pick(rng, [[1, -1], [0, -1], [-1], [2, -1], [0, 0, -1],
                                                  [2**62 + 1, 64]]), np.int64)
            ins.append(f"r{k}")
        elif op in ("Squeeze", "Unsqueeze"):
            inits[f"a{k}"] = np.array([int(rng.integers(-4, 5))], np.int64)
            ins.append(f"a{k}")
        elif op == "Slice":
            for part, vals in (("st", [0, 1, -1]), ("en", [2, -1, 2**62]), ("ax", [2, 3, -1])):
                inits[f"{part}{k}"] = np.array([_pick(rng, vals)], np.int64)
                ins.append(f"{part}{k}")
        elif op == "ReduceMean":
            attrs = {"axes": [int(rng.integers(-4, 4))], "keepdims": int(rng.integers(0, 2))}
        elif op in ("Add", "Mul", "Div", "Pow", "PRelu"):
            shape = _pick(rng, [(1,), (c, 1, 1), (1, c, 1, 1), (c,), (2, 3)])
            inits[f"k{k}"] = rng.standard_normal(shape).astype(np.float32)
            ins.append(f"k{k}")
        elif op in ("Gemm", "MatMul"):
            inits[f"m{k}"] = rng.standard_normal((w, int(rng.integers(1, 6)))).astype(np.float32)
            ins.append(f"m{k}")
            if op == "Gemm":
                attrs = {"transB": int(rng.integers(0, 2))}
        elif op == "BatchNormalization":
            for part in "sbmv":
                inits[f"{part}{k}"] = np.abs(rng.standard_normal(c)).astype(np.float32)
                ins.append(f"{part}{k}")
            attrs = {"epsilon": 1e-5}
        elif op == "LeakyRelu":
            attrs = {"alpha": float(_pick(rng, EDGE_FLOATS)) if edgy else 0.1}
        elif op == "Clip":
            inits[f"lo{k}"] = np.array(-1.0, np.float32)
            inits[f"hi{k}"] = np.array(_pick(rng, [1.0, float("nan"), -2.0]), np.float32)
            ins += [f"lo{k}", f"hi{k}"]
        nodes.append(Node(op, ins, [y], attrs, name))
        x = y
    return Graph(nodes, [ValueInfo("x", (n, int(rng.integers(1, 5)) if edgy and rng.random() < 0.1
                                         else nodes and _first_c(nodes, inits) or 1, h, w))],
                 [ValueInfo(x, ())], inits, {}, "synthetic")


def _first_c(nodes, inits):
    """Input channels the first node's weights expect (so sane graphs run)."""
    node = nodes[0]
    if node.op == "Conv" and len(node.inputs) > 1:
        w = inits[node.inputs[1]]
        return int(w.shape[1]) * int(node.attrs.get("group", 1) or 1)
    if node.op == "ConvTranspose" and len(node.inputs) > 1:
        return int(inits[node.inputs[1]].shape[0])
    if node.op == "BatchNormalization":
        return int(inits[node.inputs[1]].shape[0])
    return 3


def mutate_qnb(rng, kind: str):
    """(bytes, base name) of one mutated .qnb."""
    name, graph, raw = _pick(rng, qnb_bases())
    buf = bytearray(raw)
    if kind == "bitflip":
        limit = _u64(buf, 64) if rng.random() < 0.8 else len(buf)  # mostly the structure
        for _ in range(int(rng.integers(1, 5))):
            buf[int(rng.integers(0, limit))] ^= int(rng.integers(1, 256))
        return bytes(refresh_checksums(buf)), name
    if kind == "truncate":
        cut = int(rng.integers(0, len(buf)))
        buf = buf[:cut]
        if rng.random() < 0.5 and cut >= 88:  # a consistent-looking shorter file
            data_off = _u64(buf, 64)
            if data_off <= cut:
                struct.pack_into("<Q", buf, 72, cut - data_off)
            refresh_checksums(buf)
        return bytes(buf), name
    if kind == "field":
        at = _field_offsets(buf, rng)
        width = _pick(rng, [1, 4, 8])
        value = int(_pick(rng, EDGE_INTS)) & ((1 << (8 * width)) - 1)
        if at + width <= len(buf):
            buf[at:at + width] = value.to_bytes(width, "little")
        return bytes(refresh_checksums(buf)), name
    if kind == "swap":
        g = graph.copy()
        names = list(g.initializers)
        if len(names) >= 2:
            a, b = (names[int(i)] for i in rng.choice(len(names), 2, replace=False))
            g.initializers[a], g.initializers[b] = g.initializers[b], g.initializers[a]
            for t in (a, b):
                g.encodings.pop(t, None) if hasattr(g, "encodings") else None
        return _save_or_none(g), name
    if kind == "semantic":
        return _save_or_none(semantic_edit(graph, rng)), name
    g = synthetic_graph(rng)
    return _save_or_none(g), "synthetic"


def _save_or_none(graph):
    try:
        return _graph_bytes(graph)
    except Exception:  # the writer refusing a graph is not what is fuzzed here
        return None


def _field_offsets(buf, rng) -> int:
    """A byte position of a structural field: the fixed header, or a length,
    dtype, rank, dim, offset or size inside the tensor table or graph block."""
    if rng.random() < 0.3:
        return int(rng.integers(0, 80))
    start, size = _u64(buf, 48), _u64(buf, 56)
    if rng.random() < 0.5 and size:
        return int(start + rng.integers(0, size))
    gstart, gsize = _u64(buf, 32), _u64(buf, 40)
    return int(gstart + rng.integers(0, max(gsize, 1)))


WRONG_ATTRS = ["Relu", [1.5, 2], 3.5, -7, 2**40, [0] * 9, "", [-1, -1], float("nan"),
               [2**32 - 1] * 4, [2**62] * 2, [0, 0], [1], 0, 2**63 - 1]
WRONG_SIZES = [3.5, "big", [0, 0], [2**62, 2], [1], ["a", "b"]]
OPS = ["Relu", "Conv", "MaxPool", "Gemm", "Softmax", "Reshape", "Add", "Concat", "PRelu",
       "BatchNormalization", "Resize", "AveragePool", "Pad", "Split", "Nope"]
ATTR_KEYS = ["alpha", "axis", "pads", "strides", "group", "kernel_shape", "epsilon",
             "dilations", "activation", "ceil_mode", "auto_pad", "perm", "mode", "scales",
             "count_include_pad", "axes", "keepdims", "transB"]


def semantic_edit(graph, rng):
    """One semantic edit: the kinds of damage a file sent to a device can carry."""
    g = graph.copy()
    node = g.nodes[int(rng.integers(0, len(g.nodes)))]
    constants = list(g.initializers)
    kind = int(rng.integers(0, 13))
    if kind == 0 and node.inputs:  # an input dropped
        del node.inputs[int(rng.integers(0, len(node.inputs)))]
    elif kind == 1:  # no output, or an unnamed one
        node.outputs = [] if rng.random() < 0.5 else [""]
    elif kind == 2:  # an attribute of the wrong type or range
        node.attrs[_pick(rng, ATTR_KEYS)] = copy.copy(_pick(rng, WRONG_ATTRS))
    elif kind == 3 and constants:  # a node writing a constant's name
        node.outputs[0] = _pick(rng, constants)
    elif kind == 4:  # the graph output is a constant or the input
        g.outputs[0].name = _pick(rng, constants + [g.inputs[0].name])
    elif kind == 5:  # more outputs than the op makes
        node.outputs = node.outputs + ["extra1", "extra2"]
    elif kind == 6:  # metadata the runtime reads, of the wrong type
        g.metadata["preprocess.size"] = _pick(rng, WRONG_SIZES)
    elif kind == 7 and len(node.inputs) >= 2:  # inputs swapped
        node.inputs[0], node.inputs[1] = node.inputs[1], node.inputs[0]
    elif kind == 8 and constants:  # a constant of the wrong size
        t = _pick(rng, constants)
        g.initializers[t] = np.ones(int(rng.integers(1, 5)), np.float32)
        g.encodings.pop(t, None)
    elif kind == 9:  # a cycle
        node.inputs.append(node.outputs[0] if node.outputs else "nowhere")
    elif kind == 10:  # another op under the same wiring
        node.op = _pick(rng, OPS)
    elif kind == 11:  # an input dimension at an edge
        dims = list(g.inputs[0].shape)
        dims[int(rng.integers(0, len(dims)))] = _pick(rng, [0, 2**16 + 1, 2**31, 2**63 - 1, "N"])
        g.inputs[0].shape = tuple(dims)
    else:  # a node duplicated
        g.nodes.insert(int(rng.integers(0, len(g.nodes))), copy.deepcopy(node))
    return g


def run_qnb(data: bytes, rng) -> None:
    import qnrt

    session = qnrt.Session(data, limits=qnrt.Limits(**FUZZ_LIMITS))
    shapes = {v.name: [d if isinstance(d, int) else int(rng.integers(1, 4)) for d in v.shape]
              for v in session.get_inputs()}
    session.prepare(shapes)  # as a caller would: the limits judge the shapes before any input
    feeds = {}                # is allocated
    for name, shape in shapes.items():
        x = rng.standard_normal(shape, dtype=np.float32)
        if rng.random() < 0.2 and x.size:
            x.reshape(-1)[rng.integers(0, x.size, 3)] = _pick(rng, [np.inf, -np.inf, np.nan, 0])
        feeds[name] = x
    session.run(None, feeds)


# ------------------------------------------------------------------ ONNX mutations

def onnx_bases() -> list:
    """(name, serialized ModelProto): QuickNet as the exporter writes it, and a
    converter-style graph (shape arithmetic, Cast, Constant, Identity, BN, Resize)."""
    if "onnx" not in _BASES:
        from qnrt.exporters.onnx_export import to_onnx
        from qnrt.models import quicknet

        bases = [("quicknet", to_onnx(quicknet.build(width=0.125)).SerializeToString()),
                 ("torchlike", torchlike_model().SerializeToString())]
        rng = np.random.default_rng(54321)
        for k in range(4):
            bases.append((f"synthetic{k}", synthetic_onnx(rng, sane=True).SerializeToString()))
        _BASES["onnx"] = bases
    return _BASES["onnx"]


def torchlike_model(opset: int = 13):
    """What torch.onnx writes for a small net: Constant shapes, Shape/Gather/
    Concat/Reshape flatten, Cast, Identity, BN, Resize, Pad, Gemm, Softmax."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name, a):
        return numpy_helper.from_array(np.asarray(a), name)
    inits = [init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
             init("b", np.zeros(4, np.float32)),
             init("bn_s", np.ones(4, np.float32)), init("bn_b", np.zeros(4, np.float32)),
             init("bn_m", np.zeros(4, np.float32)), init("bn_v", np.ones(4, np.float32)),
             init("scales", np.array([1, 1, 2, 2], np.float32)),
             init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
             init("fc_w", rng.standard_normal((5, 4 * 6 * 6)).astype(np.float32)),
             init("fc_b", np.zeros(5, np.float32)), init("zero", np.array([0], np.int64)),
             init("minus1", np.array([-1], np.int64))]
    n = helper.make_node
    nodes = [
        n("Cast", ["x"], ["xc"], to=TensorProto.FLOAT, name="cast"),
        n("Conv", ["xc", "w", "b"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
        n("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], epsilon=1e-5,
          name="bn"),
        n("Relu", ["bn"], ["r"], name="relu"),
        n("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        n("Resize", ["p", "", "scales"], ["up"], mode="nearest", name="resize"),
        n("Pad", ["up", "pads"], ["pd"], mode="constant", name="pad"),
        n("AveragePool", ["pd"], ["ap"], kernel_shape=[3, 3], strides=[2, 2], name="apool"),
        n("Identity", ["ap"], ["id"], name="identity"),
        n("Shape", ["id"], ["shape"], name="shape"),
        n("Gather", ["shape", "zero"], ["batch"], axis=0, name="gather"),
        n("Concat", ["batch", "minus1"], ["target"], axis=0, name="concat"),
        n("Reshape", ["id", "target"], ["flat"], name="reshape"),
        n("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
        n("Softmax", ["logits"], ["y"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(nodes, "torchlike",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def synthetic_onnx(rng, sane: bool = False):
    """A random small graph as ONNX. Edge-valued graphs are written without the
    exporter's ONNX shape inference: that is what `qnrt convert` must survive
    (its C++ aborts the process on some overflowed dims)."""
    from qnrt.exporters.onnx_export import _Exporter, to_onnx

    for _ in range(20):
        g = synthetic_graph(rng, sane=sane)
        try:
            return to_onnx(g) if sane else _Exporter(g, 17).model()
        except Exception:  # the exporter refusing a nonsense graph: draw again
            continue
    return torchlike_model()


ONNX_EDITS = ("data_type", "drop_attr", "attr_type", "attr_value", "output_shape",
              "no_inputs", "lying_init", "raw_truncate", "op_type", "drop_node", "dup_node",
              "rename_input", "empty_name", "opset", "dims", "input_dims", "bad_utf8",
              "graph_attr", "elem_type", "domain", "int64_input")


def mutate_onnx(rng, kind: str):
    """(bytes, base name) of one mutated ONNX file."""
    import onnx
    from onnx import AttributeProto, helper

    name, raw = _pick(rng, onnx_bases())
    if kind == "synthetic":
        return synthetic_onnx(rng).SerializeToString(), "synthetic"
    if kind == "bytes":
        buf = bytearray(raw)
        if rng.random() < 0.5:
            for _ in range(int(rng.integers(1, 6))):
                buf[int(rng.integers(0, len(buf)))] ^= int(rng.integers(1, 256))
        else:
            buf = buf[:int(rng.integers(0, len(buf)))]
        return bytes(buf), name
    m = onnx.ModelProto()
    m.ParseFromString(raw)
    g = m.graph
    edit = _pick(rng, ONNX_EDITS)
    node = g.node[int(rng.integers(0, len(g.node)))] if len(g.node) else None
    if edit == "data_type" and len(g.initializer):
        t = g.initializer[int(rng.integers(0, len(g.initializer)))]
        t.data_type = int(_pick(rng, [0, 2, 7, 8, 9, 10, 11, 16, 17, 21, 23, 99, 9999]))
    elif edit == "drop_attr" and node is not None and len(node.attribute):
        del node.attribute[int(rng.integers(0, len(node.attribute)))]
    elif edit == "attr_type" and node is not None and len(node.attribute):
        a = node.attribute[int(rng.integers(0, len(node.attribute)))]
        a.type = int(_pick(rng, [AttributeProto.FLOAT, AttributeProto.INT, AttributeProto.STRING,
                                 AttributeProto.TENSOR, AttributeProto.GRAPH,
                                 AttributeProto.FLOATS, AttributeProto.INTS,
                                 AttributeProto.STRINGS, AttributeProto.SPARSE_TENSOR, 0]))
    elif edit == "attr_value" and node is not None:
        key = _pick(rng, ["kernel_shape", "pads", "strides", "dilations", "group", "axis",
                          "perm", "to", "epsilon", "alpha", "mode", "auto_pad", "ceil_mode",
                          "transB", "axes", "keepdims", "coordinate_transformation_mode"])
        value = _pick(rng, [int(_pick(rng, EDGE_INTS)), [int(_pick(rng, EDGE_INTS))] * 2,
                            [int(_pick(rng, EDGE_INTS))] * 4, float(_pick(rng, EDGE_FLOATS)),
                            "bogus", [], [0.5, 2.0]])
        for a in list(node.attribute):
            if a.name == key:
                node.attribute.remove(a)
        try:
            node.attribute.append(helper.make_attribute(key, value))
        except (ValueError, TypeError):
            pass
    elif edit == "output_shape" and len(g.output):
        v = g.output[int(rng.integers(0, len(g.output)))]
        if rng.random() < 0.5:
            v.type.tensor_type.ClearField("shape")
        else:
            v.ClearField("type")
    elif edit == "no_inputs":
        if rng.random() < 0.5:
            del g.input[:]
        else:  # every input also an initializer
            for v in g.input:
                t = g.initializer.add()
                t.CopyFrom(onnx.numpy_helper.from_array(np.zeros(1, np.float32), v.name))
    elif edit == "lying_init" and len(g.initializer):
        t = g.initializer[int(rng.integers(0, len(g.initializer)))]
        if len(t.dims):
            t.dims[int(rng.integers(0, len(t.dims)))] = int(_pick(rng, [0, 3, 1000, 2**40, -1]))
        else:
            t.dims.append(7)
    elif edit == "raw_truncate" and len(g.initializer):
        t = g.initializer[int(rng.integers(0, len(g.initializer)))]
        if t.raw_data:
            t.raw_data = t.raw_data[:int(rng.integers(0, len(t.raw_data)))]
        else:
            del t.float_data[:]
            del t.int64_data[:]
    elif edit == "op_type" and node is not None:
        node.op_type = _pick(rng, ["Relu", "Conv", "MaxPool", "Cast", "Resize", "Gather",
                                   "Loop", "If", "Nope", "Shape", "Reshape", "Constant", ""])
    elif edit == "drop_node" and node is not None:
        g.node.remove(node)
    elif edit == "dup_node" and node is not None:
        extra = g.node.add()
        extra.CopyFrom(node)
    elif edit == "rename_input" and node is not None and len(node.input):
        node.input[int(rng.integers(0, len(node.input)))] = _pick(rng, ["missing", "", "y"])
    elif edit == "empty_name" and node is not None and len(node.output):
        node.output[0] = ""
    elif edit == "opset":
        del m.opset_import[:]
        if rng.random() < 0.8:
            m.opset_import.append(helper.make_opsetid(_pick(rng, ["", "ai.onnx", "com.x"]),
                                                      int(_pick(rng, [1, 6, 7, 10, 11, 99]))))
    elif edit == "dims" and len(g.initializer):
        t = g.initializer[int(rng.integers(0, len(g.initializer)))]
        del t.dims[:]
        t.dims.extend(int(d) for d in rng.integers(0, 4, int(rng.integers(0, 7))))
    elif edit == "input_dims" and len(g.input):
        shape = g.input[0].type.tensor_type.shape
        if len(shape.dim):
            d = shape.dim[int(rng.integers(0, len(shape.dim)))]
            value = _pick(rng, [0, -1, 2**40, 2**63 - 1, "N", ""])
            if isinstance(value, str):
                d.dim_param = value
            else:
                d.dim_value = value
    elif edit == "bad_utf8":
        return _bad_utf8(m, rng), name
    elif edit == "graph_attr" and node is not None:
        sub = helper.make_graph([], "sub", [], [])
        node.attribute.append(helper.make_attribute(
            _pick(rng, ["to", "kernel_shape", "body", "axis"]), sub))
    elif edit == "elem_type" and len(g.input):
        g.input[0].type.tensor_type.elem_type = int(_pick(rng, [0, 2, 7, 10, 11, 16, 99]))
    elif edit == "domain" and node is not None:
        node.domain = _pick(rng, ["com.microsoft", "ai.onnx.ml", "x"])
    elif edit == "int64_input" and node is not None and len(node.input):
        t = g.initializer.add()
        t.CopyFrom(onnx.numpy_helper.from_array(np.array([2**62, -1], np.int64),
                                                node.input[-1]))
    return m.SerializeToString(), name


def _bad_utf8(m, rng) -> bytes:
    """The model with one name's bytes replaced by invalid UTF-8 of the same length."""
    names = [n.name for n in m.graph.node if n.name] + [v.name for v in m.graph.input]
    names += [t.name for t in m.graph.initializer]
    raw = m.SerializeToString()
    if not names:
        return raw
    target = _pick(rng, names).encode()
    bad = b"\xff" * len(target)
    return raw.replace(target, bad, 1) if rng.random() < 0.5 else raw.replace(target, bad)


def run_onnx(data: bytes, rng, workdir: str) -> None:
    from qnrt.exporters.convert import convert

    src, dst = os.path.join(workdir, "m.onnx"), os.path.join(workdir, "m.qnb")
    with open(src, "wb") as f:
        f.write(data)
    shape = None
    if rng.random() < 0.3:
        shape = _pick(rng, [(1, 3, 12, 12), (1, 3, 32, 32), (2, 3, 16, 16), (1, 3)])
    convert(src, dst, input_shape=shape)


# ------------------------------------------------------------------ one case

@dataclass
class Outcome:
    case: int
    kind: str
    status: str  # ran, refused, leak, memory, crash, timeout, skipped
    detail: str = ""  # the exception type and where it came from (defects)
    seconds: float = 0.0
    peak_mib: float = 0.0


def _selftest(case: int) -> None:
    """Target "selftest": cases that crash, hang and over-allocate, so the tests
    can check that the pool catches each (case % 5: 0 runs, 1 is refused)."""
    import qnrt

    what = case % 5
    if what == 1:
        raise qnrt.GraphError("refused")
    if what == 2:
        os.kill(os.getpid(), signal.SIGSEGV)
    if what == 3:
        time.sleep(3600)
    if what == 4:
        bytearray(64 << 30)


def make_case(target: str, seed: int, case: int):
    """(kind, input bytes or None, rng for running) of case `case`."""
    if target == "selftest":
        return "selftest", b"", None
    rng = np.random.default_rng([seed, case, 0 if target == "qnb" else 1])
    kinds = QNB_KINDS if target == "qnb" else ONNX_KINDS
    kind = kinds[case % len(kinds)]
    data, base = (mutate_qnb if target == "qnb" else mutate_onnx)(rng, kind)
    return f"{kind}:{base}", data, rng


def _where(exc: BaseException) -> str:
    """The innermost frame inside qnrt or exporters: where a leak comes from."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/qnrt/" in f.filename or "/exporters/" in f.filename]
    f = (ours or frames or [None])[-1]
    if f is None:
        return "?"
    parts = f.filename.split(os.sep)
    return f"{'/'.join(parts[-2:])}:{f.lineno} in {f.name}"


def run_case(target: str, seed: int, case: int, workdir: str) -> Outcome:
    import qnrt

    start = time.perf_counter()
    try:
        kind, data, rng = make_case(target, seed, case)
    except Exception as exc:  # a bug of the fuzzer, reported as such
        return Outcome(case, "?", "fuzzer-bug", f"{type(exc).__name__}: {exc} at {_where(exc)}")
    if data is None:
        return Outcome(case, kind, "skipped")
    status, detail = "ran", ""
    try:
        if target == "selftest":
            _selftest(case)
        else:
            (run_qnb(data, rng) if target == "qnb" else run_onnx(data, rng, workdir))
    except qnrt.QnrtError as exc:
        status, detail = "refused", type(exc).__name__
        if not str(exc):
            status, detail = "leak", f"{type(exc).__name__} without a message"
    except MemoryError as exc:
        status, detail = "memory", f"MemoryError at {_where(exc)}"
    except Exception as exc:  # noqa: BLE001  (the contract: nothing else escapes)
        status, detail = "leak", f"{type(exc).__name__}: {str(exc)[:160]} at {_where(exc)}"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Outcome(case, kind, status, detail, time.perf_counter() - start, peak)


# ------------------------------------------------------------------ the pool

def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _warm_up(target: str, workdir: str) -> None:
    import qnrt

    if target == "qnb":
        for _, _, data in qnb_bases():
            try:
                run_qnb(data, np.random.default_rng(0))
            except qnrt.QnrtError:
                pass
    else:
        for _, data in onnx_bases():
            try:
                run_onnx(data, np.random.default_rng(0), workdir)
            except qnrt.QnrtError:
                pass


def _worker(conn, target: str, seed: int, headroom: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import warnings

    warnings.simplefilter("ignore")
    workdir = tempfile.mkdtemp(prefix="qnrt-fuzz-")
    if target != "selftest":  # warm up: imports, and the base models' kernels compiled
        _warm_up(target, workdir)  # (a cold JIT compile is not a case's time)
    limit = _address_space() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send(("ready", limit))
    while True:
        case = conn.recv()
        if case is None:
            break
        conn.send(("done", run_case(target, seed, case, workdir)))
    conn.close()


@dataclass
class Report:
    target: str
    seed: int
    counts: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    defects: dict = field(default_factory=dict)  # class -> [case numbers]
    slowest: float = 0.0
    peak_mib: float = 0.0

    def add(self, o: Outcome) -> None:
        self.counts[o.status] += 1
        self.kinds[o.kind.split(":")[0]] += 1
        self.slowest = max(self.slowest, o.seconds)
        self.peak_mib = max(self.peak_mib, o.peak_mib)
        if o.status not in ("ran", "refused", "skipped"):
            self.defects.setdefault(f"{o.status}: {o.detail}", []).append(o.case)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict:
        return {"target": self.target, "seed": self.seed, "cases": self.total,
                "outcomes": dict(self.counts), "kinds": dict(self.kinds),
                "defects": {k: {"count": len(v), "cases": v[:20]}
                            for k, v in self.defects.items()},
                "slowest_case_s": round(self.slowest, 3),
                "worker_peak_rss_mib": round(self.peak_mib, 1)}


def run_pool(target: str, seed: int, cases, workers: int = 2, timeout: float = 20.0,
             headroom: int = HEADROOM, progress=None, recycle: int = 400) -> Report:
    """Run `cases` (case numbers) of `target` in `workers` processes; each case
    within `timeout` seconds (wall, after the worker's warm-up) and RLIMIT_AS."""
    ctx = mp.get_context("spawn")  # no inherited state (threads, locks) from the parent
    report = Report(target, seed)
    todo = list(cases)[::-1]
    live: dict = {}  # connection -> [process, case or None, started, done count]

    def start():
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, target, seed, headroom), daemon=True)
        p.start()
        child.close()
        live[parent] = [p, None, time.monotonic(), 0, False]

    def give(conn):
        entry = live[conn]
        if not todo or entry[3] >= recycle:
            conn.send(None)
            entry[0].join(5)
            del live[conn]
            conn.close()
            if todo:
                start()
            return
        entry[1], entry[2] = todo.pop(), time.monotonic()
        conn.send(entry[1])

    for _ in range(min(workers, max(len(todo), 1))):
        start()
    while live:
        ready = wait(list(live), timeout=1.0)
        for conn in ready:
            entry = live.get(conn)
            if entry is None:
                continue
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                p, case = entry[0], entry[1]
                p.join(5)
                del live[conn]
                code = p.exitcode
                if case is not None:
                    why = f"signal {-code}" if code and code < 0 else f"exit {code}"
                    report.add(Outcome(case, "?", "crash", f"worker died ({why})"))
                elif not entry[4]:
                    raise RuntimeError(f"a fuzz worker died while warming up (exit {code})")
                if todo:
                    start()
                continue
            if msg[0] == "ready":
                entry[4] = True
                give(conn)
            else:
                report.add(msg[1])
                entry[3] += 1
                entry[1] = None
                if progress:
                    progress(report)
                give(conn)
        now = time.monotonic()
        for conn, entry in list(live.items()):
            if entry[1] is not None and now - entry[2] > timeout:
                entry[0].kill()
                entry[0].join(5)
                report.add(Outcome(entry[1], "?", "timeout", f"over {timeout:g} s"))
                del live[conn]
                conn.close()
                if todo:
                    start()
    return report


def replay(target: str, seed: int, case: int) -> Outcome:
    """One case in this process, with the traceback of anything undocumented."""
    import qnrt

    kind, data, rng = make_case(target, seed, case)
    print(f"case {case}: {kind}, {len(data) if data else 0} bytes")
    with tempfile.TemporaryDirectory() as d:
        try:
            (run_qnb(data, rng) if target == "qnb" else run_onnx(data, rng, d))
            print("ran")
        except qnrt.QnrtError as exc:
            print(f"refused: {type(exc).__name__}: {exc}")
        except BaseException:
            traceback.print_exc()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split(
        "\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=["qnb", "onnx", "both"], default="both",
                    help="what to fuzz (default: both, cases split 3:1 qnb:onnx)")
    ap.add_argument("--cases", type=int, default=10_000, help="number of cases (default 10000)")
    ap.add_argument("--seed", type=int, default=0, help="campaign seed (default 0)")
    ap.add_argument("--first", type=int, default=0, help="first case number (default 0)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--timeout", type=float, default=20.0,
                    help="seconds one case may take (default 20)")
    ap.add_argument("--headroom-mib", type=int, default=HEADROOM >> 20,
                    help="address space a worker may grow by, RLIMIT_AS (default %(default)s)")
    ap.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    ap.add_argument("--replay", type=int, metavar="CASE",
                    help="run one case in this process and print its traceback")
    args = ap.parse_args(argv)
    if args.cases < 1 or args.workers < 1 or args.timeout <= 0:
        ap.error("--cases, --workers and --timeout must be positive")
    if args.replay is not None:
        if args.target == "both":
            ap.error("--replay needs --target qnb or onnx")
        replay(args.target, args.seed, args.replay)
        return 0
    targets = {"qnb": args.cases} if args.target == "qnb" else {"onnx": args.cases} \
        if args.target == "onnx" else {"qnb": args.cases - args.cases // 4,
                                       "onnx": args.cases // 4}
    t0 = time.monotonic()
    reports = []
    for target, n in targets.items():
        last = [0.0]

        def progress(r, n=n, target=target, last=last):
            now = time.monotonic()
            if now - last[0] >= 10 or r.total == n:
                last[0] = now
                bad = sum(len(v) for v in r.defects.values())
                rate = r.total / max(now - t0, 1e-9)
                print(f"\r{target}: {r.total:,}/{n:,} cases, {bad} defects, "
                      f"{r.counts['refused']:,} refused, {r.counts['ran']:,} ran "
                      f"({rate:.0f}/s)", end="", file=sys.stderr, flush=True)
        r = run_pool(target, args.seed, range(args.first, args.first + n), args.workers,
                     args.timeout, args.headroom_mib << 20, progress)
        print(file=sys.stderr)
        reports.append(r)
        print(json.dumps(r.to_json(), indent=1))
    if args.json:
        from qnrt.atomic import temp_beside

        fd, tmp = temp_beside(args.json)
        with os.fdopen(fd, "w") as f:
            json.dump([r.to_json() for r in reports], f, indent=1)
        os.replace(tmp, args.json)
    print(f"{sum(r.total for r in reports):,} cases in {time.monotonic() - t0:,.0f} s; "
          f"{sum(len(v) for r in reports for v in r.defects.values())} defects",
          file=sys.stderr)
    return 1 if any(r.defects for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())

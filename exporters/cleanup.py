"""Graph-level clean-up of what ONNX converters (keras2onnx, tf2onnx, paddle2onnx,
torch.onnx) write, on the qnrt IR, before qnrt.rewrite.optimize.

Each rewrite is small, keeps the graph's meaning exactly (up to float rounding),
is idempotent, and is counted, so `qnrt convert` can say what it did:

  legalize (always run by from_onnx, so these never count as unsupported ops)
    * Max(x, 0) -> Relu;  Max(x, c) / Min(x, c) with a scalar c -> Clip;
      Max(x, a*x), 0 < a < 1 -> LeakyRelu(a)
    * Relu/Clip followed by Clip -> one Clip (Min(Max(x, 0), 6) -> Clip(0, 6), a ReLU6)
  cleanup (from_onnx(cleanup=True), which convert uses) adds
    * Transposes: pairs that compose to the identity cancel (merge otherwise),
      also when elementwise ops sit between them: a Transpose is pushed down
      through unary ops, through Add/Sub/Mul/Div/PRelu/Max/Min whose other operand
      is a constant (the constant is permuted), through Pad (the pads are permuted),
      through binary ops and Concat whose
      inputs are all the same Transpose (which removes Transposes by itself), and
      into ReduceMean/ReduceMax/...; Transposes before Reshape/Flatten stay: there
      the element order matters. ReduceMean/ReduceMax over H, W of an NCHW tensor
      becomes GlobalAveragePool/GlobalMaxPool (+ Flatten).
    * batch norm as elementwise ops after a Conv: Mul/Div/Add/Sub by a constant
      that the shapes prove is one value per output channel ((C,1,1), (1,C,1,1),
      or a scalar) is folded into the Conv's weights and bias.
    * LayerNorm spelled out (ReduceMean, Sub, Pow(2) or Mul(d, d), ReduceMean, Add(eps),
      Sqrt, Div or Mul by Reciprocal, then Mul by a constant scale and Add a constant
      bias, both optional) over trailing axes -> one LayerNormalization (when the
      runtime has it and the normalized dims are known).
    * activations: x*Sigmoid(x) -> SiLU (when the runtime has it);
      clip(a*x+b, 0, 1), clip(x+3, 0, 6)/6 -> HardSigmoid;
      x*HardSigmoid(x; 1/6, 1/2) and x*clip(x+3, 0, 6)/6 -> HardSwish.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from qnrt.graph import Graph, GraphError, Node

UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "SiLU", "Clip",
         "Identity", "Neg", "Abs", "Sqrt", "Exp", "Log", "Elu", "Selu", "Softplus",
         "Softsign", "Erf", "Reciprocal", "Floor", "Ceil", "Round", "Sign"}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd",
          "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"}
GLOBAL_POOL = {"ReduceMean": "GlobalAveragePool", "ReduceMax": "GlobalMaxPool"}

# Counter keys, in the order the summary names them
SUMMARY = [
    ("constants folded", "folded {} constants"),
    ("no-op nodes removed", "removed {} no-op nodes"),
    ("dynamic reshapes resolved", "resolved {} dynamic Reshape targets"),
    ("Transposes removed", "removed {} Transposes"),
    ("batch norms fused", "fused {} batch norms"),
    ("LayerNorm", "fused {} LayerNorm"),
    ("SiLU", "recognised {} SiLU"),
    ("HardSwish", "{} HardSwish"),
    ("HardSigmoid", "{} HardSigmoid"),
    ("ReLU6", "{} ReLU6"),
    ("Relu", "{} ReLU"),
    ("LeakyRelu", "{} LeakyReLU"),
    ("Clip", "{} Clip"),
    ("GlobalPool", "{} global pools"),
]
ACTIVATION_KEYS = ("SiLU", "HardSwish", "HardSigmoid", "ReLU6", "Relu", "LeakyRelu", "Clip",
                   "GlobalPool")


def summary(counts) -> str:
    """'folded 12 constants, removed 4 Transposes, fused 13 batch norms, recognised
    3 SiLU, 2 HardSwish, 1 ReLU6' (only the nonzero counts)."""
    parts, recognised = [], False
    for key, text in SUMMARY:
        n = counts.get(key, 0)
        if not n:
            continue
        if key in ACTIVATION_KEYS and not recognised:
            text = "recognised " + text.removeprefix("recognised ")
            recognised = True
        elif key in ACTIVATION_KEYS:
            text = text.removeprefix("recognised ")
        parts.append(text.format(n))
    return ", ".join(parts) or "nothing to clean up"


# ---- graph queries ----------------------------------------------------------------

class _Ctx:
    def __init__(self, graph: Graph, ops=None, shapes=None):
        self.g = graph
        self.ops = set(ops) if ops is not None else None
        self.shapes = dict(shapes or {})  # tensor -> dims the importer knows (int, str, None)
        self.counts: Counter = Counter()
        self.made: dict[int, str] = {}  # id(node) -> the count it was made under
        self.bn_convs: set[int] = set()
        self.refresh()

    def refresh(self):
        self.producers = self.g.producers()
        self.consumers = self.g.consumers()
        self.outputs = {o.name for o in self.g.outputs}
        self.inputs = {v.name for v in self.g.inputs}

    def shape(self, name):
        """The dims of tensor `name` where known (ints, or symbols/None for dynamic
        ones), else None. Rewrites keep a tensor name's shape: new tensors get
        new names."""
        c = self.const(name)
        if c is not None:
            return tuple(c.shape)
        vi = next((v for v in self.g.inputs if v.name == name), None)
        if vi is not None and vi.shape is not None:
            return tuple(vi.shape)
        return self.shapes.get(name)

    def has_op(self, op) -> bool:
        return self.ops is None or op in self.ops

    def const(self, name):
        return self.g.initializers.get(name) if name else None

    def scalar(self, name):
        c = self.const(name)
        if c is None or c.size != 1 or c.dtype.kind not in "fiu":
            return None
        return float(np.asarray(c).reshape(-1)[0])

    def producer(self, name, op=None):
        p = self.producers.get(name)
        return p if p is not None and (op is None or p.op == op or
                                       (not isinstance(op, str) and p.op in op)) else None

    def uses(self, name) -> list[Node]:
        return self.consumers.get(name, [])

    def single_use(self, name) -> bool:
        return name not in self.outputs and len(self.uses(name)) == 1

    def add_const(self, base, value) -> str:
        name = self.g.fresh_name(base)
        self.g.initializers[name] = np.array(value, order="C")  # 0-d stays 0-d
        return name

    def fresh(self, base) -> str:
        return self.g.fresh_name(base)

    def remove(self, *nodes):
        ids = {id(n) for n in nodes}
        self.g.nodes = [n for n in self.g.nodes if id(n) not in ids]

    def replace_uses(self, old: str, new: str):
        """Tensor `old` equals `new`: readers of `old` read `new` (graph outputs keep
        their names: the producer of `new` is renamed, else an Identity copies)."""
        for n in self.g.nodes:
            n.inputs = [new if i == old else i for i in n.inputs]
        if old in self.outputs:
            p = self.producers.get(new)
            if p is not None and new not in self.outputs and new not in self.inputs:
                p.outputs = [old if o == new else o for o in p.outputs]
                for n in self.g.nodes:
                    n.inputs = [old if i == new else i for i in n.inputs]
            else:
                self.g.nodes.append(Node("Identity", [new], [old], {}, f"Identity_{old}"))


def _clip_bounds(ctx: _Ctx, node: Node):
    """(lo, hi) of a Relu or a Clip with constant bounds, else None."""
    if node.op == "Relu":
        return 0.0, np.inf
    if node.op != "Clip":
        return None
    ins = node.inputs + ["", ""]
    lo, hi = -np.inf, np.inf
    if ins[1]:
        lo = ctx.scalar(ins[1])
    if ins[2]:
        hi = ctx.scalar(ins[2])
    if lo is None or hi is None:
        return None
    return float(lo), float(hi)


def _make_clip(ctx: _Ctx, x: str, y: str, lo: float, hi: float, name: str) -> Node:
    if lo == 0 and hi == np.inf:
        return Node("Relu", [x], [y], {}, name)
    ins = [x, "", ""]
    if lo != -np.inf:
        ins[1] = ctx.add_const(f"{name}.min", np.float32(lo))
    if hi != np.inf:
        ins[2] = ctx.add_const(f"{name}.max", np.float32(hi))
    while ins[-1] == "":
        ins.pop()
    return Node("Clip", ins, [y], {}, name)


def _replace(ctx: _Ctx, old: Node, new: list[Node]):
    at = next(k for k, n in enumerate(ctx.g.nodes) if n is old)
    ctx.g.nodes[at:at + 1] = new


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return bool(np.isfinite(a) and np.isfinite(b) and abs(a - b) <= rel * max(1.0, abs(a), abs(b)))


# ---- Min / Max ------------------------------------------------------------------------

def _minmax(ctx: _Ctx) -> bool:
    for node in ctx.g.nodes:
        if node.op not in ("Max", "Min") or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        sa, sb = ctx.scalar(a), ctx.scalar(b)
        if (sa is None) != (sb is None):  # one scalar constant operand: a clip
            x, c = (b, sa) if sa is not None else (a, sb)
            # the output keeps x's shape only if the scalar does not add dims
            cst = ctx.const(a if sa is not None else b)
            if cst.ndim > 1 and (_known_rank(ctx, x) or 0) < cst.ndim:
                continue
            lo, hi = (c, np.inf) if node.op == "Max" else (-np.inf, c)
            new = _make_clip(ctx, x, node.outputs[0], lo, hi, node.name)
            _made(ctx, new, new.op)
            _replace(ctx, node, [new])
            return True
        if node.op == "Max" and sa is None and sb is None:  # Max(x, a*x): LeakyRelu
            for x, m in ((a, b), (b, a)):
                mul = ctx.producer(m, "Mul")
                if mul is None or not ctx.single_use(m) or x not in mul.inputs:
                    continue
                other = mul.inputs[1] if mul.inputs[0] == x else mul.inputs[0]
                alpha = ctx.scalar(other)
                if alpha is None or not 0 <= alpha <= 1 or ctx.const(other).ndim > 1:
                    continue
                new = Node("LeakyRelu", [x], node.outputs, {"alpha": float(alpha)}, node.name)
                _made(ctx, new, "LeakyRelu")
                ctx.remove(mul)
                _replace(ctx, node, [new])
                return True
    return False


def _made(ctx: _Ctx, node: Node, key: str, *replaced: Node) -> None:
    """Count `node` under `key`, uncounting nodes it replaces that were made here."""
    for old in replaced:
        if id(old) in ctx.made:
            ctx.counts[ctx.made.pop(id(old))] -= 1
    ctx.made[id(node)] = key
    ctx.counts[key] += 1


def _merge_clips(ctx: _Ctx) -> bool:
    """Clip(Clip(x)) / Clip(Relu(x)) / Relu(Clip(x)) -> one Clip; Clip(0, inf) -> Relu."""
    for node in ctx.g.nodes:
        outer = _clip_bounds(ctx, node)
        if outer is None:
            continue
        inner_node = ctx.producer(node.inputs[0], ("Clip", "Relu"))
        inner = _clip_bounds(ctx, inner_node) if inner_node is not None else None
        if inner is None or not ctx.single_use(node.inputs[0]):
            continue
        lo, hi = max(inner[0], outer[0]), min(inner[1], outer[1])
        if lo > hi:
            continue  # disjoint ranges: a constant output, left alone
        new = _make_clip(ctx, inner_node.inputs[0], node.outputs[0], lo, hi, node.name)
        if lo == 0 and hi == 6:
            _made(ctx, new, "ReLU6", node, inner_node)
        elif id(node) in ctx.made or id(inner_node) in ctx.made:
            _made(ctx, new, new.op, node, inner_node)
        ctx.remove(inner_node)
        _replace(ctx, node, [new])
        return True
    return False


# ---- activations -------------------------------------------------------------------------

def _affine(ctx: _Ctx, name: str):
    """name = a * base + b through single-use Add/Sub/Mul/Div by scalar constants:
    (base, a, b, nodes)."""
    a, b, nodes = 1.0, 0.0, []
    while True:
        p = ctx.producer(name, ("Add", "Sub", "Mul", "Div"))
        if p is None or len(p.inputs) != 2 or (nodes and not ctx.single_use(name)):
            break
        s0, s1 = ctx.scalar(p.inputs[0]), ctx.scalar(p.inputs[1])
        if (s0 is None) == (s1 is None):
            break
        k = s0 if s0 is not None else s1
        if ctx.const(p.inputs[0] if s0 is not None else p.inputs[1]).ndim > 1:
            break  # a (1,1,1,1) constant could add dims: not worth proving otherwise
        base = p.inputs[1] if s0 is not None else p.inputs[0]
        if p.op == "Add":
            b += a * k
        elif p.op == "Mul":
            a *= k
        elif p.op == "Sub" and s1 is not None:  # base - k
            b -= a * k
        elif p.op == "Sub":  # k - base
            b += a * k
            a = -a
        elif p.op == "Div" and s1 is not None and k != 0:
            a /= k
        else:
            break
        nodes.append(p)
        name = base
    return name, a, b, nodes


def _hardsigmoid_of(ctx: _Ctx, clip: Node, scale: float = 1.0):
    """scale * clip(...) as HardSigmoid parameters: (x, alpha, beta, nodes) or None."""
    bounds = _clip_bounds(ctx, clip)
    if bounds is None or bounds[0] != 0 or not _close(bounds[1] * scale, 1.0):
        return None
    x, a, b, nodes = _affine(ctx, clip.inputs[0])
    if not nodes or not ctx.single_use(clip.inputs[0]):
        return None
    return x, a * scale, b * scale, nodes


def _scale_of(ctx: _Ctx, node: Node):
    """(dynamic input, k) for node = input * k with a scalar constant k, else None."""
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    s0, s1 = ctx.scalar(node.inputs[0]), ctx.scalar(node.inputs[1])
    if node.op == "Mul" and (s0 is None) != (s1 is None):
        c = node.inputs[0] if s0 is not None else node.inputs[1]
        if ctx.const(c).ndim > 1:
            return None
        return (node.inputs[1], s0) if s0 is not None else (node.inputs[0], s1)
    if node.op == "Div" and s0 is None and s1 is not None and s1 != 0 \
            and ctx.const(node.inputs[1]).ndim <= 1:
        return node.inputs[0], 1.0 / s1
    return None


def _hardsigmoid(ctx: _Ctx) -> bool:
    for node in ctx.g.nodes:
        found, extra = None, []
        if node.op == "Clip":  # clip(a*x + b, 0, 1)
            found = _hardsigmoid_of(ctx, node)
        else:  # clip(a*x + b, 0, h) * (1/h)
            scaled = _scale_of(ctx, node)
            if scaled is not None:
                clip = ctx.producer(scaled[0], ("Clip", "Relu"))
                if clip is not None and ctx.single_use(scaled[0]):
                    found = _hardsigmoid_of(ctx, clip, scaled[1])
                    extra = [clip]
        if found is None:
            continue
        x, alpha, beta, nodes = found
        new = Node("HardSigmoid", [x], node.outputs,
                   {"alpha": float(alpha), "beta": float(beta)}, node.name)
        _made(ctx, new, "HardSigmoid", node, *nodes, *extra)
        ctx.remove(*nodes, *extra)
        _replace(ctx, node, [new])
        return True
    return False


def _hardswish_params(node: Node) -> bool:
    return (node.op == "HardSigmoid" and _close(node.attrs.get("alpha", 0.2), 1 / 6)
            and _close(node.attrs.get("beta", 0.5), 0.5))


def _gating(ctx: _Ctx) -> bool:
    """x * Sigmoid(x) -> SiLU, x * HardSigmoid(x; 1/6, 1/2) -> HardSwish, and
    (x * clip(a*x + b, 0, h)) * (1/h) -> x * HardSigmoid(x; a/h, b/h) first."""
    for node in ctx.g.nodes:
        if node.op == "Mul" and len(node.inputs) == 2:
            for x, g in (node.inputs, node.inputs[::-1]):
                gate = ctx.producer(g, ("Sigmoid", "HardSigmoid"))
                if gate is None or gate.inputs[0] != x or not ctx.single_use(g) or x == g:
                    continue
                if gate.op == "Sigmoid" and ctx.has_op("SiLU"):
                    op = "SiLU"
                elif gate.op == "HardSigmoid" and _hardswish_params(gate):
                    op = "HardSwish"
                else:
                    continue
                new = Node(op, [x], node.outputs, {}, node.name)
                _made(ctx, new, op, gate)
                ctx.remove(gate)
                _replace(ctx, node, [new])
                return True
        scaled = _scale_of(ctx, node)
        if scaled is None:
            continue
        mul = ctx.producer(scaled[0], "Mul")
        if mul is None or not ctx.single_use(scaled[0]) or len(mul.inputs) != 2:
            continue
        for x, c in (mul.inputs, mul.inputs[::-1]):
            clip = ctx.producer(c, ("Clip", "Relu"))
            if clip is None or not ctx.single_use(c):
                continue
            found = _hardsigmoid_of(ctx, clip, scaled[1])
            if found is None or found[0] != x:
                continue
            _, alpha, beta, nodes = found
            gate = Node("HardSigmoid", [x], [ctx.fresh(node.outputs[0] + "/hsig")],
                        {"alpha": float(alpha), "beta": float(beta)}, node.name + "/hsig")
            if _hardswish_params(gate):
                new = [Node("HardSwish", [x], node.outputs, {}, node.name)]
            else:
                new = [gate, Node("Mul", [x, gate.outputs[0]], node.outputs, {}, node.name)]
            _made(ctx, new[0], new[0].op, *nodes, clip)
            ctx.remove(*nodes, clip, mul)
            _replace(ctx, node, new)
            return True
    return False


# ---- batch norm as elementwise ops after a Conv ------------------------------------------

def _per_channel(c: np.ndarray, rank: int, channels: int):
    """c as a (channels,) vector if broadcasting c against an NC... tensor of `rank`
    gives one value per channel and keeps the tensor's shape, else None."""
    if c.ndim > rank or c.dtype.kind != "f":
        return None
    s = (1,) * (rank - c.ndim) + tuple(c.shape)
    if s[0] != 1 or s[1] not in (1, channels) or any(d != 1 for d in s[2:]):
        return None
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,)) if c.size == 1 \
        else c.reshape(channels).astype(np.float64)


def _fold_into_conv(ctx: _Ctx) -> bool:
    for conv in ctx.g.nodes:
        if conv.op != "Conv" or conv.attrs.get("activation") or len(conv.inputs) < 2:
            continue
        y = conv.outputs[0]
        w = ctx.const(conv.inputs[1])
        if w is None or w.dtype.kind != "f" or not ctx.single_use(y):
            continue
        bname = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2] else ""
        b = ctx.const(bname) if bname else np.zeros(w.shape[0], np.float32)
        if b is None:
            continue
        op = ctx.uses(y)[0]
        if op.op not in ("Add", "Sub", "Mul", "Div") or len(op.inputs) != 2 \
                or op.inputs[0] == op.inputs[1]:
            continue
        first = op.inputs[0] == y
        k = ctx.const(op.inputs[1] if first else op.inputs[0])
        v = _per_channel(k, w.ndim, w.shape[0]) if k is not None else None
        if v is None:
            continue
        w64, b64 = w.astype(np.float64), b.astype(np.float64)
        scale = np.ones_like(v)
        if op.op == "Mul":
            scale, b64 = v, b64 * v
        elif op.op == "Div" and first and np.all(v != 0):
            scale, b64 = 1.0 / v, b64 / v
        elif op.op == "Add":
            b64 = b64 + v
        elif op.op == "Sub" and first:
            b64 = b64 - v
        elif op.op == "Sub":  # k - conv(x)
            scale, b64 = -np.ones_like(v), v - b64
        else:
            continue
        base = conv.name or y
        wname = ctx.add_const(f"{conv.inputs[1]}.scaled",
                              (w64 * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype))
        bias = ctx.add_const(f"{bname or base + '.bias'}.shifted", b64.astype(np.float32))
        conv.inputs = [conv.inputs[0], wname, bias] + conv.inputs[3:]
        conv.outputs = list(op.outputs)
        ctx.remove(op)
        if id(conv) not in ctx.bn_convs:
            ctx.counts["batch norms fused"] += 1
            ctx.bn_convs.add(id(conv))
        return True
    return False


# ---- LayerNorm ---------------------------------------------------------------------------

def _mean_over(ctx: _Ctx, name: str):
    """(input, axes) of a single-use ReduceMean(keepdims=1) producing `name`."""
    p = ctx.producer(name, "ReduceMean")
    if p is None or not ctx.single_use(name):
        return None
    r = _reduce_axes(ctx, p)
    if r is None or r[1] != 1:
        return None
    return p, p.inputs[0], r[0]


def _trailing_axis(ctx: _Ctx, x: str, axes):
    """`axes` as LayerNormalization's axis when they are the last len(axes) axes of x
    (negative axes say so by themselves; positive ones need x's rank), else None."""
    k = len(axes)
    if len(set(axes)) != k:
        return None
    if all(a < 0 for a in axes):
        return -k if sorted(axes) == list(range(-k, 0)) else None
    shape = ctx.shape(x)
    rank = len(shape) if shape is not None else _known_rank(ctx, x)
    if rank is None or sorted(a % rank for a in axes) != list(range(rank - k, rank)):
        return None
    return -k


def _layer_norms(ctx: _Ctx) -> bool:
    """(x - mean) / sqrt(mean((x - mean)^2) + eps) [* scale] [+ bias] over trailing
    axes -> LayerNormalization(x, scale, bias)."""
    if not ctx.has_op("LayerNormalization"):
        return False
    for node in ctx.g.nodes:
        # the normalizing step: Div(d, std) or Mul(d, Reciprocal(std))
        if node.op == "Div" and len(node.inputs) == 2:
            d, std, recip = node.inputs[0], node.inputs[1], None
        elif node.op == "Mul" and len(node.inputs) == 2:
            recip = next((ctx.producer(i, "Reciprocal") for i in node.inputs
                          if ctx.producer(i, "Reciprocal") is not None), None)
            if recip is None or not ctx.single_use(recip.outputs[0]):
                continue
            d = node.inputs[1] if node.inputs[0] == recip.outputs[0] else node.inputs[0]
            std = recip.inputs[0]
        else:
            continue
        sqrt = ctx.producer(std, "Sqrt")
        sub = ctx.producer(d, "Sub")
        if sqrt is None or sub is None or not ctx.single_use(std) or d in ctx.outputs:
            continue
        add_eps = ctx.producer(sqrt.inputs[0], "Add")
        if add_eps is None or not ctx.single_use(sqrt.inputs[0]) or len(add_eps.inputs) != 2:
            continue
        eps_name = next((i for i in add_eps.inputs if ctx.scalar(i) is not None), None)
        if eps_name is None or ctx.const(eps_name).ndim > 1:
            continue
        var = next(i for i in add_eps.inputs if i != eps_name) \
            if add_eps.inputs.count(eps_name) == 1 else None
        mean_of_sq = _mean_over(ctx, var) if var else None
        mean = _mean_over(ctx, sub.inputs[1])
        if mean_of_sq is None or mean is None or mean[1] != sub.inputs[0]:
            continue
        x, axes = sub.inputs[0], mean[2]
        if sorted(mean_of_sq[2]) != sorted(axes):
            continue
        sq = ctx.producer(mean_of_sq[1], ("Pow", "Mul"))
        if sq is None or not ctx.single_use(mean_of_sq[1]):
            continue
        if sq.op == "Pow" and not (sq.inputs[0] == d and ctx.scalar(sq.inputs[1]) == 2.0):
            continue
        if sq.op == "Mul" and sq.inputs != [d, d]:
            continue
        readers = ctx.uses(d)
        if sorted(map(id, readers)) != sorted(map(id, [sq] * (2 if sq.op == "Mul" else 1)
                                                   + [node])):
            continue
        axis = _trailing_axis(ctx, x, axes)
        xs = ctx.shape(x)
        if axis is None or xs is None or len(xs) < -axis:
            continue
        norm = tuple(xs[axis:])
        if not all(isinstance(v, (int, np.integer)) and v > 0 for v in norm):
            continue  # the scale is materialized at the normalized shape
        eps = float(ctx.scalar(eps_name))
        if not np.isfinite(eps) or eps < 0:
            continue
        out, chain = node.outputs[0], [node]
        scale = np.ones(norm, np.float32)
        bias = None
        for op_type in ("Mul", "Add"):  # then * scale, + bias: each optional, in this order
            users = ctx.uses(out)
            if len(users) != 1 or out in ctx.outputs or users[0].op not in ("Mul", "Add") \
                    or len(users[0].inputs) != 2:
                break
            if users[0].op != op_type:
                continue  # no scale: the Add may still be the bias
            other = users[0].inputs[1] if users[0].inputs[0] == out else users[0].inputs[0]
            c = ctx.const(other)
            if c is None or c.dtype.kind != "f" or other == out or c.ndim > len(norm):
                break
            try:
                value = np.broadcast_to(c.astype(np.float32), norm)
            except ValueError:
                break
            if op_type == "Mul":
                scale = value
            else:
                bias = value
            chain.append(users[0])
            out = users[0].outputs[0]
        inputs = [x, ctx.add_const(f"{node.name or out}.scale", np.array(scale, np.float32))]
        if bias is not None:
            inputs.append(ctx.add_const(f"{node.name or out}.bias", np.array(bias, np.float32)))
        fused = Node("LayerNormalization", inputs, [out], {"axis": int(axis), "epsilon": eps},
                     node.name or out)
        ctx.remove(mean[0], sub, sq, mean_of_sq[0], add_eps, sqrt, *chain[1:],
                   *([recip] if recip is not None else []))
        _replace(ctx, node, [fused])
        ctx.counts["LayerNorm"] += 1
        return True
    return False


# ---- Transposes -----------------------------------------------------------------------

def _perm(node: Node):
    p = node.attrs.get("perm")
    return None if p is None else [int(i) for i in p]


def _compose(p1, p2):
    """Transpose(Transpose(x, p1), p2) == Transpose(x, _compose(p1, p2))."""
    return [p1[i] for i in p2]


def _is_identity(p) -> bool:
    return list(p) == list(range(len(p)))


def _reduce_axes(ctx: _Ctx, node: Node):
    """(axes, keepdims, from_input) of a Reduce* node with constant axes, else None."""
    if len(node.inputs) > 1 and node.inputs[1]:
        c = ctx.const(node.inputs[1])
        if c is None:
            return None
        axes, from_input = [int(a) for a in c.reshape(-1)], True
    elif "axes" in node.attrs:
        axes, from_input = [int(a) for a in node.attrs["axes"]], False
    else:
        return None
    if not axes:
        return None
    return axes, int(node.attrs.get("keepdims", 1)), from_input


def _pushable(ctx: _Ctx, user: Node, t: str, perm) -> bool:
    """Can Transpose(perm) producing `t` move below `user` (its one reader)?"""
    rank = len(perm)
    if user.op in UNARY:
        return user.inputs[0] == t and all(ctx.scalar(i) is not None for i in user.inputs[1:] if i)
    if user.op in BINARY or user.op == "PRelu":
        if len(user.inputs) != 2 or user.inputs[0] == user.inputs[1]:
            return False
        other = user.inputs[1] if user.inputs[0] == t else user.inputs[0]
        if user.op == "PRelu" and other == user.inputs[0]:
            return False
        c = ctx.const(other)
        if c is not None:
            return c.ndim <= rank
        if user.op == "PRelu":
            return False
        tp = ctx.producer(other, "Transpose")
        return tp is not None and _perm(tp) == perm and ctx.single_use(other)
    if user.op == "Concat":
        for i in user.inputs:
            if i == t:
                continue
            tp = ctx.producer(i, "Transpose")
            if tp is None or _perm(tp) != perm or not ctx.single_use(i):
                return False
        return user.inputs.count(t) == 1
    if user.op in REDUCE:
        r = _reduce_axes(ctx, user)
        return r is not None and user.inputs[0] == t and r[1] == 1
    if user.op == "Pad":  # every mode pads each axis on its own: permute the pads
        return user.inputs[0] == t and _pad_amounts(ctx, user, rank) is not None
    return False


def _pad_amounts(ctx: _Ctx, node: Node, rank: int):
    """Pad's pads (begins then ends, one per axis), constant, without `axes`."""
    if len(node.inputs) > 3 and node.inputs[3]:
        return None
    if any(i and ctx.const(i) is None for i in node.inputs[1:3]):
        return None
    pads = ctx.const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else \
        node.attrs.get("pads")
    if pads is None or len(np.asarray(pads).reshape(-1)) != 2 * rank:
        return None
    return [int(p) for p in np.asarray(pads).reshape(-1)]


def _leads_to_transpose(ctx: _Ctx, t: str, perm) -> bool:
    """A chain of pushable single readers from `t` ends at another Transpose (or a
    Reduce that absorbs the permutation)."""
    for _ in range(len(ctx.g.nodes) + 1):
        users = ctx.uses(t)
        if t in ctx.outputs or not users:
            return False
        if any(u.op == "Transpose" and _perm(u) is not None for u in users):
            return True
        if len(users) != 1:
            return False
        u = users[0]
        if u.op in REDUCE and _absorbs(ctx, u, perm):
            return True
        if not _pushable(ctx, u, t, perm):
            return False
        t = u.outputs[0]
    return False


def _absorbs(ctx: _Ctx, reduce: Node, perm) -> bool:
    """Reduce(Transpose(x, perm), axes, keepdims=0) == Reduce(x, perm[axes]) when
    the kept axes stay in order."""
    r = _reduce_axes(ctx, reduce)
    if r is None or r[1] != 0:
        return False
    rank = len(perm)
    axes = {a % rank for a in r[0]}
    kept = [perm[i] for i in range(rank) if i not in axes]
    return kept == sorted(kept)


def _push(ctx: _Ctx, tnode: Node, user: Node) -> None:
    """Move Transpose `tnode` below `user`."""
    perm = _perm(tnode)
    x, t = tnode.inputs[0], tnode.outputs[0]
    inv = list(np.argsort(perm))
    if user.op in BINARY or user.op == "PRelu":
        other = user.inputs[1] if user.inputs[0] == t else user.inputs[0]
        c = ctx.const(other)
        if c is not None:
            aligned = c.reshape((1,) * (len(perm) - c.ndim) + c.shape)
            new_other = ctx.add_const(f"{other}.permuted", np.transpose(aligned, inv))
        else:
            tp = ctx.producer(other)
            new_other = tp.inputs[0]
            ctx.remove(tp)
            ctx.counts["Transposes removed"] += 1
        user.inputs = [x if i == t else new_other for i in user.inputs]
    elif user.op == "Concat":
        ins = []
        for i in user.inputs:
            if i == t:
                ins.append(x)
            else:
                tp = ctx.producer(i)
                ins.append(tp.inputs[0])
                ctx.remove(tp)
                ctx.counts["Transposes removed"] += 1
        user.inputs = ins
        user.attrs["axis"] = perm[int(user.attrs.get("axis", 0)) % len(perm)]
    elif user.op in REDUCE:
        axes, keep, from_input = _reduce_axes(ctx, user)
        new_axes = sorted(perm[a % len(perm)] for a in axes)
        _set_reduce_axes(ctx, user, new_axes, from_input)
        user.inputs[0] = x
    elif user.op == "Pad":
        rank = len(perm)
        pads = _pad_amounts(ctx, user, rank)
        moved = [0] * (2 * rank)
        for i, p in enumerate(perm):
            moved[p], moved[rank + p] = pads[i], pads[rank + i]
        if len(user.inputs) > 1 and user.inputs[1]:
            user.inputs[1] = ctx.add_const(f"{user.name}.pads", np.asarray(moved, np.int64))
        else:
            user.attrs["pads"] = moved
        user.inputs[0] = x
    else:
        user.inputs[0] = x
    out = user.outputs[0]
    mid = ctx.fresh(f"{out}/pre_transpose")
    user.outputs[0] = mid
    tnode.inputs, tnode.outputs = [mid], [out]


def _set_reduce_axes(ctx, node, axes, from_input):
    if from_input:
        node.inputs[1] = ctx.add_const(f"{node.name}.axes", np.asarray(axes, np.int64))
    else:
        node.attrs["axes"] = list(axes)


def _transposes(ctx: _Ctx) -> bool:
    for tnode in ctx.g.nodes:
        if tnode.op != "Transpose" or _perm(tnode) is None:
            continue
        perm, x, t = _perm(tnode), tnode.inputs[0], tnode.outputs[0]
        if _is_identity(perm):
            ctx.remove(tnode)
            ctx.replace_uses(t, x)
            ctx.counts["Transposes removed"] += 1
            return True
        users = ctx.uses(t)
        # readers that are Transposes read x directly, composed (or not at all)
        following = [u for u in users if u.op == "Transpose" and _perm(u) is not None]
        if following:  # one at a time: replace_uses may rename x
            u = following[0]
            comp = _compose(perm, _perm(u))
            if _is_identity(comp):
                ctx.remove(u)
                ctx.replace_uses(u.outputs[0], x)
                ctx.counts["Transposes removed"] += 1
            else:
                u.inputs, u.attrs["perm"] = [tnode.inputs[0]], comp
            ctx.refresh()
            if not ctx.uses(t) and t not in ctx.outputs:
                ctx.remove(tnode)
                ctx.counts["Transposes removed"] += 1
            return True
        if len(users) != 1 or t in ctx.outputs:
            continue
        user = users[0]
        if user.op in REDUCE and _absorbs(ctx, user, perm):
            axes, _, from_input = _reduce_axes(ctx, user)
            _set_reduce_axes(ctx, user, sorted(perm[a % len(perm)] for a in axes), from_input)
            user.inputs[0] = x
            ctx.remove(tnode)
            ctx.counts["Transposes removed"] += 1
            return True
        if not _pushable(ctx, user, t, perm):
            continue
        # a binary op or Concat over Transposes of one perm removes Transposes by itself
        merges = user.op == "Concat" or (user.op in BINARY and any(
            ctx.producer(i, "Transpose") is not None for i in user.inputs if i != t))
        if merges or _leads_to_transpose(ctx, user.outputs[0], perm):
            _push(ctx, tnode, user)
            return True
    return False


def _global_pools(ctx: _Ctx) -> bool:
    """ReduceMean/ReduceMax over all spatial axes of a 4-D (NCHW) tensor whose rank
    the graph proves (it comes from a Conv or a 4-D Transpose) -> global pool."""
    for node in ctx.g.nodes:
        if node.op not in GLOBAL_POOL or not ctx.has_op(GLOBAL_POOL[node.op]):
            continue
        r = _reduce_axes(ctx, node)
        rank = _known_rank(ctx, node.inputs[0])
        if r is None or rank is None or rank < 3:
            continue
        if sorted(a % rank for a in r[0]) != list(range(2, rank)):
            continue
        pool = Node(GLOBAL_POOL[node.op], [node.inputs[0]], list(node.outputs), {}, node.name)
        new = [pool]
        if not r[1]:  # keepdims=0: (N, C, 1, 1) -> (N, C)
            mid = ctx.fresh(node.outputs[0] + "/pooled")
            pool.outputs = [mid]
            new.append(Node("Flatten", [mid], list(node.outputs), {"axis": 1},
                            node.name + "/flatten"))
        ctx.counts["GlobalPool"] += 1
        _replace(ctx, node, new)
        return True
    return False


def _known_rank(ctx: _Ctx, name: str, depth: int = 0):
    """The rank of tensor `name` when the graph proves it, else None."""
    if depth > 64:
        return None
    c = ctx.const(name)
    if c is not None:
        return c.ndim
    p = ctx.producer(name)
    if p is None:
        vi = next((v for v in ctx.g.inputs if v.name == name), None)
        return len(vi.shape) if vi is not None and vi.shape is not None else None
    if p.op == "Conv" and len(p.inputs) > 1 and ctx.const(p.inputs[1]) is not None:
        return ctx.const(p.inputs[1]).ndim
    if p.op == "Transpose" and _perm(p) is not None:
        return len(_perm(p))
    if p.op in UNARY or p.op in ("BatchNormalization", "MaxPool", "AveragePool", "PRelu"):
        return _known_rank(ctx, p.inputs[0], depth + 1)
    if p.op in BINARY and len(p.inputs) == 2:
        ranks = [_known_rank(ctx, i, depth + 1) for i in p.inputs]
        return None if None in ranks else max(ranks)
    if p.op == "Concat":
        return _known_rank(ctx, p.inputs[0], depth + 1)
    return None


# ---- driver --------------------------------------------------------------------------------

def _dead_code(ctx: _Ctx) -> bool:
    used = {i for n in ctx.g.nodes for i in n.inputs} | ctx.outputs
    dead = [n for n in ctx.g.nodes if not any(o in used for o in n.outputs if o)]
    if dead:
        ctx.remove(*dead)
    return bool(dead)


def _run(graph: Graph, passes, ops, counts, shapes=None) -> Counter:
    ctx = _Ctx(graph, ops, shapes)
    changed = False
    for _ in range(100 * (len(graph.nodes) + 10)):  # every rewrite shrinks or settles
        # a pass that finds nothing leaves the graph as it was: refresh after changes only
        if not any(p(ctx) for p in passes):
            break
        changed = True
        ctx.refresh()
    if changed:  # an untouched graph keeps its nodes, order and constants as they were
        _dead_code(ctx)
        used = {i for n in graph.nodes for i in n.inputs} | ctx.outputs
        for name in [k for k in graph.initializers if k not in used]:
            del graph.initializers[name]
        try:
            graph.toposort()
        except GraphError:  # wiring the importer reports better (graph.validate)
            pass
    if counts is not None:
        counts.update(ctx.counts)
    return ctx.counts


def nchw_input(graph: Graph, counts: Counter | None = None) -> list[str]:
    """Opt-in (convert(nchw_input=True)): a 4-D graph input read only by
    Transpose(perm=[0, 3, 1, 2]) becomes an NCHW input and the Transposes go.
    Changes the model's interface, so callers then feed NCHW. Returns the
    inputs changed."""
    ctx = _Ctx(graph)
    changed = []
    for vi in graph.inputs:
        users = ctx.uses(vi.name)
        if (vi.shape is None or len(vi.shape) != 4 or not users or vi.name in ctx.outputs
                or any(u.op != "Transpose" or _perm(u) != [0, 3, 1, 2] for u in users)):
            continue
        n, h, w, c = vi.shape
        vi.shape = (n, c, h, w)
        for u in users:
            ctx.remove(u)
            ctx.refresh()
            ctx.replace_uses(u.outputs[0], vi.name)
            ctx.counts["Transposes removed"] += 1
        changed.append(vi.name)
        ctx.refresh()
    if changed:
        graph.metadata["converter.nchw_input"] = changed
    if counts is not None:
        counts.update(ctx.counts)
    return changed


LEGALIZE = (_minmax,)
# LayerNorm before global pools: its ReduceMean over the last axis of a 3-D tensor
# would otherwise become a GlobalAveragePool first
CLEANUP = (_dead_code, _minmax, _merge_clips, _layer_norms, _transposes, _global_pools,
           _fold_into_conv, _hardsigmoid, _gating)


def legalize(graph: Graph, ops=None, counts: Counter | None = None) -> Counter:
    """Rewrite spellings of ops the runtime lacks (Min/Max) into ones it has."""
    return _run(graph, LEGALIZE, ops, counts)


def cleanup(graph: Graph, ops=None, counts: Counter | None = None, shapes=None) -> Counter:
    """All rewrites above, in place, to a fixed point. `ops`: the runtime's op set
    (SiLU, global pools and LayerNormalization are only introduced when it has
    them; None: assume so). `shapes`: tensor name -> dims the importer knows
    (ints; a symbol or None for a dynamic dim), which LayerNorm fusion needs.
    Returns (and adds to `counts`) what was done."""
    return _run(graph, CLEANUP, ops, counts, shapes)

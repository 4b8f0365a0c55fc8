"""`qnrt compile`: the kernels, built ahead of time with numba.pycc into one
native extension module for this machine (see qnrt/backend.py for its use).

The build runs in a fresh process with the JIT backend and an empty Numba
cache, so every kernel is compiled from source:

1. harvest: it runs the models it is given (by default the shipped QuickNet,
   fp32, int8 and Deep-Compressed, at 1x3x32x32, 4x3x32x32, 1x3x224x224) and a
   zoo of one-node graphs, each node on every kernel variant that applies, so
   each Numba function is compiled for every argument-type combination the
   runtime passes it;
2. export: every (function, signature) Numba compiled becomes one pycc export,
   compiled with the same options as the JIT (error_model, fastmath, nogil)
   for this CPU, so AOT and JIT give bit-identical outputs;
3. it writes the library and a manifest (kernel-source hash, numba version,
   machine) atomically: the manifest last, so a half-made build is never
   loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

from . import backend as be

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BuildError(RuntimeError):
    """The build cannot run here (no compiler, no numba) or failed."""


def shipped_models() -> list[str]:
    import qnrt.models as m  # the shipped files' folder
    folder = os.path.dirname(m.__file__)
    return [os.path.join(folder, f) for f in ("quicknet_digits.qnb", "quicknet_digits_dc.qnb")
            if os.path.exists(os.path.join(folder, f))]


DEFAULT_SHAPES = [(1, 3, 32, 32), (4, 3, 32, 32), (1, 3, 224, 224)]


def check_toolchain() -> None:
    missing = [name for name, tools in (("a C compiler", ("cc", "gcc", "clang")),
                                        ("a C++ compiler", ("c++", "g++", "clang++")))
               if not any(shutil.which(t) for t in tools)]
    if missing:
        raise BuildError(f"qnrt compile needs {' and '.join(missing)} (Debian/Raspberry Pi OS: "
                         "sudo apt install gcc g++)")
    if be.numba_version() is None:
        raise BuildError("qnrt compile needs numba (pip install numba)")


# --- 1. harvest ---------------------------------------------------------------

def variant_outputs(graph, consts: dict, program):
    """Run every node of an unfused `program` on every non-reference variant
    that applies, each on its own copies of the inputs (a step may run in
    place, over the input the next variant reads), then the step's own
    kernel for the next node. Yields (step index, variant name, outputs)."""
    from .compiler import aligned_empty
    from .ops import get_op

    for i, (node, step) in enumerate(zip(graph.nodes, program.steps)):
        op = get_op(node.op)
        in_shapes = [program.shapes[t] if t else None for t in node.inputs]
        out_shapes = [program.shapes[t] for t in node.outputs]
        spec = op.spec(node, in_shapes, out_shapes, consts)
        for v in op.applicable(spec):
            if v.is_reference:
                continue
            k = op.build(node, spec, variant=v.name)
            xs = [a.copy() if isinstance(a, np.ndarray) and a.flags.writeable else a
                  for a in step.inputs]
            ys = [np.full(o.shape, np.nan, np.float32) for o in step.outputs]
            k.run(xs, ys, aligned_empty(k.workspace) if k.workspace else None)
            yield i, v.name, ys
        step.kernel.run(step.inputs, step.outputs, step.workspace)


def exercise(graph, input_shapes: dict, rng) -> int:
    """Run every node of `graph` on every non-reference variant that applies,
    and the lowest-arena streamed plan; returns the number of kernel runs."""
    from .compiler import KernelChoice, compile_program, smallest_program
    from .graph import GraphError

    consts = {k: v for k, v in graph.initializers.items()}
    program = compile_program(graph, consts, input_shapes, KernelChoice(), streaming=False)
    for name, view in program.views.items():
        if name in input_shapes:
            view[...] = rng.standard_normal(view.shape).astype(np.float32)
    runs = sum(1 for _ in variant_outputs(graph, consts, program))
    try:  # streamed bands run the same kernels on fewer rows: the lowest-arena plan
        streamed = smallest_program(graph, consts, input_shapes)
    except GraphError:
        streamed = None
    if streamed is not None and streamed.groups:
        for name in input_shapes:
            np.copyto(streamed.views[name], program.views[name])
        for step in streamed.steps:
            step.kernel.run(step.inputs, step.outputs, step.workspace)
            runs += 1
    return runs


def model_workloads(paths_and_shapes):
    """(label, graph, input_shapes) for each model, weights mode and shape."""
    from . import format as qnb
    from .rewrite import optimize, quantize_pointwise_int8

    for path, shapes in paths_and_shapes:
        for weights in ("fp32", "int8"):
            graph = optimize(qnb.load(path))
            if weights == "int8":
                graph = quantize_pointwise_int8(graph)
            graph.validate()
            graph.toposort()
            for shape in shapes:
                yield f"{os.path.basename(path)} {weights} {shape}", graph, {
                    graph.inputs[0].name: tuple(shape)}


def zoo():
    """One-node graphs for the ops QuickNet does not use, in their common forms."""
    from .graph import Graph, Node, ValueInfo

    f32 = np.float32
    r = np.random.default_rng(0)

    def g(op, shapes, attrs=None, consts=None, inputs=None, n_out=1):
        consts = consts or {}
        names = inputs or [f"x{i}" for i in range(len(shapes))]
        graph = Graph([Node(op, names + list(consts) if inputs is None else names,
                            [f"y{i}" for i in range(n_out)], dict(attrs or {}), op.lower())],
                      [ValueInfo(f"x{i}", s) for i, s in enumerate(shapes)],
                      [ValueInfo(f"y{i}", ()) for i in range(n_out)],
                      {k: np.asarray(v) for k, v in consts.items()})
        return op, graph, {f"x{i}": s for i, s in enumerate(shapes)}

    x4 = (2, 3, 9, 11)
    cases = [g(op, [x4, x4]) for op in ("Add", "Sub", "Mul", "Div")]
    cases += [g("Add", [x4, (3, 1, 1)]), g("Mul", [x4], consts={"c": r.random((1, 3, 1, 1), f32)})]
    cases += [g(op, [x4]) for op in ("Relu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid",
                                     "LeakyRelu", "SiLU", "Abs", "Exp", "Log", "Neg",
                                     "Reciprocal", "Sqrt", "Softmax", "Flatten", "Identity")]
    cases += [g("Clip", [x4], consts={"lo": np.array(-1, f32), "hi": np.array(1, f32)}),
              g("PRelu", [x4], consts={"s": r.random((3, 1, 1), f32)}),
              g("Pow", [x4], consts={"e": np.array(2, f32)}), g("Pow", [x4, x4]),
              g("BatchNormalization", [x4], {"epsilon": 1e-5},
                {k: r.random(3, f32) + 0.5 for k in ("s", "b", "m", "v")}),
              g("MaxPool", [x4], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1] * 4}),
              g("AveragePool", [x4], {"kernel_shape": [2, 3], "pads": [0, 1, 0, 1]}),
              g("GlobalAveragePool", [x4]), g("GlobalMaxPool", [x4]),
              g("Gemm", [(4, 6)], {"transB": 1}, {"w": r.random((5, 6), f32),
                                                   "c": r.random(5, f32)}),
              g("MatMul", [(2, 4, 6), (2, 6, 3)]), g("MatMul", [(4, 6)], consts={
                  "w": r.random((6, 3), f32)}),
              g("Transpose", [x4], {"perm": [0, 2, 3, 1]}),
              g("Concat", [x4, x4], {"axis": 1}),
              g("Reshape", [x4], consts={"s": np.array([2, -1], np.int64)}),
              g("ReduceMean", [x4], {"axes": [2, 3], "keepdims": 1}),
              g("ReduceSum", [x4], {"axes": [1], "keepdims": 0}),
              g("ReduceMax", [x4], {"axes": [3]}), g("ReduceMin", [x4], {"axes": [0, 2]}),
              g("Split", [x4], {"axis": 1, "split": [1, 2]}, n_out=2),
              g("Slice", [x4], consts={"st": np.array([1, 2], np.int64),
                                       "en": np.array([3, 9], np.int64),
                                       "ax": np.array([2, 3], np.int64),
                                       "sp": np.array([1, 2], np.int64)}),
              g("Resize", [x4], {"mode": "nearest"}, consts={
                  "roi": np.zeros(0, f32), "sc": np.array([1, 1, 2, 2], f32)}),
              g("Resize", [x4], {"mode": "linear"}, consts={
                  "roi": np.zeros(0, f32), "sc": np.array([1, 1, 2, 1.5], f32)}),
              g("ConvTranspose", [x4], {"strides": [2, 2], "pads": [1] * 4},
                {"w": r.random((3, 4, 3, 3), f32), "b": r.random(4, f32)})]
    for mode in ("constant", "reflect", "edge"):
        cases.append(g("Pad", [x4], {"mode": mode}, {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1],
                                                                   np.int64)}))
    # an attention neck's ops: qkv split by Gather, LayerNormalization, heads
    cases += [g("Gather", [(3, 2, 4, 5)], {"axis": 0}, {"i": np.array(1, np.int64)}),
              g("Gather", [x4], {"axis": 1}, {"i": np.array([2, 0], np.int64)}),
              g("LayerNormalization", [(2, 7, 16)], {"axis": -1, "epsilon": 1e-5},
                {"s": r.random(16, f32), "b": r.random(16, f32)}),
              g("LayerNormalization", [(2, 7, 16)], {"axis": -1}, {"s": r.random(16, f32)}),
              g("MatMul", [(2, 4, 7, 8), (2, 4, 8, 7)]),
              g("Transpose", [(3, 2, 4, 5, 6)], {"perm": [2, 0, 3, 1, 4]})]
    return cases


def harvest(paths_and_shapes, say) -> None:
    from .ops import all_variants

    all_variants()  # import every kernel module
    rng = np.random.default_rng(0)
    for label, graph, shapes in model_workloads(paths_and_shapes):
        t = time.perf_counter()
        n = exercise(graph, shapes, rng)
        say(f"  ran {label}: {n} kernel runs ({time.perf_counter() - t:.1f} s)")
    skipped, cases = [], zoo()
    for op, graph, shapes in cases:
        try:
            graph.toposort()
            exercise(graph, shapes, rng)
        except Exception as exc:  # noqa: BLE001 - a zoo case the runtime refuses is left out
            skipped.append(f"{op}: {exc}")
    say(f"  ran {len(cases) - len(skipped)} one-node graphs of other ops"
        + (f" ({len(skipped)} refused: {'; '.join(skipped)})" if skipped else ""))


# --- 2. export ------------------------------------------------------------------

def _type_key(t):
    """backend.value_key's entry for a Numba type, or None if pycc cannot take it."""
    from numba.core import types
    if isinstance(t, types.Array):
        if str(t.dtype) not in ("float32", "float64", "int8", "uint8", "int32", "int64",
                                "bool"):
            return None
        return (str(t.dtype), t.ndim, t.layout, not t.mutable)
    if isinstance(t, (types.Integer, types.Float, types.Boolean)) and not isinstance(
            t, types.Literal):
        return str(t)
    return None


def exports():
    """[(dispatcher, signature, key)] for every Numba function qnrt defines."""
    from numba.core.registry import CPUDispatcher

    out = []
    for name, module in sorted(sys.modules.items()):
        if not name.startswith("qnrt.") or module is None:
            continue
        for attr, obj in sorted(vars(module).items()):
            if not isinstance(obj, CPUDispatcher) or obj.py_func.__module__ != name:
                continue
            for sig, cres in obj.overloads.items():
                key = tuple(_type_key(t) for t in sig)
                if None not in key:
                    out.append((obj, cres.signature, key))
    return out


def export_all(entries, out_dir: str) -> str:
    """pycc-compile the entries into out_dir; returns the library's file name."""
    import llvmlite.binding as ll
    import numba.pycc.compiler as pycc_compiler
    from numba.core.compiler import Flags
    from numba.core.registry import cpu_target
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pycc's pending-deprecation notice
        from numba.pycc import CC

    cc = CC(be.MODULE_NAME)
    cc.output_dir = out_dir
    from numba.core import config
    cc.target_cpu = config.CPU_NAME or ll.get_host_cpu_name()  # the JIT's: same code, same sums
    options = {}
    for k, (disp, sig, key) in enumerate(entries):
        cc.export(f"k{k}", sig)(disp.py_func)
        options[disp.py_func] = disp.targetoptions

    real = pycc_compiler.compile_extra

    def compile_extra(typingctx, targetctx, func, args, return_type, flags, locals, **kw):
        own = Flags()  # the function's own options (error_model, fastmath, nogil ...)
        cpu_target.options.parse_as_flags(own, dict(options[func]))
        own.no_compile, own.nrt = flags.no_compile, flags.nrt
        own.no_cpython_wrapper, own.no_cfunc_wrapper = (flags.no_cpython_wrapper,
                                                        flags.no_cfunc_wrapper)
        return real(typingctx, targetctx, func, args, return_type, own, locals, **kw)

    pycc_compiler.compile_extra = compile_extra
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cc.compile()
    finally:
        pycc_compiler.compile_extra = real
    return cc.output_file


def build(paths_and_shapes, out_dir: str, say=print) -> dict:
    """Harvest, export, write `out_dir` atomically. Must run with the JIT backend."""
    if be.backend().name != "jit":
        raise BuildError("the build must run with the JIT backend (QNRT_JIT=1)")
    t0 = time.perf_counter()
    say(f"qnrt compile: numba {be.numba_version()}, CPU features {be.machine()['cpu_features']}")
    say("compiling every kernel with Numba while running the models ...")
    harvest(paths_and_shapes, say)
    entries = exports()
    say(f"exporting {len(entries)} kernel signatures "
        f"({len({id(e[0]) for e in entries})} functions) with numba.pycc ...")
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".build-", dir=out_dir)
    try:
        t = time.perf_counter()
        lib = export_all(entries, work)
        say(f"  compiled in {time.perf_counter() - t:.1f} s")
        source = be.source_hash()
        lib_name = f"{be.MODULE_NAME}-{source[:12]}{os.path.splitext(lib)[1] or '.so'}"
        manifest = {"format": be.FORMAT, "sources": source, "numba": be.numba_version(),
                    "machine": be.machine(), "library": lib_name,
                    "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "exports": [{"symbol": f"k{k}", "module": d.py_func.__module__,
                                 "function": d.py_func.__name__, "key": list(key)}
                                for k, (d, sig, key) in enumerate(entries)]}
        with open(os.path.join(work, be.MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(work, lib), os.path.join(out_dir, lib_name))
        os.replace(os.path.join(work, be.MANIFEST), os.path.join(out_dir, be.MANIFEST))
        for old in os.listdir(out_dir):  # libraries of earlier builds
            if old.startswith(be.MODULE_NAME) and old != lib_name:
                os.remove(os.path.join(out_dir, old))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = os.path.getsize(os.path.join(out_dir, lib_name))
    say(f"wrote {os.path.join(out_dir, lib_name)} ({size / 2**20:.1f} MiB) and its manifest "
        f"in {time.perf_counter() - t0:.0f} s")
    return manifest


def run_build(models=None, out_dir=None, shapes=None, say=print) -> int:
    """The build in a fresh process (JIT backend, empty Numba cache); returns its exit code."""
    check_toolchain()
    with tempfile.TemporaryDirectory(prefix="qnrt-numba-cache-") as cache:
        env = dict(os.environ, QNRT_JIT="1", NUMBA_CACHE_DIR=cache)
        cmd = [sys.executable, "-m", "qnrt.aot_build", "--out", out_dir or be.kernel_dir()]
        cmd += [arg for path, _ in models or [] for arg in ("--model", path)]
        cmd += [f"--input-shape={','.join(map(str, s))}" for s in shapes or []]
        return subprocess.call(cmd, env=env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qnrt.aot_build", description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--model", action="append", default=[])
    p.add_argument("--input-shape", action="append", default=[])
    args = p.parse_args(argv)
    shapes = [tuple(int(d) for d in s.split(",")) for s in args.input_shape]
    # the shipped QuickNet always; at the given shapes when no model of the user's is given
    models = [(m, shapes if shapes and not args.model else DEFAULT_SHAPES)
              for m in shipped_models()]
    for path in args.model:  # a model of the user's: the given shapes, else its own
        if not shapes:
            from .session import Session
            program = Session(path).prepare()
            shapes = [program.shapes[Session(path).get_inputs()[0].name]]
        models.append((path, shapes))
    try:
        build(models, args.out, say=lambda m: print(m, flush=True))
    except BuildError as exc:
        print(f"qnrt compile: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

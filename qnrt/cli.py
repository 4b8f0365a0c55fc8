"""qnrt command line: run, info, convert."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

EPILOG = """examples:
  qnrt run models/quicknet_digits.qnb examples/            classify every image in a folder
  qnrt run models/quicknet_digits_dc.qnb                   the examples installed with qnrt
  qnrt run model.qnb cat.png --top 3 --json                top-3 as JSON lines
  qnrt info model.qnb --input-shape 1,3,224,224            graph, parameters, planned arena
  qnrt convert model.onnx model.qnb --input-shape 1,3,32,32 --labels labels.txt
  qnrt compress model.qnb model_dc.qnb                     Deep Compression, decoded at load
  qnrt compile                                             build the kernels ahead of time
"""


class CliError(Exception):
    pass


def _threads(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not a thread count (0: every core)")
    return int(text)


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape like 1,3,32,32") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape of positive sizes")
    return dims


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:  # also false for nan
        raise argparse.ArgumentTypeError(f"'{text}' is not a fraction in [0, 1)")
    return value


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def bundled(path: str, package: str) -> str | None:
    """The copy installed with qnrt (package "qnrt.models" or "qnrt.examples") of
    a model or the examples folder named by `path`, when `path` itself does not
    exist: so `qnrt run models/quicknet_digits_dc.qnb examples/` works from any
    folder once qnrt is installed. None when qnrt carries nothing of that name."""
    from importlib.resources import files

    if os.path.exists(path):
        return None
    name = os.path.basename(os.path.normpath(path))
    try:
        root = files(package)
    except ModuleNotFoundError:
        return None
    if package == "qnrt.examples":  # a folder without __init__.py: find it by its files
        if name != "examples":
            return None
        pngs = [p for p in root.iterdir() if p.name.endswith(".png")]
        return os.path.dirname(str(pngs[0])) if pngs else None
    found = root / name
    return str(found) if name.endswith(".qnb") and found.is_file() else None


def cmd_run(args) -> int:
    from .image import (ImageError, check_preprocess, list_images, load_image,
                        skipped_subfolders)
    from .session import Session

    started = time.perf_counter()
    model = bundled(args.model, "qnrt.models")
    if model:
        print(f"qnrt: note: no file '{args.model}' here; running the one installed with qnrt "
              f"({model})", file=sys.stderr)
        args.model = model
    if not args.images:
        args.images = [bundled("examples", "qnrt.examples") or "examples"]
        print(f"qnrt: note: no image given; classifying the examples installed with qnrt "
              f"({args.images[0]})", file=sys.stderr)
    else:
        for i, path in enumerate(args.images):
            folder = bundled(path, "qnrt.examples")
            if folder:
                print(f"qnrt: note: no folder '{path}' here; using the examples installed with "
                      f"qnrt ({folder})", file=sys.stderr)
                args.images[i] = folder
    session = Session(args.model, kernels=args.kernels, num_threads=args.threads)
    _say_if_compiling()
    meta = session.metadata
    inp = session.get_inputs()[0]
    if len(inp.shape) != 4:
        raise CliError(f"'{args.model}' takes a {len(inp.shape)}-D input, not an image batch")
    layout = meta.get("model.input_layout") or (
        "NHWC" if inp.shape[3] in (1, 3) and inp.shape[1] not in (1, 3) else "NCHW")
    channels = inp.shape[3] if layout == "NHWC" else inp.shape[1]
    if not isinstance(channels, int):
        raise CliError(f"'{args.model}' does not say how many channels its input has")
    hw = inp.shape[1:3] if layout == "NHWC" else inp.shape[2:4]
    if "preprocess.size" not in meta and all(isinstance(d, int) for d in hw):
        meta = {**meta, "preprocess.size": list(hw)}  # a fixed-size model tells its size
    try:
        check_preprocess(meta, channels)
    except ImageError as exc:
        raise CliError(f"'{args.model}' cannot preprocess images: {exc}") from None
    paths = list_images(args.images, recursive=args.recursive)
    skipped = [] if args.recursive else skipped_subfolders(args.images)
    if skipped:
        print(f"qnrt: note: {len(skipped)} subfolder(s) not searched ({skipped[0]}, ...); "
              "--recursive walks them", file=sys.stderr)
    if not paths:
        raise CliError("no images found in " + ", ".join(args.images))
    labels = list(meta.get("labels", []))
    last_op = session.graph.nodes[-1].op if session.graph.nodes else ""
    untrained = meta.get("model.trained") is False
    if untrained:
        print("note: this model has deterministic initial weights, not trained ones; "
              "its answers are not meaningful", file=sys.stderr)
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None  # a model's fixed batch
    size = fixed or args.batch
    show_progress = len(paths) > size and sys.stderr.isatty() and not args.json
    failures = 0
    for start in range(0, len(paths), size):
        chunk, batch = [], []
        for p in paths[start:start + size]:
            try:
                batch.append(load_image(p, meta, channels, args.max_pixels))
                chunk.append(p)
            except ImageError as exc:
                failures += 1
                print(f"qnrt: error: {exc}", file=sys.stderr)
                if args.json:  # every image gets a record, a failed one too
                    print(json.dumps({"image": p, "error": str(exc)}))
        if not batch:
            continue
        if show_progress:  # the results start on a clean line
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        x = np.stack(batch + [np.zeros_like(batch[0])] * ((fixed or len(batch)) - len(batch)))
        if layout == "NHWC":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        outputs = [o[:len(batch)] for o in session.run(None, {inp.name: x})]
        if len(outputs) > 1 or outputs[0][0].squeeze().ndim > 1:  # not one score vector
            _print_outputs(chunk, session.get_outputs(), outputs, args.json)
            continue
        scores = outputs[0].reshape(len(batch), -1)
        probs = scores if last_op == "Softmax" else _softmax(scores)
        for path, p in zip(chunk, probs):
            top = np.argsort(-p, kind="stable")[:args.top]
            picks = [{"label": labels[k] if k < len(labels) else str(k), "index": int(k),
                      "probability": float(p[k])} for k in top]
            if args.json:
                print(json.dumps({"image": path, "top": picks, "trained": not untrained}))
            else:
                print(f"{path}: " + ", ".join(f"{t['label']} ({t['probability']:.3f})"
                                              for t in picks))
        if show_progress:
            sys.stdout.flush()
            print(f"\r{min(start + size, len(paths))}/{len(paths)} images", end="",
                  file=sys.stderr, flush=True)
    if show_progress:
        print("\r\033[K", end="", file=sys.stderr)
    if len(paths) > 1:
        print(f"qnrt: {len(paths)} images, {failures} failed, "
              f"{time.perf_counter() - started:.2f} s", file=sys.stderr)
    return 1 if failures else 0


def _print_outputs(paths, infos, outputs, as_json) -> None:
    """A model that is not a one-vector classifier: each output's shape and range."""
    for i, path in enumerate(paths):
        summary = {o.name: {"shape": list(v[i].shape), "min": float(v[i].min()),
                            "max": float(v[i].max()), "mean": float(v[i].mean())}
                   for o, v in zip(infos, outputs)}
        if as_json:
            print(json.dumps({"image": path, "outputs": summary}))
        else:
            print(f"{path}: " + "; ".join(
                f"{name} {'x'.join(map(str, d['shape'])) or 'scalar'} min {d['min']:.4g} "
                f"max {d['max']:.4g} mean {d['mean']:.4g}" for name, d in summary.items()))


def open_dimensions(session, shape) -> None:
    """CliError if planning would have to guess the input's height or width."""
    inp = session.get_inputs()[0]
    guessed = [d for d in inp.shape[1:] if isinstance(d, str)]
    if shape is None and guessed and "preprocess.size" not in session.metadata:
        example = ",".join(str(d) if isinstance(d, int) else "1" if k == 0 else "224"
                           for k, d in enumerate(inp.shape))
        raise CliError(f"input '{inp.name}' has open dimensions {guessed} "
                       f"({inp.shape}) and the model names no size: give --input-shape, "
                       f"e.g. --input-shape {example}")


def cmd_info(args) -> int:
    from . import format as qnb
    from .session import Session

    header = qnb.info(args.model)
    session = Session(args.model, kernels=args.kernels, num_threads=args.threads)
    graph = session.graph
    shape = args.input_shape
    inp = session.get_inputs()[0]
    open_dimensions(session, shape)
    program = session.prepare({inp.name: shape} if shape else None)
    ops: dict[str, int] = {}
    for n in graph.nodes:
        key = n.op + (f"+{n.attrs['activation']}" if n.attrs.get("activation") else "")
        ops[key] = ops.get(key, 0) + 1
    report = {
        "model": args.model,
        "file_bytes": os.path.getsize(args.model),
        "format_version": header.get("version"),
        "name": graph.name,
        "metadata": graph.metadata,
        "inputs": [vars(i) for i in session.get_inputs()],
        "outputs": [vars(o) for o in session.get_outputs()],
        "parameters": graph.parameter_count(),
        "nodes": len(graph.nodes),
        "ops": ops,
        "planned_input_shapes": {k: list(v) for k, v in program.shapes.items()
                                 if k in {i.name for i in graph.inputs}},
        "arena_bytes": program.memory.arena_bytes,
        "naive_activation_bytes": program.unfused.naive_bytes,
        "lower_bound_bytes": program.unfused.lower_bound,
        "unfused_arena_bytes": program.unfused.arena_bytes,
        "streamed_groups": [f"{g.links[0].node.name}..{g.links[-1].node.name} "
                            f"({g.band} rows per band"
                            + (f", {'images' if g.row_parts[0].images else 'rows'} in "
                               f"{len(g.row_parts)} ranges" if g.row_parts else "")
                            + ")" for g in program.groups],
        "kernel_backend": session.kernel_backend,
        "threads": session.num_threads,
        "split_steps": sum(step.kernel.parts > 1 for step in program.steps),
        "steps": _step_report(graph, program),
    }
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"{args.model}: {graph.name}, .qnb v{report['format_version']}, "
          f"{report['file_bytes'] / 2**20:.2f} MiB on disk")
    for k, v in graph.metadata.items():
        if k != "labels":
            print(f"  {k}: {v}")
    if "labels" in graph.metadata:
        print(f"  labels: {', '.join(map(str, graph.metadata['labels']))}")
    for i in session.get_inputs():
        print(f"input  {i.name}: {i.type} {i.shape}")
    for o in session.get_outputs():
        print(f"output {o.name}: {o.type} {o.shape}")
    print(f"parameters: {report['parameters']:,}")
    print(f"nodes: {len(graph.nodes)} (" + ", ".join(f"{k} x{v}" for k, v in ops.items()) + ")")
    print(f"activation arena for {report['planned_input_shapes']}: "
          f"{report['arena_bytes'] / 1024:.1f} KiB (unfused plan "
          f"{report['unfused_arena_bytes'] / 1024:.1f} KiB, tensor-level lower bound "
          f"{report['lower_bound_bytes'] / 1024:.1f} KiB, naive "
          f"{report['naive_activation_bytes'] / 1024:.1f} KiB)")
    if report["streamed_groups"]:
        print("streamed: " + "; ".join(report["streamed_groups"]))
    from .backend import backend
    print(f"kernels: {session.kernel_backend} ({backend().reason or backend().where})")
    print(f"threads: {report['threads']}" + (
        f" ({report['split_steps']} of {len(program.steps)} steps split into parts for them)"
        if report["threads"] > 1 else ""))
    print("steps:")
    width = max((len(st["node"]) for st in report["steps"]), default=4)
    for k, st in enumerate(report["steps"]):
        shape = "x".join(map(str, st["output_shape"]))
        band = f"  streamed ({st['streamed']})" if st["streamed"] else ""
        print(f"  {k:>3} {st['node']:<{width}}  {st['kernel']:<24} {shape}{band}")
    return 0


def _step_report(graph, program) -> list[dict]:
    """One entry per node: its kernel variant, output shape, and the streamed
    group it runs in (if any)."""
    out_of = {n.name: n.outputs[0] for n in graph.nodes}
    rows = []
    for st in program.steps:
        group = (f"{st.members[0][0]}..{st.members[-1][0]}" if st.op == "Stream" else None)
        for name, variant in st.members:
            rows.append({"node": name, "kernel": variant,
                         "output_shape": list(program.shapes[out_of[name]]),
                         "streamed": group,
                         "workspace_bytes": st.kernel.workspace if group is None else 0})
    return rows


def cmd_convert(args) -> int:
    try:
        from qnrt.exporters.convert import convert
    except ImportError as exc:
        raise CliError(f"qnrt convert needs the exporter extras ({exc}); "
                       "install them with: pip install 'qnrt[export]'") from None
    try:
        convert(args.input, args.output, input_shape=args.input_shape, labels=args.labels,
                preprocess=args.preprocess, nchw_input=args.nchw_input,
                log=lambda msg: print(msg, file=sys.stderr))
    except ModuleNotFoundError as exc:
        raise CliError(missing_extra(exc.name, f"converting {args.input}")) from None
    return 0


def cmd_compile(args) -> int:
    from .aot_build import BuildError, run_build
    from .backend import kernel_dir

    models = [(m, [tuple(s) for s in args.input_shape]) for m in args.model]
    for path, _ in models:
        if not os.path.isfile(path):
            raise CliError(f"{path}: no such file")
    try:
        return run_build(models, args.out or kernel_dir(), [tuple(s) for s in args.input_shape])
    except BuildError as exc:
        raise CliError(str(exc)) from None


def _say_if_compiling() -> None:
    """One line before a run that will compile kernels (a cold Numba cache)."""
    from .backend import backend, jit_cache_is_cold
    if backend().name == "jit" and jit_cache_is_cold():
        print("qnrt: compiling kernels for this machine, once (about 30 s; later runs load "
              "them from the cache). `qnrt compile` builds them ahead of time.",
              file=sys.stderr)


EXTRAS = {"onnx": "pip install 'qnrt[export]'", "h5py": "pip install 'qnrt[export]'",
          "torch": "pip install 'qnrt[train]' (torch 2.13.0, CPU)",
          "onnxruntime": "pip install 'qnrt[bench]'"}


def missing_extra(module: str | None, doing: str) -> str:
    """One line naming what to install for a missing optional dependency."""
    top = (module or "").split(".")[0]
    return (f"{doing} needs the '{top}' package, which is not installed: "
            f"{EXTRAS.get(top, f'pip install {top}')}")


def cmd_compress(args) -> int:
    try:
        from qnrt.exporters.compress import compress_file
    except ImportError as exc:
        raise CliError(f"qnrt compress needs the exporters package ({exc})") from None
    compress_file(args.input, args.output, bits=args.bits, prune=args.prune,
                  log=lambda msg: print(msg, file=sys.stderr))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qnrt", description="Run QuickNet-style CNNs from .qnb files on small devices.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    from .image import MAX_PIXELS
    parser.add_argument("--version", action="version", version=f"qnrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="classify images with a .qnb model",
                         description="Preprocess each image as the model's metadata says, "
                                     "run the model, print the top-k labels.")
    run.add_argument("model", help="a .qnb model file")
    run.add_argument("images", nargs="*",
                     help="image files or folders of images (none: the examples installed with qnrt)")
    run.add_argument("--top", type=int, default=3, help="how many labels to print (default 3)")
    run.add_argument("--json", action="store_true", help="one JSON object per image")
    run.add_argument("--batch", type=int, default=16, help="images per run (default 16)")
    run.add_argument("--recursive", "-r", action="store_true",
                     help="also classify the images in subfolders of the folders given")
    run.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                     help=f"refuse images larger than this (default {MAX_PIXELS:,}, Pillow's "
                          "decompression-bomb limit)")
    run.add_argument("--kernels", choices=["auto", "reference"], default="auto",
                     help="kernel variants: the fastest that apply (auto, default) or every "
                          "op's plain reference (slow; for checking a result)")
    run.add_argument("--threads", type=_threads, default=0, metavar="N",
                     help="threads per run (default 0: every core; 1: the calling thread only)")
    run.add_argument("-v", "--verbose", action="store_true",
                      help="say which kernel backend runs and why")
    run.set_defaults(func=cmd_run)

    info = sub.add_parser("info", help="describe a .qnb model and its memory plan",
                          description="Print a .qnb model's metadata, inputs and outputs, "
                                      "parameter count, op counts, file size, the planned "
                                      "activation arena for one input shape and the kernel "
                                      "variant of every step.")
    info.add_argument("model", help="a .qnb model file")
    info.add_argument("--input-shape", type=_shape, help="plan for this input shape, e.g. "
                      "1,3,224,224 (default: the model's, batch 1)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--threads", type=_threads, default=0, metavar="N",
                      help="plan for N threads (default 0: every core)")
    info.add_argument("--kernels", choices=["auto", "reference"], default="auto",
                      help="which kernel variants to plan with (default auto)")
    info.add_argument("-v", "--verbose", action="store_true",
                      help="say which kernel backend runs and why")
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser("convert", help="convert an ONNX or Keras .h5 model to .qnb",
                          description="Import, clean up and optimize a model, then write it "
                                      "as .qnb (atomically). Needs: pip install 'qnrt[export]'.")
    conv.add_argument("input", help="model.onnx, model.h5, a QuickNet state dict "
                      "(.safetensors, .pt/.pth/.bin) or a .qnb")
    conv.add_argument("output", help="the .qnb to write")
    conv.add_argument("--input-shape", type=_shape,
                      help="fix the input's dynamic dimensions, e.g. 1,3,32,32")
    conv.add_argument("--labels", help="a text file with one class label per line")
    conv.add_argument("--preprocess", action="append", default=[], metavar="KEY=VALUE",
                      help="preprocessing metadata, one KEY=VALUE per flag, repeat the flag: "
                           "--preprocess size=32,32 --preprocess mean=0.5,0.5,0.5 "
                           "(keys: size, mean, std, scale, mode, resample, channel_order, "
                           "native_size)")
    conv.add_argument("--nchw-input", action="store_true",
                      help="an NHWC model input followed by a Transpose becomes an NCHW input "
                           "(what `qnrt run` feeds images as); default: keep the model's own")
    conv.set_defaults(func=cmd_convert)

    build = sub.add_parser("compile", help="build the kernels ahead of time for this machine",
                           description="Compile every kernel with numba.pycc into one native "
                                       "module for this machine, so that later processes "
                                       "import neither numba nor llvmlite (faster start, less "
                                       "memory). Runs the shipped QuickNet, and the models "
                                       "given, on every kernel variant to find the argument "
                                       "types. Needs numba, gcc and g++; takes 1-2 min.")
    build.add_argument("--model", action="append", default=[], metavar="MODEL.qnb",
                       help="also cover this model's kernels (repeatable)")
    build.add_argument("--input-shape", type=_shape, action="append", default=[],
                       help="input shapes to cover (repeatable; default: each --model's own, "
                            "and 1x3x32x32, 4x3x32x32, 1x3x224x224 for the shipped QuickNet)")
    build.add_argument("--out", help="where to write the build (default: $QNRT_KERNEL_DIR, "
                                     "else ~/.cache/qnrt/kernels)")
    build.set_defaults(func=cmd_compile)

    comp = sub.add_parser("compress", help="Deep Compression: k-means weight sharing + Huffman",
                          description="Quantize each large weight tensor to a per-layer codebook "
                                      "(k-means), Huffman-code the indices and the gaps between "
                                      "non-zeros, and write a .qnb the runtime decodes at load. "
                                      "Prune first (tools/train.py --prune) for the full effect.")
    comp.add_argument("input", help="the .qnb to compress")
    comp.add_argument("output", help="the compressed .qnb to write")
    comp.add_argument("--bits", type=int, choices=range(1, 9), metavar="N",
                      help="codebook bits for every tensor (default: 4 for 1x1 convs, 5 for "
                           "dense layers, 8 for depthwise and 3x3)")
    comp.add_argument("--prune", type=_fraction, metavar="F",
                      help="also magnitude-prune this fraction of each weight tensor (no "
                           "fine-tuning; accuracy drops: prefer pruning in training)")
    comp.set_defaults(func=cmd_compress)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        import logging
        logging.basicConfig(level=logging.INFO, format="qnrt: %(message)s")
    if getattr(args, "top", 1) < 1 or getattr(args, "batch", 1) < 1:
        print("qnrt: error: --top and --batch must be at least 1", file=sys.stderr)
        return 2
    from .format import FormatError
    from .graph import GraphError
    from .image import ImageError
    from .session import InvalidArgument

    try:
        return args.func(args)
    except FileNotFoundError as exc:
        print(f"qnrt: error: {exc.filename or exc}: no such file", file=sys.stderr)
    except (CliError, FormatError, GraphError, ImageError, InvalidArgument, ValueError) as exc:
        print("qnrt: error: " + "".join(c if c.isprintable() else " " for c in str(exc)),
              file=sys.stderr)  # one line, even when the message quotes a file's bytes
    except MemoryError:
        print("qnrt: error: out of memory (is the input shape what you meant?)", file=sys.stderr)
    except BrokenPipeError:  # e.g. `qnrt info m.qnb | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a full disk, a read-only folder, ...: one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"qnrt: error: {where}{exc.strerror or exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("qnrt: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())

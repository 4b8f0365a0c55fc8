"""python -m qnrt.exporters: QuickNet from its neutral description to ONNX and .qnb,
or any supported model file to .qnb.

  python -m qnrt.exporters quicknet --qnb quicknet.qnb --onnx quicknet.onnx
  python -m qnrt.exporters quicknet --weights trained.npz --labels labels.txt --qnb q.qnb \
      --preprocess mean=0.5,0.5,0.5 --preprocess std=0.5,0.5,0.5
  python -m qnrt.exporters convert model.onnx model.qnb --input-shape 1,3,32,32
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from qnrt.cli import _shape


def cmd_quicknet(args) -> int:
    from qnrt.models import quicknet
    from qnrt import format as qnb

    from .convert import finalize, parse_preprocess, read_labels

    weights = None
    if args.weights:
        with np.load(args.weights) as data:
            weights = {k: data[k] for k in data.files}
    labels = read_labels(args.labels) if args.labels else None
    graph = quicknet.build(weights, width=args.width, num_classes=args.classes,
                           input_size=args.input_size or None, seed=args.seed, labels=labels)
    graph.metadata["model.trained"] = weights is not None
    graph.metadata["model.weights"] = args.weights or f"deterministic initial (seed {args.seed})"
    graph.metadata.update(parse_preprocess(args.preprocess))
    if args.onnx:
        from .onnx_export import save_onnx

        save_onnx(graph, args.onnx)
        print(f"wrote {args.onnx}", file=sys.stderr)
    if args.qnb:
        finalize(graph, log=lambda m: print(m, file=sys.stderr))
        size = qnb.save(graph, args.qnb)
        print(f"wrote {args.qnb} ({size / 2**20:.2f} MiB)", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from .convert import convert

    convert(args.input, args.output, args.input_shape, args.labels, args.preprocess,
            nchw_input=args.nchw_input, log=lambda m: print(m, file=sys.stderr))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qnrt.exporters", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quicknet", help="build QuickNet from the layer table (+ optional weights)",
                       description="QuickNet from models/quicknet.py's layer table, with "
                                   "neutral .npz weights or deterministic initial ones, "
                                   "written as ONNX (BN and PReLU as their own nodes) and/or "
                                   ".qnb (folded and fused).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--weights", help="neutral .npz weights (names as in models/quicknet.py); "
                   "none: deterministic initial weights")
    q.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    q.add_argument("--classes", type=int, default=10, help="number of classes")
    q.add_argument("--input-size", type=int, default=0,
                   help="fix H = W of the input; 0: any size (the net is fully convolutional)")
    q.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    q.add_argument("--labels", help="text file, one class label per line")
    q.add_argument("--preprocess", action="append", default=[], metavar="KEY=VALUE",
                   help="preprocessing the model expects, one KEY=VALUE per flag (size, mean, "
                        "std, scale, mode, resample, channel_order, native_size)")
    q.add_argument("--onnx", help="write ONNX here")
    q.add_argument("--qnb", help="write .qnb here (batch norm folded, activations fused)")
    q.set_defaults(func=cmd_quicknet)
    c = sub.add_parser("convert", help="ONNX / Keras .h5 / state dict -> .qnb (as qnrt convert)",
                       description="Import a model, clean it up, fold and fuse, check the "
                                   "runtime can plan it, then write .qnb atomically.")
    c.add_argument("input", help=".onnx, .h5, .safetensors, .pt/.pth/.bin or .qnb")
    c.add_argument("output", help="the .qnb to write")
    c.add_argument("--input-shape", type=_shape, help="fix dynamic input dimensions, e.g. 1,3,32,32")
    c.add_argument("--labels", help="text file, one class label per line")
    c.add_argument("--preprocess", action="append", default=[], metavar="KEY=VALUE",
                   help="preprocessing metadata, one KEY=VALUE per flag")
    c.add_argument("--nchw-input", action="store_true",
                   help="turn an NHWC input + Transpose into an NCHW input")
    c.set_defaults(func=cmd_convert)
    args = parser.parse_args(argv)
    if not (getattr(args, "onnx", 1) or getattr(args, "qnb", 1)):
        parser.error("quicknet: give --onnx and/or --qnb")
    from qnrt.format import FormatError
    from qnrt.graph import GraphError

    try:
        return args.func(args)
    except (OSError, FormatError, GraphError, ValueError) as exc:
        print(f"qnrt.exporters: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

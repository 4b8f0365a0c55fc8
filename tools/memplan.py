#!/usr/bin/env python3
"""Report a .qnb model's activation memory plan.

For every step: the op, the buffers live during it and their bytes. Then the
planned arena, the naive sum of all activations (every tensor its own
allocation), and the tensor-level lower bound (the largest set of buffers
live at one step), with how close the plan comes to that bound.

    python tools/memplan.py models/quicknet_digits.qnb --input-shape 1,3,224,224
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qnrt.cli import CliError, _shape, open_dimensions  # noqa: E402
from qnrt.format import FormatError  # noqa: E402
from qnrt.graph import GraphError  # noqa: E402
from qnrt.planner import READ_AFTER_RUN  # noqa: E402
from qnrt.session import Session  # noqa: E402


def report(model: str, input_shape=None) -> dict:
    session = Session(model)
    name = session.get_inputs()[0].name
    open_dimensions(session, input_shape)
    program = session.prepare({name: input_shape} if input_shape else None)
    mem = program.memory
    sizes = {b.name: b.size for b in mem.buffers}
    steps = []
    for index, names in enumerate(mem.live_per_step):
        s = index - 1  # live_per_step starts with the inputs, before step 0
        label = "(inputs)" if s < 0 else f"{program.steps[s].node_name}"
        op = "" if s < 0 else program.steps[s].op
        steps.append({"step": s, "node": label, "op": op,
                      "live": {n: sizes[n] for n in names},
                      "live_bytes": sum(sizes[n] for n in names)})
    return {
        "model": model,
        "input_shapes": {k: list(v) for k, v in program.shapes.items()
                         if k in {i.name for i in session.get_inputs()}},
        "steps": steps,
        "buffers": [{"name": b.name, "bytes": b.size, "offset": b.offset, "first": b.first,
                     "last": "after run" if b.last >= READ_AFTER_RUN else b.last}
                    for b in sorted(mem.buffers, key=lambda b: b.offset)],
        "arena_bytes": mem.arena_bytes,
        "naive_bytes": mem.naive_bytes,
        "lower_bound_bytes": mem.lower_bound,
        "arena_over_bound": mem.arena_bytes / mem.lower_bound if mem.lower_bound else 1.0,
    }


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 2**20 else f"{n / 2**20:,.2f} MiB"


def print_report(r: dict) -> None:
    print(f"{r['model']}  input {r['input_shapes']}")
    print(f"{'step':>4}  {'op':<18} {'node':<28} {'live':>12}  live buffers")
    for s in r["steps"]:
        live = ", ".join(f"{n} {_kib(b)}" for n, b in s["live"].items())
        print(f"{s['step']:>4}  {s['op']:<18} {s['node'][:28]:<28} {_kib(s['live_bytes']):>12}  {live}")
    print(f"planned arena      {_kib(r['arena_bytes'])}")
    print(f"naive sum          {_kib(r['naive_bytes'])}  "
          f"({r['naive_bytes'] / max(r['arena_bytes'], 1):.1f}x the arena)")
    print(f"lower bound        {_kib(r['lower_bound_bytes'])}  (largest live set)")
    gap = r["arena_bytes"] - r["lower_bound_bytes"]
    verdict = "the plan meets the bound" if gap <= 0 else \
        f"the plan is {_kib(gap)} ({100 * (r['arena_over_bound'] - 1):.1f} %) above the bound"
    print(f"arena / bound      {r['arena_over_bound']:.3f}: {verdict}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("model", help="a .qnb model file")
    parser.add_argument("--input-shape", type=_shape,
                        help="e.g. 1,3,224,224 (default: the model's shape, batch 1)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        r = report(args.model, args.input_shape)
    except FileNotFoundError:
        print(f"memplan: error: {args.model}: no such file", file=sys.stderr)
        return 1
    except (OSError, FormatError, GraphError, CliError) as exc:
        print(f"memplan: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print_report(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())

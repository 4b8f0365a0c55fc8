#!/usr/bin/env python3
"""Report a .qnb model's activation memory plan.

For every step of the plan a Session runs: the op (a streamed group of ops
is one step, named by its first and last node), the buffers live during it
and their bytes. Then the naive sum of all activations, the tensor-level
lower bound (the largest set of whole tensors live at one step of the
unfused plan: what any tensor-by-tensor planner needs), the unfused plan's
arena, the chosen plan's arena and its ratio to the bound, and the streamed
groups with their band heights.

    python tools/memplan.py models/quicknet_digits.qnb --input-shape 1,3,224,224
    python tools/memplan.py models/quicknet_digits.qnb --input-shape 1,3,224,224 \\
        --arena-limit 5MiB --png arena.png

--json gives arena_bytes (what a Session allocates), lower_bound_bytes and
unfused_arena_bytes, among the rest; --png draws the arena over the steps.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qnrt.cli import CliError, _shape, open_dimensions  # noqa: E402
from qnrt.compiler import ArenaLimitError  # noqa: E402
from qnrt.format import FormatError  # noqa: E402
from qnrt.graph import GraphError  # noqa: E402
from qnrt.planner import READ_AFTER_RUN  # noqa: E402
from qnrt.session import Session  # noqa: E402

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30}


def byte_size(text: str) -> int:
    """'5000000', '4.5MiB', '800KiB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 4MiB, 800KiB or 5000000")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive size")
    return value


def report(model: str, input_shape=None, arena_limit=None, streaming=True) -> dict:
    session = Session(model, arena_limit=arena_limit, streaming=streaming)
    name = session.get_inputs()[0].name
    open_dimensions(session, input_shape)
    program = session.prepare({name: input_shape} if input_shape else None)
    mem, unfused = program.memory, program.unfused
    sizes = {b.name: b.size for b in mem.buffers}
    first_node = {}  # node index -> the step it starts (lifetimes count nodes; a group spans several)
    k = 0
    for step in program.steps:
        first_node[k] = step
        k += len(step.members)
    steps = []
    for index, names in enumerate(mem.live_per_step):
        s = index - 1  # live_per_step starts with the inputs, before node 0
        if s >= 0 and s not in first_node:
            continue  # inside a streamed group: the same buffers as at its first node
        step = first_node.get(s)
        if step is None:
            label, op = "(inputs)", ""
        elif step.op == "Stream":
            label, op = f"{step.members[0][0]}..{step.members[-1][0]}", "Stream"
        else:
            label, op = step.node_name, step.op
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
        "groups": [{"first": g.links[0].node.name, "last": g.links[-1].node.name,
                    "band_rows": g.band, "rows_per_op": list(g.rows),
                    "workspace_bytes": g.workspace} for g in program.groups],
        "arena_bytes": mem.arena_bytes,
        "naive_bytes": unfused.naive_bytes,
        "lower_bound_bytes": unfused.lower_bound,
        "unfused_arena_bytes": unfused.arena_bytes,
        "arena_over_bound": mem.arena_bytes / unfused.lower_bound if unfused.lower_bound else 1.0,
        "arena_limit": arena_limit,
        "_plan": mem,  # for --png; dropped from --json
        "_nodes": len(mem.live_per_step) - 1,
    }


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 2**20 else f"{n / 2**20:,.2f} MiB"


def print_report(r: dict) -> None:
    print(f"{r['model']}  input {r['input_shapes']}")
    print(f"{'step':>4}  {'op':<18} {'node':<28} {'live':>12}  live buffers")
    for s in r["steps"]:
        live = ", ".join(f"{n} {_kib(b)}" for n, b in s["live"].items())
        print(f"{s['step']:>4}  {s['op']:<18} {s['node'][:28]:<28} {_kib(s['live_bytes']):>12}  {live}")
    for g in r["groups"]:
        print(f"streamed           {g['first']} .. {g['last']}: {g['band_rows']} rows per band, "
              f"band buffers {_kib(g['workspace_bytes'])}")
    print(f"naive sum          {_kib(r['naive_bytes'])}  (every tensor its own allocation)")
    print(f"lower bound        {_kib(r['lower_bound_bytes'])}  (largest set of whole tensors "
          "live at one step)")
    print(f"unfused arena      {_kib(r['unfused_arena_bytes'])}")
    print(f"planned arena      {_kib(r['arena_bytes'])}"
          + (f"  (arena_limit {_kib(r['arena_limit'])})" if r["arena_limit"] else ""))
    print(f"arena / bound      {r['arena_over_bound']:.3f}")


def draw_png(r: dict, path: str) -> None:
    """The arena over time: steps across, offsets up, one box per buffer, the
    peak marked. Written to a temporary file first, then renamed."""
    from PIL import Image, ImageDraw

    plan, steps = r["_plan"], max(1, r["_nodes"])
    width, height, left, bottom, top = 1200, 700, 70, 40, 40
    arena = max(plan.arena_bytes, 1)
    scale_x = (width - left - 20) / (steps + 1)
    scale_y = (height - bottom - top) / max(arena, r["lower_bound_bytes"])
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    palette = [(76, 114, 176), (221, 132, 82), (85, 168, 104), (196, 78, 82), (129, 114, 179),
               (147, 120, 96), (218, 139, 195), (140, 140, 140), (204, 185, 116), (100, 181, 205)]
    for k, b in enumerate(sorted(plan.buffers, key=lambda b: (b.first, b.offset))):
        last = min(b.last, steps - 1)
        x0, x1 = left + (b.first + 1) * scale_x, left + (last + 2) * scale_x
        y1 = height - bottom - b.offset * scale_y
        y0 = height - bottom - (b.offset + b.size) * scale_y
        color = palette[k % len(palette)]
        d.rectangle([x0, y0, x1 - 1, max(y0, y1 - 1)], fill=color, outline="black")
        if x1 - x0 > 60 and y1 - y0 > 12:
            d.text((x0 + 3, y0 + 2), b.name[:int((x1 - x0) / 7)], fill="white")
    for value, label, color in ((arena, "arena", (200, 0, 0)),
                                (r["lower_bound_bytes"], "tensor-level bound", (0, 0, 0))):
        y = height - bottom - value * scale_y
        d.line([left, y, width - 20, y], fill=color, width=2)
        d.text((left + 4, y - 14), f"{label} {_kib(value)}", fill=color)
    d.line([left, height - bottom, width - 20, height - bottom], fill="black")
    d.line([left, top, left, height - bottom], fill="black")
    d.text((left, height - bottom + 8), f"nodes 0 .. {steps - 1} (a streamed group spans "
                                        "its nodes)   "
                                        f"{r['model']}  {r['input_shapes']}", fill="black")
    d.text((4, top), "offset", fill="black")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("model", help="a .qnb model file")
    parser.add_argument("--input-shape", type=_shape,
                        help="e.g. 1,3,224,224 (default: the model's shape, batch 1)")
    parser.add_argument("--arena-limit", type=byte_size, metavar="SIZE",
                        help="plan as Session(arena_limit=SIZE) does: the fastest schedule "
                             "whose arena fits (e.g. 5MiB)")
    parser.add_argument("--no-streaming", action="store_true",
                        help="the unfused plan (every node on whole tensors)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--png", metavar="FILE", help="draw the arena over the steps to FILE")
    args = parser.parse_args(argv)
    try:
        r = report(args.model, args.input_shape, args.arena_limit, not args.no_streaming)
        if args.png:
            draw_png(r, args.png)
    except FileNotFoundError:
        print(f"memplan: error: {args.model}: no such file", file=sys.stderr)
        return 1
    except (OSError, FormatError, GraphError, CliError, ArenaLimitError) as exc:
        print(f"memplan: error: {exc}", file=sys.stderr)
        return 1
    public = {k: v for k, v in r.items() if not k.startswith("_")}
    if args.json:
        print(json.dumps(public, indent=2))
    else:
        print_report(public)
        if args.png:
            print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Per-node timing of a qnrt Session: where a run spends its time.

Runs the model's program step by step (the same kernels, arena views and
workspaces `Session.run` uses), times every step with perf_counter over
`--repeat` runs, and prints each node's median time, its share of the total,
its kernel variant, its output shape and, for convolutions, the multiply-adds and GFLOP/s.
Sorted slowest first; `--order` keeps graph order instead.

    python tools/profile_nodes.py model.qnb --input-shape 1,3,224,224 --repeat 20
    python tools/profile_nodes.py model.qnb --threads 2 --json

The session runs on `--threads` threads (default 1: one core, as
tools/bench.py's 1-thread cases); numpy's BLAS is kept to one thread, as in
Session.run. Timings on a shared machine are noisy:
compare nodes within one run, and whole runs against onnxruntime with
tools/bench.py (interleaved).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from qnrt.cli import _shape  # noqa: E402
from qnrt.format import FormatError  # noqa: E402
from qnrt.graph import GraphError  # noqa: E402
from qnrt.session import Session  # noqa: E402


def _macs(step) -> int:
    """Multiply-adds of a Conv/Gemm/MatMul step (0 for other ops)."""
    if step.op == "Conv":
        w, y = step.inputs[1], step.outputs[0]
        return int(np.prod(y.shape)) * int(np.prod(w.shape[1:]))
    if step.op in ("Gemm", "MatMul"):
        a, y = step.inputs[0], step.outputs[0]
        return int(np.prod(y.shape)) * int(a.shape[-1])
    return 0


def profile(model: str, input_shape=None, repeat: int = 20, warmup: int = 3,
            streaming: bool = False, threads: int = 1) -> dict:
    """Per step; by default on the unfused plan, so that every node is a step
    (with streaming, a streamed group is one step, named first..last)."""
    session = Session(model, streaming=streaming, num_threads=threads)
    inp = session.get_inputs()[0]
    program = session.prepare({inp.name: input_shape} if input_shape else None)
    x = np.random.default_rng(0).standard_normal(program.shapes[inp.name]).astype(np.float32)
    np.copyto(program.views[inp.name], x)
    steps = program.steps
    times = [[] for _ in steps]
    totals = []
    clock = time.perf_counter
    for r in range(warmup + repeat):
        np.copyto(program.views[inp.name], x)
        t_run = clock()
        for k, step in enumerate(steps):
            t = clock()
            step.kernel.run(step.inputs, step.outputs, step.workspace)
            times[k].append(clock() - t)
        if r >= warmup:
            totals.append(clock() - t_run)
    rows = []
    by_name = {n.name: n for n in session.graph.nodes}
    for k, step in enumerate(steps):
        ms = 1e3 * statistics.median(times[k][warmup:])
        macs = _macs(step)
        node = by_name.get(step.members[0][0], session.graph.nodes[0])
        act = node.attrs.get("activation") if step.op != "Stream" else None
        label = (f"{step.members[0][0]}..{step.members[-1][0]}" if step.op == "Stream"
                 else step.node_name or node.outputs[0])
        rows.append({"index": k, "node": label,
                     "op": step.op + (f"+{act}" if act else ""), "kernel": step.kernel.name,
                     "in_shape": list(step.inputs[0].shape) if step.inputs and step.inputs[0] is not None else [],
                     "out_shape": list(step.outputs[0].shape),
                     "ms": ms, "macs": macs,
                     "gflops": 2e-6 * macs / ms if macs and ms > 0 else 0.0,
                     "workspace": step.workspace.nbytes if step.workspace is not None else 0})
    step_sum = sum(r["ms"] for r in rows)
    for r in rows:
        r["share"] = r["ms"] / step_sum if step_sum else 0.0
    by_op: dict[str, float] = {}
    for r in rows:
        by_op[r["op"]] = by_op.get(r["op"], 0.0) + r["ms"]
    return {"model": model, "input_shape": list(program.shapes[inp.name]), "repeat": repeat,
            "total_ms": 1e3 * statistics.median(totals), "sum_of_medians_ms": step_sum,
            "arena_bytes": program.memory.arena_bytes, "by_op": by_op, "nodes": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a .qnb model")
    p.add_argument("--input-shape", type=_shape, help="e.g. 1,3,224,224 (default: the model's)")
    p.add_argument("--repeat", type=int, default=20, help="timed runs (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="the session's num_threads (default 1)")
    p.add_argument("--order", action="store_true", help="graph order instead of slowest first")
    p.add_argument("--streaming", action="store_true",
                   help="profile the default (streamed) plan: each streamed group is one row")
    p.add_argument("--top", type=int, default=0, help="print only the N slowest nodes")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from qnrt.threads import blas_threads
    blas = blas_threads()
    blas.enter(args.threads)  # numpy's BLAS on one thread, as during Session.run
    try:
        rep = profile(args.model, args.input_shape, max(1, args.repeat), max(0, args.warmup),
                      args.streaming, args.threads)
    except (OSError, FormatError, GraphError) as e:
        print(f"profile: {e}", file=sys.stderr)
        return 2
    finally:
        blas.exit(args.threads)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    rows = rep["nodes"] if args.order else sorted(rep["nodes"], key=lambda r: -r["ms"])
    if args.top:
        rows = rows[:args.top]
    print(f"{rep['model']}  input {tuple(rep['input_shape'])}  median of {rep['repeat']} runs, "
          f"arena {rep['arena_bytes'] / 2**20:.2f} MiB")
    print(f"{'#':>3} {'node':<28} {'op':<14} {'kernel':<24} {'output':<20} {'ms':>8} "
          f"{'share':>6} {'GFLOP/s':>8}")
    for r in rows:
        shape = "x".join(str(d) for d in r["out_shape"])
        gf = f"{r['gflops']:8.1f}" if r["gflops"] else ""
        print(f"{r['index']:>3} {r['node'][:28]:<28} {r['op'][:14]:<14} {r['kernel'][:24]:<24} "
              f"{shape:<20} "
              f"{r['ms']:8.3f} {100 * r['share']:5.1f}% {gf:>8}")
    print("by op: " + ", ".join(f"{k} {v:.2f} ms" for k, v in
                               sorted(rep["by_op"].items(), key=lambda kv: -kv[1])))
    print(f"total: {rep['total_ms']:.3f} ms per run (median; sum of per-node medians "
          f"{rep['sum_of_medians_ms']:.3f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

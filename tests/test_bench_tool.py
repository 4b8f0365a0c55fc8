"""A small seeded slice of tools/bench.py (the full run is a campaign: see the
README's Speed section): one tiny shape, one thread, one round, no cold start.
It checks the report's shape and that every engine's output agrees with ONNX
Runtime's, not any timing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_reports_every_engine_against_onnx_runtime():
    pytest.importorskip("onnxruntime")
    proc = subprocess.run([sys.executable, "tools/bench.py", "--shapes", "1x3x16x16",
                           "--rounds", "1", "--threads", "1", "--cold", "0", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["machine"]["threads"] == [1] and "blas" in report["machine"]
    [run] = report["runs"]
    assert run["shape"] == [1, 3, 16, 16] and run["threads"] == 1
    engines = run["engines"]
    assert {"qnrt", "onnxruntime"} <= set(engines)
    for name, e in engines.items():
        assert e["median_ms"] > 0 and e["p10_ms"] <= e["median_ms"] <= e["p90_ms"], name
        tolerance = 1e-2 if "int8" in name else 1e-4
        assert e["max_abs_diff_vs_onnxruntime"] < tolerance, name
    assert run["qnrt_over_floor"] > 1.0  # nothing runs faster than the sgemm peak
    assert run["macs"] > 0 and run["floor_ms"] > 0
    # the qnrt / peer ratios are computed from the medians, not taken from elsewhere
    q = engines["qnrt"]["median_ms"]
    for name, e in engines.items():
        assert e["qnrt_over_this"] == pytest.approx(q / e["median_ms"]), name

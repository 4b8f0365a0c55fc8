"""The seeded fuzzers of tools/fuzz.py, a small slice in CI: mutated .qnb
files through Session and run, mutated ONNX files through `qnrt convert`, each
case in a worker process under RLIMIT_AS and a time limit, so that a crash, a
hang or an allocation beyond the Limits is caught and reported, not fatal.
Only documented exceptions (qnrt.QnrtError) may come out.

The long campaign is `python tools/fuzz.py --cases 100000` (see its --help)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QNB_CASES, ONNX_CASES = 2400, 1200  # about 25 s and 12 s on two cores


@pytest.fixture(scope="module")
def fuzz():
    # imported by name from tools/ (on sys.path, which spawned workers inherit)
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        yield importlib.import_module("fuzz")
    finally:
        sys.path.remove(str(ROOT / "tools"))


def _assert_clean(report, cases, kinds):
    summary = report.to_json()
    assert report.total == cases, summary
    assert not report.defects, summary  # each defect class with the case numbers to replay
    assert set(report.kinds) == set(kinds), summary  # every mutation kind was exercised
    assert report.counts["refused"] > cases // 4 and report.counts["ran"] > cases // 20, summary


def test_mutated_qnb_files_raise_only_documented_errors(fuzz):
    report = fuzz.run_pool("qnb", seed=2026, cases=range(QNB_CASES), workers=2, timeout=20)
    _assert_clean(report, QNB_CASES, fuzz.QNB_KINDS)


def test_mutated_onnx_files_convert_or_raise_only_documented_errors(fuzz):
    report = fuzz.run_pool("onnx", seed=2026, cases=range(ONNX_CASES), workers=2, timeout=20)
    _assert_clean(report, ONNX_CASES, fuzz.ONNX_KINDS)


def test_the_pool_catches_crashes_hangs_and_allocations(fuzz):
    """Case k % 5 of the self-test target: runs, is refused, segfaults, sleeps
    forever, allocates 64 GiB (refused by RLIMIT_AS as a MemoryError)."""
    report = fuzz.run_pool("selftest", seed=0, cases=range(10), workers=2, timeout=3)
    assert dict(report.counts) == {"ran": 2, "refused": 2, "crash": 2, "timeout": 2,
                                   "memory": 2}, report.to_json()
    assert sorted(report.defects["crash: worker died (signal 11)"]) == [2, 7]
    assert sorted(report.defects["timeout: over 3 s"]) == [3, 8]


def test_the_campaign_tool_has_help_and_reports_a_seeded_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    help_text = subprocess.run([sys.executable, "tools/fuzz.py", "--help"], cwd=ROOT, env=env,
                               capture_output=True, text=True, check=True).stdout
    for words in ("--cases", "--seed", "--replay", "RLIMIT_AS", "bitflip", "synthetic"):
        assert words in help_text
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "tools/fuzz.py", "--target", "qnb", "--cases", "40",
                          "--seed", "5", "--workers", "1", "--json", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "40/40 cases" in run.stderr and '"cases": 40' in out.read_text()

"""The models we ship: right answers on the shipped examples, the same accuracy
from PyTorch, ONNX Runtime and qnrt, and Deep Compression under 1 MB."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from qnrt.cli import main as qnrt_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP32 = os.path.join(ROOT, "models", "quicknet_digits.qnb")
COMPRESSED = os.path.join(ROOT, "models", "quicknet_digits_dc.qnb")
EXAMPLES = os.path.join(ROOT, "examples")


def _evaluate_module():
    spec = importlib.util.spec_from_file_location("qnrt_evaluate", os.path.join(ROOT, "tools", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", [FP32, COMPRESSED])
def test_run_names_every_example_digit(model, capsys):
    assert qnrt_main(["run", model, EXAMPLES, "--json", "--top", "1"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == len([f for f in os.listdir(EXAMPLES) if f.endswith(".png")]) >= 10
    for r in records:
        truth = os.path.basename(r["image"]).split("_")[1].split(".")[0]
        assert r["top"][0]["label"] == truth, r
        assert r["trained"]


def test_compressed_model_is_under_one_megabyte():
    assert os.path.getsize(COMPRESSED) < 1_000_000
    assert os.path.getsize(FP32) / os.path.getsize(COMPRESSED) >= 14


@pytest.fixture(scope="module")
def accuracy():
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("sklearn")
    evaluate = _evaluate_module().evaluate
    return {path: evaluate(path) for path in (FP32, COMPRESSED)}


@pytest.mark.parametrize("model", [FP32, COMPRESSED])
def test_three_engines_agree(accuracy, model):
    r = accuracy[model]
    assert r["images"] == 360
    assert r["agreement_qnrt_onnxruntime"] >= 0.995 and r["agreement_qnrt_pytorch"] >= 0.995
    accs = [r["pytorch_accuracy"], r["onnxruntime_accuracy"], r["qnrt_accuracy"]]
    assert max(accs) - min(accs) <= 0.001
    assert r["qnrt_accuracy"] >= 0.97


def test_compression_costs_at_most_half_a_point(accuracy):
    assert accuracy[COMPRESSED]["qnrt_accuracy"] >= accuracy[FP32]["qnrt_accuracy"] - 0.005

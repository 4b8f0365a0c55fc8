"""The qnrt command line and tools/memplan.py, as a user calls them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from qnrt.models import quicknet
from qnrt import Session, format as qnb
from qnrt.cli import main as qnrt_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    g = quicknet.build(width=0.125, labels=[f"class{i}" for i in range(10)])
    g.metadata["model.trained"] = False
    path = d / "small.qnb"
    qnb.save(g, path)
    return str(path)


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), "L").save(tmp_path / "b.png")
    Image.fromarray(rng.integers(0, 255, (50, 50, 4), dtype=np.uint8), "RGBA").save(tmp_path / "c.png")
    return tmp_path


def test_run_folder_prints_topk_and_untrained_note(small_model, images, capsys):
    assert qnrt_main(["run", small_model, str(images), "--top", "2"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all(line.count("(") == 2 for line in lines)
    assert "initial weights" in err


def test_run_json_matches_session(small_model, images, capsys):
    from qnrt.image import load_image

    assert qnrt_main(["run", small_model, str(images / "a.png"), "--json", "--top", "10"]) == 0
    record = json.loads(capsys.readouterr().out)
    sess = Session(small_model)
    x = load_image(str(images / "a.png"), sess.metadata)[None]
    (probs,) = sess.run(None, {"input": x})
    got = {t["index"]: t["probability"] for t in record["top"]}
    np.testing.assert_allclose([got[i] for i in range(10)], probs[0], rtol=1e-6)
    assert record["top"][0]["label"] == f"class{int(probs.argmax())}"


def test_unreadable_image_is_reported_and_others_still_run(small_model, images, capsys):
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    assert qnrt_main(["run", small_model, str(images / "broken.png"), str(images / "a.png")]) == 1
    out, err = capsys.readouterr()
    assert "broken.png" in err and "not a readable image" in err
    assert "a.png" in out


@pytest.mark.parametrize("argv, message", [
    (["run", "missing.qnb", "x.png"], "no such file"),
    (["info", __file__], "not a .qnb"),
])
def test_errors_are_one_clear_line(argv, message, capsys):
    assert qnrt_main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_info_reports_graph_and_arena(small_model, capsys):
    assert qnrt_main(["info", small_model, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == Session(small_model).graph.parameter_count()
    assert info["lower_bound_bytes"] <= info["arena_bytes"] < info["naive_activation_bytes"]
    assert info["ops"]["Conv+PRelu"] == 25 and info["ops"]["Conv"] == 1


def test_memplan_report(small_model):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "memplan.py"), small_model,
                          "--input-shape", "2,3,64,64", "--json", "--no-streaming"],
                         capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    assert r["input_shapes"] == {"input": [2, 3, 64, 64]}
    assert r["lower_bound_bytes"] == max(s["live_bytes"] for s in r["steps"])
    assert r["lower_bound_bytes"] <= r["arena_bytes"] <= r["naive_bytes"]
    assert r["arena_bytes"] == r["unfused_arena_bytes"] and r["groups"] == []
    text = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "memplan.py"), small_model],
                          capture_output=True, text=True, check=True).stdout
    assert "lower bound" in text and "arena / bound" in text


def test_help_explains_commands():
    out = subprocess.run([sys.executable, "-m", "qnrt", "--help"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    for word in ("run", "info", "convert", "examples"):
        assert word in out


def test_memplan_streamed_plan_limit_and_png(small_model, tmp_path):
    memplan = os.path.join(ROOT, "tools", "memplan.py")
    png = tmp_path / "arena.png"
    out = subprocess.run([sys.executable, memplan, small_model, "--input-shape", "1,3,256,256",
                          "--arena-limit", "2MiB", "--json", "--png", str(png)],
                         capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    assert r["arena_bytes"] <= 2 * 2**20 < r["lower_bound_bytes"] <= r["unfused_arena_bytes"]
    assert r["groups"] and all(g["band_rows"] >= 1 for g in r["groups"])
    assert abs(r["arena_over_bound"] - r["arena_bytes"] / r["lower_bound_bytes"]) < 1e-9
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 600
    assert [p.name for p in tmp_path.iterdir()] == ["arena.png"]  # nothing half-written left
    bad = subprocess.run([sys.executable, memplan, small_model, "--arena-limit", "lots"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a size" in bad.stderr and "Traceback" not in bad.stderr
    tiny = subprocess.run([sys.executable, memplan, small_model, "--input-shape", "1,3,160,160",
                           "--arena-limit", "1000"], capture_output=True, text=True)
    assert tiny.returncode == 1 and "smallest arena reachable" in tiny.stderr
    assert len(tiny.stderr.strip().splitlines()) == 1

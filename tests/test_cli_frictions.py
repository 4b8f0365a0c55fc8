"""What a new user meets (issue 13): each test reproduces a friction found by
trying qnrt as a new user would, and checks the behaviour that replaced it."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import qnrt
from qnrt import format as qnb
from qnrt.graph import Graph, Node, ValueInfo
from qnrt.models import quicknet
from qnrt.session import IgnoredOptionWarning, SessionOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def expected_label(filename: str) -> str:
    """What an example image shows, by its name: digit_<d>_... or not_a_digit_..."""
    return "not a digit" if filename.startswith("not_a_digit") else filename.split("_")[1].split(".")[0]


def qnrt_cli(*args, pre=""):
    code = pre + "import sys; from qnrt.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def test_a_model_with_a_fixed_batch_of_one_classifies_a_folder(tmp_path):
    g = quicknet.build(width=0.125, input_size=32)
    g.inputs[0].shape = (1, 3, 32, 32)  # what torch.onnx.export and --input-shape 1,... make
    path = tmp_path / "static.qnb"
    qnb.save(g, path)
    out = qnrt_cli("run", path, EXAMPLES)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == len(os.listdir(EXAMPLES))


def test_a_missing_extra_is_one_line_naming_what_to_install(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    out = qnrt_cli("convert", tmp_path / "m.onnx", tmp_path / "m.qnb",
                   pre="import sys; sys.modules['onnx'] = None\n")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "pip install 'qnrt[export]'" in out.stderr
    assert not (tmp_path / "m.qnb").exists()


def dynamic_model(tmp_path):
    g = quicknet.build(width=0.125, input_size=None)  # ('N', 3, 'H', 'W')
    g.metadata.pop("preprocess.size", None)
    path = tmp_path / "dynamic.qnb"
    qnb.save(g, path)
    return path


def test_open_height_and_width_ask_for_an_input_shape(tmp_path):
    path = dynamic_model(tmp_path)
    out = qnrt_cli("info", path)
    assert out.returncode == 1 and "give --input-shape, e.g. --input-shape 1,3,224,224" in out.stderr
    memplan = subprocess.run([sys.executable, "tools/memplan.py", str(path)], cwd=ROOT,
                             capture_output=True, text=True)
    assert memplan.returncode == 1 and "give --input-shape" in memplan.stderr
    assert qnrt_cli("info", path, "--input-shape", "1,3,32,32").returncode == 0


def test_a_model_that_is_not_a_classifier_prints_its_outputs(tmp_path):
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    g = Graph([Node("Conv", ["x", "w"], ["maps"], {"pads": [1] * 4}, "conv"),
               Node("GlobalAveragePool", ["maps"], ["pooled"], {}, "gap")],
              [ValueInfo("x", ("N", 3, 8, 8))],
              [ValueInfo("maps", ("N", 4, 8, 8)), ValueInfo("pooled", ("N", 4, 1, 1))], {"w": w})
    path = tmp_path / "two_outputs.qnb"
    qnb.save(g, path)
    out = qnrt_cli("run", path, os.path.join(EXAMPLES, "digit_7.png"))
    assert out.returncode == 0, out.stderr
    assert "maps 4x8x8 min" in out.stdout and "pooled 4x1x1 min" in out.stdout
    js = qnrt_cli("run", path, os.path.join(EXAMPLES, "digit_7.png"), "--json")
    assert '"outputs"' in js.stdout and '"shape": [4, 8, 8]' in js.stdout


@pytest.mark.parametrize("head, says", [(b"\x08\x08\x12\x07pytorch", "ONNX model: convert it"),
                                        (b"\x89PNG\r\n\x1a\n", "the model comes first")])
def test_an_onnx_file_or_swapped_arguments_say_what_to_do(tmp_path, head, says):
    path = tmp_path / "given.bin"
    path.write_bytes(head + b"\0" * 100)
    out = qnrt_cli("run", path, os.path.join(EXAMPLES, "digit_7.png"))
    assert out.returncode == 1 and says in out.stderr and "Traceback" not in out.stderr


def test_ort_style_options_exist_and_what_is_ignored_is_said():
    g = quicknet.build(width=0.125, input_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qnrt.Session(g, providers=["CPUExecutionProvider"])
        qnrt.Session(g, SessionOptions())
    assert not caught
    with pytest.warns(IgnoredOptionWarning, match="CUDAExecutionProvider"):
        qnrt.Session(g, providers=["CUDAExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredOptionWarning)  # honoured: no warning
        assert qnrt.Session(g, qnrt.SessionOptions(intra_op_num_threads=2)).num_threads == 2
    with pytest.warns(IgnoredOptionWarning, match="inter_op_num_threads"):
        qnrt.Session(g, qnrt.SessionOptions(inter_op_num_threads=4))


def test_the_program_cache_is_bounded():
    sess = qnrt.Session(quicknet.build(width=0.125, input_size=None), max_programs=2)
    first = sess.prepare({"input": (1, 3, 32, 32)})
    sess.prepare({"input": (1, 3, 40, 40)})
    assert sess.prepare({"input": (1, 3, 32, 32)}) is first  # a hit moves it to the front
    sess.prepare({"input": (1, 3, 48, 48)})  # evicts 40x40, the least recently used
    assert len(sess._programs) == 2
    assert sess.prepare({"input": (1, 3, 32, 32)}) is first
    with pytest.raises(ValueError, match="max_programs"):
        qnrt.Session(quicknet.build(width=0.125), max_programs=0)


def test_qnrt_compile_without_a_compiler_says_what_to_install(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    env["PATH"] = str(tmp_path)  # no cc, gcc, c++ or g++ here
    out = subprocess.run([sys.executable, "-m", "qnrt", "compile", "--out", str(tmp_path / "k")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "needs a C compiler and a C++ compiler" in out.stderr and "apt install gcc g++" in out.stderr
    assert not (tmp_path / "k").exists()


def test_bad_preprocess_options_are_refused_at_convert(tmp_path):
    from qnrt.exporters.convert import parse_preprocess
    for bad, says in ((["size=64"], "two positive ints"), (["std=0,1,1"], "must not be 0"),
                      (["resample=cubic"], "must be one of")):
        with pytest.raises(qnrt.GraphError, match=says):
            parse_preprocess(bad)
    g = quicknet.build(width=0.125, input_size=32)
    g.metadata["preprocess.size"] = [64]  # a file written before the check
    path = tmp_path / "bad_meta.qnb"
    qnb.save(g, path)
    out = qnrt_cli("run", path, EXAMPLES)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "metadata 'preprocess.size' must be [height, width]" in out.stderr  # at load
    assert "not [64]" in out.stderr


def test_json_gives_a_failed_image_a_record_and_a_folder_run_a_summary(tmp_path):
    import json
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    out = qnrt_cli("run", "models/quicknet_digits_dc.qnb", tmp_path / "broken.png",
                   os.path.join(EXAMPLES, "digit_7.png"), "--json")
    assert out.returncode == 1
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert records[0]["image"].endswith("broken.png") and "not a readable image" in records[0][
        "error"]
    assert records[1]["top"][0]["label"] == "7"
    assert "qnrt: 2 images, 1 failed," in out.stderr


def test_version_recursive_empty_files_and_huge_images(tmp_path):
    assert qnrt_cli("--version").stdout.strip() == f"qnrt {qnrt.__version__}"
    from PIL import Image
    (tmp_path / "sub").mkdir()
    Image.open(os.path.join(EXAMPLES, "digit_7.png")).save(tmp_path / "sub" / "seven.png")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("L", (3000, 3000)).save(tmp_path / "big.png")
    model = "models/quicknet_digits_dc.qnb"
    flat = qnrt_cli("run", model, tmp_path)
    assert "1 subfolder(s) not searched" in flat.stderr and "--recursive" in flat.stderr
    assert "empty.png: empty file (0 bytes)" in flat.stderr
    assert "big.png: 3000x3000 is more than 1,000,000 pixels" in qnrt_cli(
        "run", model, tmp_path / "big.png", "--max-pixels", "1000000").stderr
    deep = qnrt_cli("run", model, tmp_path, "--recursive")
    assert "seven.png: 7" in deep.stdout and "not searched" not in deep.stderr


def test_run_takes_nested_lists_and_load_image_a_session():
    from qnrt.image import load_image
    sess = qnrt.Session("models/quicknet_digits_dc.qnb")
    x = load_image(os.path.join(EXAMPLES, "digit_7.png"), sess)[None]
    (a,) = sess.run(None, {"input": x})
    (b,) = sess.run(None, {"input": x.tolist()})
    np.testing.assert_array_equal(a, b)
    with pytest.raises(qnrt.session.InvalidArgument, match="rectangular"):
        sess.run(None, {"input": [[1.0, 2.0], [3.0]]})


def test_a_write_that_fails_is_one_error_line(tmp_path):
    """A full disk or a folder that cannot be written: no traceback, old file kept."""
    import errno

    from qnrt import cli

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.qnb"))

    import qnrt.format
    original = qnrt.format.save
    qnrt.format.save = no_space
    try:
        import contextlib
        import io
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(["compress", "models/quicknet_digits.qnb", str(tmp_path / "out.qnb")])
    finally:
        qnrt.format.save = original
    assert code == 1
    lines = err.getvalue().strip().splitlines()
    assert lines[-1].endswith("out.qnb: No space left on device") and "Traceback" not in err.getvalue()


def test_the_wheel_carries_the_models_and_examples_and_the_first_command_runs(tmp_path):
    """`pip install qnrt` users can try the README's first command: the wheel holds
    the shipped models and every example image, and from a folder holding neither,
    the installed package runs `qnrt run models/quicknet_digits_dc.qnb examples/`
    (and the same without the folder) on its own copies, reading every example right."""
    import json
    import sysconfig
    import zipfile

    import shutil

    # Built from a clean copy: setuptools' build/ in the tree could hold stale files.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache"))
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(dist)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("qnrt-*.whl")
    pngs = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".png"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {"qnrt/models/quicknet_digits.qnb", "qnrt/models/quicknet_digits_dc.qnb"} <= names
        assert {f"qnrt/examples/{f}" for f in pngs} <= names and len(pngs) >= 10
        for f in pngs:
            with open(os.path.join(EXAMPLES, f), "rb") as src:
                assert z.read(f"qnrt/examples/{f}") == src.read()
        z.extractall(tmp_path / "site")
    # The installed layout only: -S keeps site-packages' .pth files (and so the
    # editable install of this tree) out; numpy, numba and pillow come by path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"),
                                                        sysconfig.get_paths()["purelib"]])}
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    code = "import sys; from qnrt.cli import main; sys.exit(main(sys.argv[1:]))"
    for images in (["examples/"], []):
        out = subprocess.run([sys.executable, "-S", "-c", code, "run", "models/quicknet_digits_dc.qnb",
                              *images, "--json", "--top", "1"],
                             cwd=empty, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "installed with qnrt" in out.stderr
        records = [json.loads(line) for line in out.stdout.splitlines()]
        assert sorted(os.path.basename(r["image"]) for r in records) == pngs
        for r in records:
            assert r["image"].startswith(str(tmp_path / "site")), r["image"]
            assert r["top"][0]["label"] == expected_label(os.path.basename(r["image"])), r

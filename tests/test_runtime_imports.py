"""The runtime needs only numpy, numba, pillow and the standard library."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys
for banned in ("onnx", "onnxruntime", "torch", "h5py", "scipy", "sklearn", "qnrt.exporters"):
    sys.modules[banned] = None  # any import of these now raises ImportError
import numpy as np
import qnrt
from qnrt.models import quicknet
from qnrt import format as qnb
path = sys.argv[1]
qnb.save(quicknet.build(width=0.125), path)
sess = qnrt.Session(path)
(p,) = sess.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})
assert abs(float(p.sum()) - 1) < 1e-5
import qnrt.cli, qnrt.image
from PIL import Image
x = qnrt.image.preprocess(Image.new("L", (8, 8)), sess.metadata)
assert x.shape == (3, 32, 32)
print(sorted(m for m, mod in sys.modules.items() if mod is not None))
"""


def test_runtime_runs_without_export_dependencies(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "m.qnb")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    modules = eval(out.stdout)
    loaded = {m.split(".")[0] for m in modules}
    assert {"numpy", "numba", "PIL", "qnrt"} <= loaded
    banned = {"onnx", "onnxruntime", "torch", "h5py", "scipy", "sklearn", "exporters", "models"}
    assert not loaded & banned
    assert not [m for m in modules if m.startswith("qnrt.exporters")]


def test_import_qnrt_loads_no_compiler():
    code = ("import sys, qnrt; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'numba', 'llvmlite', 'scipy', 'PIL', 'onnx'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

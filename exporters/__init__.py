"""Converters between the qnrt Graph IR and other formats: ONNX (onnx_import,
onnx_export), Keras .h5 (keras_h5), Deep Compression (compress). Submodules
load lazily, so the numpy-only ones (compress) work without onnx installed."""
from importlib import import_module

_LAZY = {"from_onnx": "onnx_import", "to_onnx": "onnx_export", "save_onnx": "onnx_export",
         "from_h5": "keras_h5", "compress_file": "compress", "compress_graph": "compress"}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)

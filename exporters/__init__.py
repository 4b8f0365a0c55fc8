"""Converters between the qnrt Graph IR and other formats (ONNX)."""
from .onnx_export import save_onnx, to_onnx
from .onnx_import import from_onnx

__all__ = ["from_onnx", "to_onnx", "save_onnx"]

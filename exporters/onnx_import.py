from_onnx = None

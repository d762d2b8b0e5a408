"""GPU target presets, shape profiles, ONNX memory estimates, TensorRT builds and the artifact manifest."""

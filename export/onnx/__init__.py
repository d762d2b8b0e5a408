"""ONNX export of the deployment components, precision variants and validation against eager."""

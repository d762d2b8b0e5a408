"""GPU target presets, shape profiles, TensorRT builds and the artifact manifest (not built yet)."""

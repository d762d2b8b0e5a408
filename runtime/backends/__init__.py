"""Backends, one module each, behind one small interface (``base.Backend``):

- ``base``: the interface and ``OwnStream`` (a backend's own CUDA stream, ordered with events).
- ``registry``: the backends by name, how each opens and what it needs; ``register`` adds one.
- ``onnxruntime``: ONNX Runtime sessions on the folder's graphs (CPU, CUDA, TensorRT providers;
  the folder's int8 CPU graphs).
- ``pytorch``: the eager or compiled models rebuilt from the folder's weights.
- ``decoder_elsewhere``: the pass on one backend, the decoder on another.
- ``tensorrt`` (with ``tensorrt_rtx``, its TensorRT-RTX parts): the folder's TensorRT engines, either flavour.

Importing a backend module registers it; importing this package registers the built-in ones.
"""

from __future__ import annotations

from .base import Backend, BackendUnavailable, OwnStream, Tensors
from .decoder_elsewhere import DecoderElsewhere
from .onnxruntime import OnnxRuntimeBackend, require_provider, tensorrt_provider_options
from .pytorch import COMPILE_MODES, TORCH_PRECISIONS, TorchBackend
from .tensorrt import TensorRTBackend

__all__ = ["COMPILE_MODES", "TORCH_PRECISIONS", "Backend", "BackendUnavailable", "DecoderElsewhere",
           "OnnxRuntimeBackend", "OwnStream", "Tensors", "TensorRTBackend", "TorchBackend", "require_provider",
           "tensorrt_provider_options"]

"""Backend availability: clear errors where a backend cannot run."""

from __future__ import annotations

import pytest
import torch

from engines.tensorrt_build import tensorrt_version
from runtime import BackendUnavailable, Upscaler
from runtime.tensorrt_backend import TensorRTBackend


@pytest.mark.skipif(tensorrt_version() is not None, reason="checks the message given without TensorRT")
def test_tensorrt_backend_without_tensorrt_says_what_to_install(tmp_path):
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed \(pip install -e '.\[trt\]'\)"):
        TensorRTBackend(tmp_path, torch.device("cpu"))


def test_unknown_backend_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of auto, tensorrt, onnxruntime, onnxruntime-tensorrt, torch"):
        Upscaler.load(tmp_path, backend="openvino")

"""The ONNX activation-memory estimate used to size profiles."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.memory import GraphMemoryModel, MemoryEstimateError
from export.onnx.components import COMPONENTS, Models
from export.onnx.exporter import export_component


def _chain_graph():
    """x -> a = Relu(x) -> b = Relu(a) -> y = Add(b, x) + w: x stays live until the end."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, "h", "w"])
    weight = numpy_helper.from_array(np.ones((1, 4, 1, 1), np.float32), "w")
    big = numpy_helper.from_array(np.zeros((1000,), np.float16), "unused_big")
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Add", ["b", "x"], ["c"]),
        helper.make_node("Add", ["c", "w"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "chain", [x], [y], initializer=[weight, big])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_peak_counts_tensors_live_at_once_and_weights_separately():
    model = GraphMemoryModel(_chain_graph())
    tensor = 2 * 4 * 16 * 8 * 4  # one [2,4,16,8] fp32 activation
    estimate = model.estimate({"x": (2, 4, 16, 8)})
    # At the second Relu x, a and b are alive; at each Add x (or c), its other input and the output.
    assert estimate.activations == 3 * tensor
    assert estimate.weights == 4 * 4 + 1000 * 2
    assert estimate.total == estimate.activations + estimate.weights


def test_missing_or_wrong_rank_inputs_are_errors():
    model = GraphMemoryModel(_chain_graph())
    with pytest.raises(ValueError, match="no shape given for graph input"):
        model.estimate({})
    with pytest.raises(ValueError, match="rank 4"):
        model.estimate({"x": (2, 4, 16)})


def test_exported_unet_estimate_scales_with_area_and_batch(small_unet, tmp_path):
    spec = COMPONENTS["unet"]
    models = Models(unet=small_unet)
    path = export_component(spec, models, "fp16", tmp_path / "unet.onnx").path
    memory = GraphMemoryModel(path)

    def activations(batch, side):
        return memory.estimate(spec.input_shapes(models, batch, side, side)).activations

    # Every activation of this convolutional graph scales with the spatial area (the
    # resized side inputs included, which ONNX's own shape inference cannot size).
    assert activations(1, 64) == pytest.approx(4 * activations(1, 32), rel=0.05)
    assert activations(2, 32) == pytest.approx(2 * activations(1, 32), rel=0.01)
    # At least the largest tensors: the fp16 concatenation of two full-size feature maps.
    width = small_unet.config["base_channels"]
    assert activations(1, 64) > 2 * width * 64 * 64 * 2


def test_without_onnxruntime_the_module_imports_and_the_estimate_names_the_extras(monkeypatch):
    import subprocess
    import sys

    blocked = "import sys; sys.modules['onnxruntime'] = None; import engines.memory"
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    model = GraphMemoryModel(_chain_graph())
    for name in [m for m in sys.modules if m == "onnxruntime" or m.startswith("onnxruntime.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ModuleNotFoundError
    with pytest.raises(MemoryEstimateError, match="onnxruntime is not installed") as error:
        model.estimate({"x": (2, 4, 16, 8)})
    assert "pip install -e '.[cpu]'" in str(error.value) and "pip install -e '.[gpu]'" in str(error.value)


def test_onnxruntime_older_than_1_31_is_refused_before_it_can_mis_size(monkeypatch):
    import onnxruntime

    model = GraphMemoryModel(_chain_graph())
    # 1.30.0 measured: its shape inference fails the exported U-Net (Shape start/end ignored).
    monkeypatch.setattr(onnxruntime, "__version__", "1.30.0")
    with pytest.raises(MemoryEstimateError, match=r"needs onnxruntime >= 1\.31, this is 1\.30\.0"):
        model.estimate({"x": (2, 4, 16, 8)})
    monkeypatch.setattr(onnxruntime, "__version__", "1.31.0")
    assert model.estimate({"x": (2, 4, 16, 8)}).activations > 0

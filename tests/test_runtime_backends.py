"""Backend availability: clear errors where a backend cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engines.manifest import load_manifest
from engines.tensorrt_build import tensorrt_version
from runtime import BackendUnavailable, Upscaler
from runtime.cpu import cpu_matrix_units
from runtime.backends.tensorrt import TensorRTBackend


@pytest.mark.skipif(tensorrt_version() is not None, reason="checks the message given without TensorRT")
def test_tensorrt_backend_without_tensorrt_says_what_to_install():
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed \(pip install -e '.\[trt\]'\)"):
        TensorRTBackend({}, torch.device("cpu"), flavour="tensorrt")


def test_tensorrt_backend_on_a_folder_without_manifest_says_so(tmp_path):
    with pytest.raises(BackendUnavailable, match=f"{tmp_path} has no manifest.json; build it with"):
        TensorRTBackend.from_folder(tmp_path, torch.device("cpu"))


def test_unknown_backend_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of auto, tensorrt, onnxruntime, onnxruntime-tensorrt, torch"):
        Upscaler.load(tmp_path, backend="openvino")


def test_a_session_that_lost_its_provider_is_refused(small_artifacts):
    """ONNX Runtime drops a provider that fails to load and runs on what is left: a real session
    running on the CPU provider must not pass for a TensorRT one."""
    import onnxruntime as ort

    from runtime.backends import require_provider

    graph = small_artifacts / load_manifest(small_artifacts).components["unet"].onnx_file
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailable, match=r"could not start TensorrtExecutionProvider for unet.fp16.onnx \(the session runs on CPUExecutionProvider\)"):
        require_provider(session, "TensorrtExecutionProvider", graph)
    require_provider(session, "CPUExecutionProvider", graph)


def test_tensorrt_provider_options_carry_cache_profiles_and_precision(small_artifacts, tmp_path):
    from runtime.backends import tensorrt_provider_options

    record = load_manifest(small_artifacts).components["unet"]
    options = tensorrt_provider_options(record, tmp_path, 1)
    # the three octave profiles of the small build (sample 16..64), as one span tuned at the first
    assert options["trt_profile_min_shapes"] == "sample:1x32x16x16,cond:1x64,lr1:1x32x8x8,lr2:1x32x4x4,lr3:1x32x2x2"
    assert options["trt_profile_opt_shapes"] == "sample:1x32x16x16,cond:1x64,lr1:1x32x8x8,lr2:1x32x4x4,lr3:1x32x2x2"
    assert options["trt_profile_max_shapes"] == "sample:4x32x64x64,cond:4x64,lr1:4x32x32x32,lr2:4x32x16x16,lr3:4x32x8x8"
    assert options["device_id"] == 1 and options["trt_engine_cache_path"] == str(tmp_path)
    assert options["trt_engine_cache_enable"] is True and options["trt_timing_cache_path"] == str(tmp_path)
    assert options["trt_engine_cache_prefix"] == f"unet_fp16_{record.onnx_sha256[:16]}"
    assert options["trt_fp16_enable"] is True and "trt_bf16_enable" not in options
    record.precision = "fp8"
    with pytest.raises(BackendUnavailable, match="cannot build fp8 graphs as typed; use the tensorrt backend"):
        tensorrt_provider_options(record, tmp_path, 0)


def test_onnxruntime_tensorrt_on_the_cpu_is_refused_before_any_session(small_artifacts):
    with pytest.raises(BackendUnavailable, match="needs a CUDA device, got cpu"):
        Upscaler.load(small_artifacts, backend="onnxruntime-tensorrt", device="cpu")
    assert not (small_artifacts / "onnxruntime_tensorrt_cache").exists()


def test_a_graph_gone_since_the_manifest_check_is_named_as_gone_not_as_bf16(small_artifacts, tmp_path):
    """A build replacing the folder under a load deleted a fp16 graph; the refusal once blamed bf16."""
    import shutil

    from runtime.backends import OnnxRuntimeBackend

    folder = tmp_path / "art"
    shutil.copytree(small_artifacts, folder)
    manifest = load_manifest(folder)
    unet = folder / manifest.components["unet"].onnx_file
    unet.unlink()
    graphs = {name: folder / record.onnx_file for name, record in manifest.components.items()}
    with pytest.raises(BackendUnavailable) as refused:
        OnnxRuntimeBackend(graphs, torch.device("cpu"), provider="cpu")
    assert "unet.fp16.onnx: the file is gone" in str(refused.value) and "bf16" not in str(refused.value)


def _kernel_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def test_bf16_units_are_detected_as_the_kernel_reports_them(monkeypatch):
    flags = _kernel_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here to compare with")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    units = cpu_matrix_units.__wrapped__()
    assert (units.avx512_bf16, units.amx_bf16) == ("avx512_bf16" in flags, "amx_bf16" in flags)
    assert units.bf16 == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert units.int8_dot == bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


def test_a_onednn_cap_below_bf16_counts_as_no_bf16_units(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    capped = cpu_matrix_units.__wrapped__()
    assert not capped.bf16 and "no bf16 matrix units" in capped.describe() and "capped at AVX512_CORE" in capped.describe()
    if _kernel_flags():  # ONNX Runtime's int8 kernels are not oneDNN's: the cap leaves them alone
        assert capped.int8_dot == bool({"avx512_vnni", "avx_vnni", "amx_int8"} & _kernel_flags())
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")  # oneDNN reads it case-blind
    below_amx = cpu_matrix_units.__wrapped__()
    assert not below_amx.amx_bf16
    if _kernel_flags():
        assert below_amx.avx512_bf16 == ("avx512_bf16" in _kernel_flags())

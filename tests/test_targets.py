"""Target presets and GPU detection."""

from __future__ import annotations

import pytest
import torch

from engines.targets import PRESETS, TargetError, get_target, target_for_device
from export.build import main


@pytest.mark.parametrize(
    "name, capability, memory, bf16, fp8",
    [
        ("rtx5090", (12, 0), 32, True, True),
        ("rtx4090", (8, 9), 24, True, True),
        ("rtx3090", (8, 6), 24, True, False),
        ("h100", (9, 0), 80, True, True),
        ("l40s", (8, 9), 48, True, True),
        ("a100", (8, 0), 80, True, False),
    ],
)
def test_presets_have_the_documented_gpu_facts(name, capability, memory, bf16, fp8):
    target = get_target(name)
    assert target.compute_capability == capability
    assert target.memory_gib == memory
    assert ("bf16" in target.precisions) is bf16
    assert ("fp8" in target.precisions) is fp8
    assert target.default_precision in target.precisions
    assert target.peak_tflops > 0
    assert target.memory_budget_bytes < memory * 2**30
    assert (target.min_input_px, target.max_output_px) == (512, 8192)


def test_precision_below_its_compute_capability_is_refused():
    old = target_for_device("Tesla T4", (7, 5), 16 * 2**30)
    assert "bf16" not in old.precisions and old.vae_precision == "fp32"
    with pytest.raises(TargetError, match=r"bf16 is not supported on Tesla T4 \(compute capability 7.5\)"):
        old.check_precision("bf16")
    with pytest.raises(TargetError, match="fp8"):
        PRESETS["a100"].check_precision("fp8")


def test_detected_gpu_maps_to_its_preset_with_its_real_memory():
    target = target_for_device("NVIDIA GeForce RTX 4090 Laptop", (8, 9), 16 * 2**30)
    assert target.name == "rtx4090" and target.memory_gib == 16.0
    assert target.peak_tflops == PRESETS["rtx4090"].peak_tflops
    unknown = target_for_device("NVIDIA RTX A6000", (8, 6), 48 * 2**30)
    assert unknown.name == "auto" and unknown.peak_tflops is None and unknown.memory_gib == 48.0


def test_unknown_target_lists_the_presets():
    with pytest.raises(TargetError, match="rtx5090, rtx4090, rtx3090, h100, l40s, a100, auto"):
        get_target("rtx9999")


def test_cli_unknown_target_exits_2_listing_presets(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--target", "rtx9999", "--random-weights"])
    assert exit_info.value.code == 2
    assert "rtx5090" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is present")
def test_cli_auto_without_gpu_exits_2_with_a_clear_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--target", "auto", "--random-weights"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "rtx5090" in err

"""The logic around the TensorRT build that needs no TensorRT: when to build, how failures read."""

from __future__ import annotations

from engines.tensorrt_build import LocalGPU, _explain_failure, build_blocker

RTX4090 = LocalGPU("NVIDIA GeForce RTX 4090", (8, 9))


def test_build_is_blocked_without_tensorrt_or_gpu():
    assert "TensorRT is not installed" in build_blocker((8, 9), None, RTX4090)
    assert build_blocker((8, 9), "10.9.0", None) == "no CUDA GPU on this machine"


def test_build_is_blocked_on_another_compute_capability():
    reason = build_blocker((12, 0), "10.9.0", RTX4090)
    assert reason == "this machine's GPU (NVIDIA GeForce RTX 4090, compute capability 8.9) is not the target's (12.0)"


def test_build_goes_ahead_on_the_target_gpu():
    assert build_blocker((8, 9), "10.9.0", RTX4090) is None


def test_out_of_memory_build_log_becomes_a_hint_to_shrink_the_profile():
    log = (
        "[I] Building engine\n"
        "[E] 10: Could not find any implementation for node /down.0/conv1/Conv.\n"
        "[E] 2: [builder.cpp::buildSerializedNetwork] Error Code 2: Internal Error (Assertion engine != nullptr failed.)\n"
    )
    error = _explain_failure(RuntimeError("Invalid Engine"), log, "unet")
    message = str(error)
    assert message.startswith("TensorRT ran out of GPU memory building unet")
    assert "--max-px" in message and "--workspace-gib" in message
    assert "Could not find any implementation" in message and "[I] Building" not in message


def test_other_build_failures_keep_tensorrt_errors():
    log = "[E] 4: [network.cpp::validate] Error Code 4: unsupported operator Foo\n"
    message = str(_explain_failure(RuntimeError("Invalid Engine"), log, "vae_decoder"))
    assert message.startswith("TensorRT could not build vae_decoder: Invalid Engine")
    assert "unsupported operator Foo" in message and "memory" not in message

"""The served model's fall-back (``runtime.serving.requests._run_group``), on a real Triton server:
when the dynamic batcher gathers more requests of one size than that size's profile admits as one
batch, the folder refuses the gathered batch and each request runs alone, with its own result.

The folder: the small test folder with the U-Net profiles of samples up to 32x32 and 64x64 limited
to batch 1 (what a tighter memory budget gives the large octaves), while the smallest keeps batch 4,
so the server's largest batch is 4. Requests of 16x16 latents at 2x (samples of 32x32) gathered by
the batcher are then a batch no profile admits: those profiles take one latent at a time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="serving needs the serve extra: pip install -e '.[serve]'")
httpclient = pytest.importorskip("tritonclient.http", reason="the serving tests' client is tritonclient (serve extra)")

from runtime import SizeOutOfRangeError, Upscaler
from runtime.serving.repository import MODEL_NAME
from runtime.serving.server import Ports

from .test_serving import _stop, _wait_line, counted

ROOT = Path(__file__).resolve().parents[1]
READY_S = 180
QUEUE_DELAY_US = 500_000  # long enough that concurrent requests are gathered into one execution
LIMITED = ("unet:32", "unet:64")  # the profiles limited to batch 1: samples of 17..64
SIDE = 16  # low-res latent side whose 2x pass (samples of 32x32) only LIMITED admit
REQUESTS = 4


@pytest.fixture(scope="module")
def limited_folder(small_artifacts, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("limited") / "artifacts"
    shutil.copytree(small_artifacts, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    profiles = {p["name"]: p for p in manifest["components"]["unet"]["profiles"]}
    assert {p["inputs"]["sample"]["max"][0] for p in profiles.values()} == {4}
    for name in LIMITED:
        for box in profiles[name]["inputs"].values():
            box["max"][0] = 1
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def _latents(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 32, SIDE, SIDE), dtype=np.float32)


def _infer(port: int, latents: np.ndarray, seed: int) -> np.ndarray:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")  # one per thread (gevent)
    try:
        inputs = []
        for name, array, dtype in (("latents", latents, "FP32"), ("scale", np.array([[2]], np.int32), "INT32"),
                                   ("seed", np.array([[seed]], np.int64), "INT64")):
            tensor = httpclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array, binary_data=True)
            inputs.append(tensor)
        result = client.infer(MODEL_NAME, inputs, outputs=[httpclient.InferRequestedOutput("upscaled", binary_data=True)])
        return result.as_numpy("upscaled")
    finally:
        client.close()


def test_requests_gathered_beyond_a_profiles_batch_each_get_their_own_result(limited_folder):
    with Upscaler.load(limited_folder, backend="onnxruntime", device="cpu") as upscaler:
        with pytest.raises(SizeOutOfRangeError, match="at batch 2 is outside"):  # the folder refuses them as one batch
            upscaler.check_input(np.concatenate([_latents(i) for i in range(2)]), scale=2)
        alone = {i: upscaler.upscale(_latents(i), scale=2, seed=100 + i) for i in range(REQUESTS)}

    ports = Ports.free()
    process = subprocess.Popen(
        [sys.executable, "-m", "runtime.serve", str(limited_folder), "--host", "127.0.0.1", "--backend", "onnxruntime",
         "--device", "cpu", "--http-port", str(ports.http), "--grpc-port", str(ports.grpc),
         "--metrics-port", str(ports.metrics), "--max-batch", str(REQUESTS), "--max-queue-delay-us", str(QUEUE_DELAY_US)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = _wait_line(process, "ready in", READY_S)
        assert any(f"max batch {REQUESTS}" in line for line in lines), lines  # the server batches up to 4
        results, inferences, executions = counted(ports.http, REQUESTS, lambda i: _infer(ports.http, _latents(i), 100 + i))
        assert inferences == REQUESTS and executions < REQUESTS, (
            f"{inferences} requests in {executions} executions: the batcher gathered none, the fall-back was not run")
        for i, result in enumerate(results):
            assert np.array_equal(result, alone[i]), i
    finally:
        _stop(process)

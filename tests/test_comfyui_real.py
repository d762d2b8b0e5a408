"""The ComfyUI nodes inside a REAL ComfyUI process, driven through its HTTP API as its frontend drives it.

``tests/test_comfyui.py`` checks the nodes against a stand-in of ComfyUI's modules; this checks
what only the real one shows: that the installed custom_nodes folder loads, the loader lists the
models folder, the example workflow validates and runs (LoadLatent -> the three nodes -> SaveLatent
and SaveImage) to the runtime's numbers, and a refusal reaches ComfyUI's error report as one line.

Runs only where FLOW_UPSCALER_COMFYUI names a ComfyUI folder (FLOW_UPSCALER_COMFYUI_PYTHON: the
Python that runs it, with this toolkit pip-installed; default the folder's ../venv/bin/python if
there is one, else this Python). ComfyUI runs on the CPU from a temporary --base-directory
(custom_nodes, models, input, output, user), so the ComfyUI folder is left as it is.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from runtime import Upscaler

COMFYUI = os.environ.get("FLOW_UPSCALER_COMFYUI")
pytestmark = pytest.mark.skipif(
    not COMFYUI, reason="runs the nodes in a real ComfyUI: set FLOW_UPSCALER_COMFYUI to a ComfyUI folder "
    "(and FLOW_UPSCALER_COMFYUI_PYTHON to the Python that runs it, with this toolkit installed)")

WORKFLOW = Path(__file__).resolve().parents[1] / "runtime" / "comfyui" / "workflows" / "flow_upscaler_api.json"
STARTUP_S, PROMPT_S = 90, 60
PIXELS_PER_PACKED = 16  # the VAE's 8x, times the 2x2 patches of ComfyUI's 128-channel FLUX.2 latent
SEEDS = [7, 8]  # the workflow's seed 7 on a batch of two: item i gets seed + i
# The small folder takes low-res sides 8..32 (packed 4..16): packed 4 at 4x runs passes at 8 and 16.
SMALL = torch.randn(2, 128, 4, 4, generator=torch.Generator().manual_seed(1))
REFUSED = {
    "too_big.latent": (torch.zeros(1, 128, 32, 32), ["outside what", "takes sides 8..32"]),  # low-res side 64
    "flux1.latent": (torch.zeros(1, 16, 8, 8), ["16-channel latent (FLUX.1", "FLUX.2 latents only"]),
}


def _comfyui_python(folder: Path) -> str:
    venv = folder.parent / "venv" / "bin" / "python"
    return os.environ.get("FLOW_UPSCALER_COMFYUI_PYTHON") or (str(venv) if venv.exists() else sys.executable)


def _save_latent(path: Path, samples: torch.Tensor) -> None:
    """A .latent file as ComfyUI's SaveLatent writes it (the version marker: LoadLatent scales by 1.0)."""
    save_file({"latent_tensor": samples.contiguous(), "latent_format_version_0": torch.tensor([])}, str(path))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ComfyUI:
    """A ComfyUI server process on a temporary base folder, and the HTTP calls the tests make."""

    def __init__(self, folder: Path, python: str, base: Path):
        self.base, self.log_path = base, base / "comfyui.log"
        self.url = f"http://127.0.0.1:{_free_port()}"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [python, str(folder / "main.py"), "--base-directory", str(base), "--cpu", "--listen", "127.0.0.1",
                 "--port", self.url.rsplit(":", 1)[1], "--disable-auto-launch", "--disable-api-nodes",
                 "--database-url", "sqlite:///:memory:"],  # its default database lies in the ComfyUI folder
                stdout=log, stderr=subprocess.STDOUT, cwd=base,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})  # nor __pycache__ written there

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        call = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(call, timeout=10) as answer:
                return answer.status, json.loads(answer.read() or b"{}")
        except urllib.error.HTTPError as refused:
            return refused.code, json.loads(refused.read() or b"{}")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if self.request("/object_info")[0] == 200:
                    return
            except OSError:  # not listening yet
                pass
            time.sleep(0.5)
        ended = self.process.poll()
        pytest.fail(f"ComfyUI {'did not answer in %d s' % STARTUP_S if ended is None else 'exited (%d)' % ended}:\n{self.log()}")

    def run(self, prompt: dict) -> dict:
        """POST the prompt, wait for it, and return its /history entry."""
        status, queued = self.request("/prompt", {"prompt": prompt, "client_id": "flow-upscaler-test"})
        assert status == 200, f"{queued}\n{self.log()}"
        deadline = time.monotonic() + PROMPT_S
        while time.monotonic() < deadline:
            entry = self.request(f"/history/{queued['prompt_id']}")[1].get(queued["prompt_id"])
            if entry is not None and entry["status"] is not None:
                return entry
            time.sleep(0.2)
        pytest.fail(f"the prompt did not finish in {PROMPT_S} s:\n{self.log()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory, small_artifacts):
    """ComfyUI serving a base folder where the installer put the nodes and models/flow_upscaler/small is linked."""
    folder = Path(COMFYUI).resolve()
    python = _comfyui_python(folder)
    base = tmp_path_factory.mktemp("comfyui_base")
    for name in ("main.py", "nodes.py"):  # what the installer checks for, besides custom_nodes/
        (base / name).symlink_to(folder / name)
    (base / "custom_nodes").mkdir()
    # the CLI, run in ComfyUI's Python outside this checkout: it must come from the package installed there
    installed = subprocess.run([python, "-m", "runtime.comfyui", "install", str(base)], capture_output=True,
                               text=True, cwd=base)
    assert installed.returncode == 0, f"{python} -m runtime.comfyui install failed:\n{installed.stderr}"
    (base / "models" / "flow_upscaler").mkdir(parents=True)
    (base / "models" / "flow_upscaler" / "small").symlink_to(small_artifacts, target_is_directory=True)
    (base / "input").mkdir()
    _save_latent(base / "input" / "x.latent", SMALL)
    for name, (samples, _) in REFUSED.items():
        _save_latent(base / "input" / name, samples)
    server = ComfyUI(folder, python, base)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _workflow(latent: str, scale: str) -> dict:
    workflow = json.loads(WORKFLOW.read_text())
    workflow["1"]["inputs"]["latent"] = latent
    workflow["2"]["inputs"].update(model="small/", backend="onnxruntime")
    workflow["3"]["inputs"].update(scale=scale, seed=SEEDS[0])
    return workflow


def test_comfyui_loads_the_installed_nodes_and_lists_the_artifact_folder(comfyui):
    status, info = comfyui.request("/object_info")
    assert status == 200
    ours = {name: node for name, node in info.items() if name.startswith("FlowUpscaler")}
    assert set(ours) == {"FlowUpscalerLoader", "FlowUpscalerUpscale", "FlowUpscalerDecode"}, comfyui.log()
    assert {node["python_module"] for node in ours.values()} == {"custom_nodes.flow_upscaler_deploy"}
    assert "small/" in ours["FlowUpscalerLoader"]["input"]["required"]["model"][0]


def test_example_workflow_runs_and_saves_the_runtimes_latent_and_its_decoded_images(comfyui, small_artifacts):
    entry = comfyui.run(_workflow("x.latent", "4x"))
    assert entry["status"]["status_str"] == "success", f"{entry['status']['messages']}\n{comfyui.log()}"
    (latent_file,) = entry["outputs"]["4"]["latents"]
    saved = load_file(comfyui.base / "output" / latent_file["subfolder"] / latent_file["filename"])
    assert "latent_format_version_0" in saved and saved["latent_tensor"].shape == (2, 128, 16, 16)
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as upscaler:
        expected = upscaler.upscale(SMALL, 4, seed=SEEDS, latent_format="flux2_packed")
        decoded = upscaler.decode(saved["latent_tensor"], latent_format="flux2_packed")
    # The same graphs on ONNX Runtime's CPU provider in two processes: equal unless the two Pythons'
    # ONNX Runtime builds or thread counts order a reduction differently, a few fp32 ulps; a wrong
    # seed, scale, packing or LoadLatent scaling moves the values by about their size (~1).
    torch.testing.assert_close(saved["latent_tensor"], expected, rtol=1e-5, atol=1e-5)

    images = entry["outputs"]["6"]["images"]
    assert len(images) == 2
    side = 4 * 4 * PIXELS_PER_PACKED  # packed side 4, 4x
    # SaveImage's own 8 bits (255 * x, truncated) of the runtime's decode in ComfyUI's [0, 1] range
    expected_pixels = (((decoded + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    for image, pixels in zip(images, expected_pixels):
        with Image.open(comfyui.base / "output" / image["subfolder"] / image["filename"]) as png:
            assert png.size == (side, side) and png.mode == "RGB"
            got = np.asarray(png)
        assert np.abs(got.astype(int) - pixels.astype(int)).max() <= 1  # a value on a rounding edge


def _frames(traceback: str) -> set[str]:
    """The folders of the source files a printed traceback goes through."""
    return {Path(path).parent.name for path in re.findall(r'File "([^"]+)"', traceback)}


@pytest.mark.parametrize("latent", sorted(REFUSED))
def test_a_refusal_reaches_comfyuis_error_report_as_one_line_without_the_runtimes_frames(comfyui, latent):
    logged_before = len(comfyui.log())
    entry = comfyui.run(_workflow(latent, "2x"))
    logged = comfyui.log()[logged_before:]  # what ComfyUI printed of this prompt: format_exc, chained causes too
    assert entry["status"]["status_str"] == "error", comfyui.log()
    errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert len(errors) == 1, f"{entry['status']['messages']}\n{comfyui.log()}"
    (error,) = errors
    assert error["node_type"] == "FlowUpscalerUpscale" and error["exception_type"].endswith(".FlowUpscalerNodeError")
    message = error["exception_message"].strip()  # ComfyUI appends a line of tips (empty here)
    assert message.startswith("Flow Upscaler: ") and "\n" not in message
    for named in REFUSED[latent][1]:
        assert named in message, message
    for shown in (_frames("".join(error["traceback"])), _frames(logged)):  # its error dialog, its log
        assert "comfyui" in shown and not shown & {"runtime", "engines"}, logged  # the node's frames only
    assert message in logged and "During handling" not in logged and "direct cause" not in logged

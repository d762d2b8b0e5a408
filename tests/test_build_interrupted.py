"""A build killed or interrupted over a working artifact folder leaves that folder whole and usable
(the runtime gives the same result as before), and the next run cleans up and finishes.

The build runs in a subprocess and is stopped when its log reaches a given stage: after the first
new graph was written, later with more written, and with Ctrl-C (SIGINT).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calib.data import load_calibration_set
from engines.manifest import load_manifest
from engines.targets import PRESETS
from export.build import BuildSettings, build_artifacts
from export.checkpoint import load_unet, random_vae
from export.onnx.components import Models
from runtime import Upscaler

from .conftest import SMALL_UNET, SMALL_VAE

ROOT = Path(__file__).resolve().parents[1]
NEW_SEED = 1  # other weights than the folder's (seed 0): every graph is exported again
# The build script restores Python's Ctrl-C handler: a test run started in the background by a
# non-interactive shell (a CI script's `cmd &`) inherits SIGINT ignored, and Python then keeps it
# ignored, so the SIGINT case would test nothing but the shell.
BUILD = f"""
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)
import sys
from pathlib import Path
from engines.targets import PRESETS
from export.build import BuildSettings, build_artifacts
from export.checkpoint import load_unet, random_vae
from export.onnx.components import Models
from tests.conftest import SMALL_UNET, SMALL_VAE
if sys.argv[2] == "shared-traces":
    from tests.export_memo import install
    install()
models = Models(unet=load_unet(random_weights=True, seed={NEW_SEED}, **SMALL_UNET), vae=random_vae({NEW_SEED}, **SMALL_VAE))
settings = BuildSettings(target=PRESETS["rtx4090"].with_range(64, 512), precision="fp16", vae_precision="fp32")
print("started", flush=True)
build_artifacts(models, settings, Path(sys.argv[1]), log=lambda line: print(line, flush=True))
"""


def _settings() -> BuildSettings:
    # One small calibration sample for the finishing build's accuracy gate, which is not what this checks.
    return BuildSettings(target=PRESETS["rtx4090"].with_range(64, 512), precision="fp16", vae_precision="fp32",
                         calibration=load_calibration_set(size=1, side=8))


def _upscale(folder: Path) -> torch.Tensor:
    x = torch.randn(1, 32, 8, 12, generator=torch.Generator().manual_seed(4))
    with Upscaler.load(folder, backend="onnxruntime", device="cpu") as upscaler:
        return upscaler.upscale(x, scale=4, seed=3)


def _unnamed_files(folder: Path) -> list[str]:
    """Files under onnx/ and engines/ that the manifest does not name (validation reports aside)."""
    named = {f for r in load_manifest(folder).components.values()
             for f in (r.onnx_file, r.engine.file, r.cpu_graph.file if r.cpu_graph else None) if f}
    named |= {f.replace(".onnx", ".validation.json") for f in named}
    files = [p for sub in ("onnx", "engines") for p in (folder / sub).rglob("*") if p.is_file()]
    return sorted(p.relative_to(folder).as_posix() for p in files if p.relative_to(folder).as_posix() not in named)


def _stop_build_at(folder: Path, marker: str, sig: int) -> int:
    # Ctrl-C is to land inside torch.export (the unet's trace, most of its stage): that build traces
    # for real; the killed ones take the run's shared traces (tests/export_memo.py).
    traces = "own-traces" if sig == signal.SIGINT else "shared-traces"
    process = subprocess.Popen(
        [sys.executable, "-c", BUILD, str(folder), traces], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        for line in process.stdout:
            if line.startswith(marker):
                process.send_signal(sig)
                break
        else:
            pytest.fail(f"the build ended without logging {marker!r}: {process.stderr.read()[-2000:]}")
        return process.wait(timeout=120)
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def working(small_artifacts, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    return small_artifacts, _upscale(small_artifacts)


@pytest.fixture(scope="module")
def stopped(working, tmp_path_factory):
    """``stopped(marker, sig)``: (a copy of the working folder with a build stopped at ``marker`` by
    ``sig`` in it, the build's exit status), each build run once per module. The tests copy the
    folder before they change it: the SIGKILL at vae_decoder serves two tests."""
    source, _ = working
    done: dict[tuple[str, int], tuple[Path, int]] = {}

    def stop(marker: str, sig: int) -> tuple[Path, int]:
        if (marker, sig) not in done:
            folder = tmp_path_factory.mktemp("stopped") / "artifacts"
            shutil.copytree(source, folder)
            done[marker, sig] = folder, _stop_build_at(folder, marker, sig)
        return done[marker, sig]

    return stop


@pytest.mark.parametrize(
    "marker, sig",
    [
        ("  onnx: done", signal.SIGKILL),  # cond_encoder's new graph is written, the unet's is not
        ("vae_decoder (fp32)", signal.SIGKILL),  # two new graphs written, then killed
        ("unet (fp16)", signal.SIGINT),  # Ctrl-C: the build cleans up after itself
    ],
)
def test_a_stopped_build_leaves_the_folder_as_it_was(working, stopped, tmp_path, marker, sig):
    source, before = working
    manifest = (source / "manifest.json").read_bytes()
    stopped_folder, code = stopped(marker, sig)
    assert code != 0
    folder = tmp_path / "artifacts"
    shutil.copytree(stopped_folder, folder)
    assert (folder / "manifest.json").read_bytes() == manifest
    assert torch.equal(_upscale(folder), before)
    if sig == signal.SIGINT:
        assert _unnamed_files(folder) == [] and not list(folder.rglob(".staging*"))


def test_the_next_run_cleans_up_a_killed_build_and_finishes(working, stopped, tmp_path):
    _, before = working
    folder = tmp_path / "artifacts"
    shutil.copytree(stopped("vae_decoder (fp32)", signal.SIGKILL)[0], folder)
    assert _unnamed_files(folder)  # the killed build's graphs are still there
    models = Models(unet=load_unet(random_weights=True, seed=NEW_SEED, **SMALL_UNET), vae=random_vae(NEW_SEED, **SMALL_VAE))
    build_artifacts(models, _settings(), folder, log=lambda line: None)
    assert _unnamed_files(folder) == [] and not list(folder.rglob(".staging*")) and not list(folder.rglob("*.partial"))
    assert not torch.equal(_upscale(folder), before)  # the new weights are in use

"""Shared fixtures: small model configurations so most tests run in seconds on a CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

from engines.targets import PRESETS
from export.build import BuildSettings, build_artifacts
from export.checkpoint import load_unet, random_vae, seeded_init
from export.models import UpscalerUNet
from export.onnx import exporter
from export.onnx.components import Models

from .export_memo import TRACE_MEMO, memoized

DATA = Path(__file__).resolve().parent / "data"
KEYS_JSON = DATA / "flow_upscaler_keys.json"  # provenance: tests/data/README.md
# The team's shared folder beside the checkout (absent in a plain clone); KEYS_JSON was copied from it.
SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_KEYS_JSON = SHARED / "data" / "flow_upscaler_keys.json"

SMALL_UNET = dict(base_channels=32, time_dim=32, cond_dim=64)
SMALL_VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8)


def _run_folder(tmp_path_factory) -> Path:
    """The temporary folder of the whole run: under pytest-xdist every worker has its own below it."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def trace_memo(tmp_path_factory) -> Iterator[Path]:
    """Builds share the first torch.export trace of each module state (tests/export_memo.py)."""
    folder = _run_folder(tmp_path_factory) / "traces"
    os.environ[TRACE_MEMO] = str(folder)  # for the builds tests start in subprocesses (install())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exporter, "trace", memoized(exporter.trace, folder))
        yield folder


@pytest.fixture(scope="session")
def published_keys() -> dict:
    return json.loads(KEYS_JSON.read_text())


@pytest.fixture(scope="session")
def full_unet() -> UpscalerUNet:
    return seeded_init(UpscalerUNet, 0).eval()


@pytest.fixture()
def small_unet() -> UpscalerUNet:
    return seeded_init(lambda: UpscalerUNet(**SMALL_UNET), 0).eval()


@pytest.fixture()
def small_vae() -> torch.nn.Module:
    return random_vae(seed=0, **SMALL_VAE)


@pytest.fixture(scope="session")
def small_models() -> Models:
    return Models(unet=load_unet(random_weights=True, seed=0, **SMALL_UNET), vae=random_vae(0, **SMALL_VAE))


@pytest.fixture(scope="session")
def small_artifacts(small_models, tmp_path_factory) -> Path:
    """fp16 U-Net graphs (what users deploy), fp32 decoder; low-res sides 8..32, samples 16..64.

    Shared by the runtime and benchmark tests, which only read it (a build takes most of a minute).
    """
    from filelock import FileLock

    # Built once in the run's folder, by the first worker that needs it, and read by all.
    shared = _run_folder(tmp_path_factory)
    out = shared / "small_artifacts"
    with FileLock(str(shared / "small_artifacts.lock")):
        if not (out / "manifest.json").is_file():
            random = {"source": "random", "seed": 0}
            settings = BuildSettings(
                target=PRESETS["rtx4090"].with_range(64, 512), precision="fp16", vae_precision="fp32",
                weights={"unet": random, "vae": random},
            )
            build_artifacts(small_models, settings, out, log=lambda line: None)
    return out

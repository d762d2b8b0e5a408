"""Every input a build range admits is covered by the profiles the build derives for it.

Checked through the code the runtime runs: ``pass_inputs`` and ``admitting_profile`` (what
``Upscaler.check_input`` refuses) and ``select_profile`` on every input of the engine (what the
TensorRT backend picks its profile with). Admitted sizes are enumerated here from the range's
definition (README "Build"): input side at least ``min_px``, output side at most ``max_px``, on
the 16 px input grid.
"""

from __future__ import annotations

import itertools

import pytest

from engines.memory import GraphMemoryModel
from engines.profiles import admitting_profile, select_profile
from engines.targets import PRESETS
from export.onnx.components import COMPONENTS
from export.onnx.exporter import export_component
from export.pipeline.profiles import derive_profiles
from export.pipeline.settings import BuildSettings
from runtime.inputs import pass_inputs

PX = 8  # pixels per latent pixel
INPUT_GRID_PX = 16


def admitted_inputs(min_px: int, max_px: int, scale: int) -> list[tuple[int, int]]:
    """Low-res latent (height, width) pairs a range admits for ``scale``."""
    sides = [px // PX for px in range(min_px, max_px // scale + 1, INPUT_GRID_PX)]
    return list(itertools.product(sides, sides))


@pytest.fixture(scope="module")
def memory_models(small_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("coverage_graphs")
    return {
        name: GraphMemoryModel(export_component(COMPONENTS[name], small_models, "fp16", folder / f"{name}.onnx").path)
        for name in ("cond_encoder", "unet")
    }


def _profiles(small_models, memory_models, min_px: int, max_px: int) -> dict:
    settings = BuildSettings(target=PRESETS["rtx4090"].with_range(min_px, max_px), precision="fp16", vae_precision="fp32")
    return {name: derive_profiles(name, small_models, memory, settings)[0] for name, memory in memory_models.items()}


def test_the_enumeration_follows_the_range_definition():
    assert admitted_inputs(64, 512, 2)[:3] == [(8, 8), (8, 10), (8, 12)]
    assert max(admitted_inputs(64, 512, 4)) == (16, 16)  # 16 * 4 * 8 = 512 px out
    assert admitted_inputs(64, 256, 8) == []  # 8x needs at least 64 * 8 = 512 px out
    assert (8, 12) in admitted_inputs(64, 512, 4) and (8, 12) not in admitted_inputs(64, 256, 4)


@pytest.mark.parametrize("min_px, max_px", [(64, 512), (64, 256), (96, 1024), (128, 2048), (64, 1216)])
def test_every_admitted_input_is_covered_at_every_scale(small_models, memory_models, min_px, max_px):
    profiles = _profiles(small_models, memory_models, min_px, max_px)
    checked = 0
    for scale in (2, 4, 8):
        for h, w in admitted_inputs(min_px, max_px, scale):
            for component, name, shape, what in pass_inputs(1, h, w, scale):
                where = f"{min_px}..{max_px} px, {h}x{w} at {scale}x: {what} {shape}"
                assert admitting_profile(profiles[component], name, shape) is not None, where
                every_input = COMPONENTS[component].input_shapes(small_models, *shape[:1], *shape[2:])
                assert select_profile(profiles[component], every_input) is not None, where
                checked += 1
    assert checked > 0


def test_inputs_outside_the_range_are_not_covered(small_models, memory_models):
    profiles = _profiles(small_models, memory_models, 64, 512)
    too_small = pass_inputs(1, 6, 8, 2)[0]
    too_large = pass_inputs(1, 16, 18, 4)[-1]  # 18 * 4 * 8 = 576 px out
    for component, name, shape, _ in (too_small, too_large):
        assert admitting_profile(profiles[component], name, shape) is None

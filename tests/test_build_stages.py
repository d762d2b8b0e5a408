"""The reuse keys of the build's stages cover every project source file the stage imports.

Each test works on a copy of the repository (others may edit the real one meanwhile), points the
key computation at it, edits one file and recomputes the keys.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from calib.data import load_calibration_set
from engines.manifest import ComponentRecord, EngineRecord
from engines.profiles import Profile
from engines.targets import PRESETS
from engines.tensorrt_build import BuildOptions, LocalGPU
from export.checkpoint import load_unet, random_vae
from export.onnx.components import Models
from export.pipeline import sources
from engines.flavours import TENSORRT
from export.pipeline.checkset import MakeCheckSet
from export.pipeline.engine import BuildEngine, EngineHost
from export.pipeline.folder import ArtifactFolder
from export.pipeline.graph import ExportGraph
from export.pipeline.progress import StageLog
from export.pipeline.quantize import QuantizeGraphs
from export.pipeline.settings import BuildSettings

from .conftest import SMALL_UNET, SMALL_VAE

ROOT = Path(__file__).resolve().parents[1]
KEYED_STAGES = ("export.pipeline.graph", "export.pipeline.quantize", "export.pipeline.engine", "export.pipeline.checkset")


@pytest.fixture(scope="module")
def models() -> Models:
    return Models(unet=load_unet(random_weights=True, seed=0, **SMALL_UNET), vae=random_vae(0, **SMALL_VAE))


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A copy of the repository's sources, where the stages' keys are computed from."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build"))
    monkeypatch.setattr(sources, "REPO_ROOT", copy)
    return copy


@pytest.fixture
def keys(models, tmp_path):
    """The reuse key of each keyed stage, computed afresh on every call."""
    folder, progress = ArtifactFolder(tmp_path / "out"), StageLog(lambda line: None)
    calibration = load_calibration_set(size=1, side=8)
    # a host that could build engines, so the engine stage computes its key (nothing is built)
    host = EngineHost(TENSORRT, trt_version="10.9.0", gpu=LocalGPU("NVIDIA GeForce RTX 4090", (8, 9)), blocker=None)
    target = PRESETS["rtx4090"]
    box = {"sample": (1, 32, 16, 16)}
    records = {"unet": ComponentRecord("unet", "fp16", "onnx/k/unet.fp16.onnx", "onnx-sha256", "k", ["sample"],
                                       ["velocity"], [Profile("unet:16", box, box, box)], EngineRecord(reason="-"))}
    settings = BuildSettings(target=target, precision="fp16", vae_precision="fp32")

    stages = {
        "export.pipeline.graph": lambda: ExportGraph("unet", "fp16", models, "digest", folder, progress).key(),
        "export.pipeline.quantize": lambda: QuantizeGraphs(models, "int8", calibration, ("first_conv",), 0, "digest",
                                                           folder, progress).key(),
        "export.pipeline.engine": lambda: BuildEngine("unet", "fp16", target, BuildOptions(), host, folder,
                                                      progress).key("onnx-sha256", []),
        "export.pipeline.checkset": lambda: MakeCheckSet(models, settings, {"unet": "digest"}, folder,
                                                         progress).key(records),
    }

    def compute(*only: str) -> dict[str, str]:
        """Every stage's key, or only those named."""
        return {stage: key() for stage, key in stages.items() if not only or stage in only}

    return compute


def _edit(path: Path) -> None:
    path.write_text(path.read_text() + "\n# edited: the key must change\n")


def _loaded_project_files(repo: Path, module: str) -> list[str]:
    """The project files Python loads when it imports ``module`` from ``repo``: found by importing
    it in a fresh interpreter, independently of the source parsing the keys rely on."""
    script = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None))))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, check=True)
    files = [Path(f).resolve() for f in json.loads(loaded.stdout)]
    return sorted(f.relative_to(repo.resolve()).as_posix() for f in files if f.is_relative_to(repo.resolve()))


@pytest.mark.parametrize(
    "edited, stages",
    [
        # the latent contract and the quantizer, which the old key (export/ and engines/ only) missed
        ("runtime/latents.py", ["export.pipeline.graph", "export.pipeline.quantize"]),
        ("calib/quantize.py", ["export.pipeline.quantize"]),
        ("calib/accuracy.py", ["export.pipeline.quantize"]),
        ("calib/thresholds.py", ["export.pipeline.quantize", "export.pipeline.checkset"]),
        ("export/onnx/validate.py", ["export.pipeline.checkset"]),
        ("runtime/noise.py", ["export.pipeline.checkset"]),
        ("export/onnx/exporter.py", ["export.pipeline.graph", "export.pipeline.quantize"]),
        ("engines/tensorrt_build.py", ["export.pipeline.engine"]),
        ("export/pipeline/engine.py", ["export.pipeline.engine"]),
    ],
)
def test_editing_a_module_a_stage_imports_changes_its_key(repo, keys, edited, stages):
    before = keys()
    _edit(repo / edited)
    after = keys()
    for stage in stages:
        assert after[stage] != before[stage], f"{edited} changed but the key of {stage} did not"


@pytest.mark.parametrize("stage", KEYED_STAGES)
def test_every_project_file_loaded_by_importing_a_stage_is_in_its_key(repo, keys, stage):
    loaded = _loaded_project_files(repo, stage)
    assert f"{stage.replace('.', '/')}.py" in loaded and "export/pipeline/errors.py" in loaded
    for relative in loaded:
        before = keys(stage)[stage]
        _edit(repo / relative)
        assert keys(stage)[stage] != before, f"{relative} is loaded by {stage} but not in its key"


@pytest.mark.parametrize("edited", ["benchmarks/latency.py", "tests/test_build.py", "README.md", "pyproject.toml"])
def test_files_outside_the_project_packages_leave_every_key_alone(repo, keys, edited):
    before = keys()
    _edit(repo / edited)
    assert keys() == before


def test_the_check_set_key_ignores_the_gate_and_the_runtime_backends(repo, keys):
    """The check-set stage stores the gate's limits and the runtime's noise, not their code paths:
    editing the gate or a backend keeps the check set (a full-size one costs a minute to remake)."""
    before = keys()["export.pipeline.checkset"]
    for edited in ("calib/accuracy.py", "calib/quantize.py", "runtime/upscaler.py", "runtime/selection.py",
                   "runtime/backends/onnxruntime.py", "runtime/backends/pytorch.py",
                   "runtime/backends/tensorrt.py", "export/pipeline/settings.py", "export/pipeline/gate.py"):
        _edit(repo / edited)
    assert keys()["export.pipeline.checkset"] == before


def test_the_engine_key_ignores_the_export_side(repo, keys):
    """The engine stage imports nothing of calib or the exporter: editing them keeps its engines."""
    before = keys()["export.pipeline.engine"]
    for edited in ("calib/quantize.py", "export/onnx/exporter.py", "runtime/latents.py"):
        _edit(repo / edited)
    assert keys()["export.pipeline.engine"] == before


def test_imports_anywhere_relative_or_lazy_are_followed_but_not_type_checking_ones(tmp_path):
    package = tmp_path / "calib"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nimport numpy\n\nif TYPE_CHECKING:\n    from . import unused\n\n"
        "def late():\n    from .b import value\n    return value\n"
    )
    (package / "b.py").write_text("from . import c\nfrom engines import d\nvalue = 1\n")
    (package / "c.py").write_text("")
    (package / "unused.py").write_text("")
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "__init__.py").write_text("")
    (tmp_path / "engines" / "d.py").write_text("from calib.a import late\n")
    found = sources.imported_modules("calib.a", root=tmp_path)
    assert sorted(found) == ["calib", "calib.a", "calib.b", "calib.c", "engines", "engines.d"]
    assert found["calib.b"] == package / "b.py" and found["engines"] == tmp_path / "engines" / "__init__.py"

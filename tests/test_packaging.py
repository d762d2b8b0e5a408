"""pyproject.toml's dependencies and extras against the facts that constrain them.

The version facts below were measured on the wheels themselves (see each constant); they are
written here, not derived from pyproject.toml, so that a pin that contradicts them fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
ORT_FLAVOURS = {"onnxruntime", "onnxruntime-gpu"}  # both wheels write the same `onnxruntime` package

# onnxruntime(-gpu) 1.30.0's symbolic shape inference fails the exported U-Net's memory estimate
# (Shape start/end ignored, so opset-18 Resize is mis-sized); 1.31.0, 1.31.1 and 1.32.0 pass it.
ORT_BROKEN, ORT_GOOD = "1.30.0", "1.31.1"
# The newest onnxruntime-gpu on PyPI. Its wheel's libonnxruntime_providers_tensorrt.so has NEEDED
# libnvinfer.so.10, libnvonnxparser.so.10, libcudart.so.13 and libcublas.so.13: TensorRT 10 for CUDA 13.
ORT_GPU_NEWEST = "1.31.1"
# TensorRT releases the TensorRT code was reviewed against (tensorrt-cuXX-bindings), and the first 11.
TRT10_REVIEWED, TRT11_REVIEWED, TRT11_FIRST = "10.16.1.11", "11.4.0.106", "11.0.0.114"
# polygraphy: 0.49.0's CreateConfig has no progress_monitor; 0.49.9-0.49.26 read attributes TensorRT
# 11 removed (layer.precision_is_set); 0.50.3 is the first release that guards both.
POLYGRAPHY_BROKEN, POLYGRAPHY_GOOD = ("0.49.0", "0.49.26"), "0.50.3"


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _extra_requirements(project: dict, extras: set[str]) -> list[Requirement]:
    """What ``extras`` add, following the project's references to its own extras."""
    name = canonicalize_name(project["name"])
    optional = project.get("optional-dependencies", {})
    found = []
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in optional, f"extra {extra!r} is referenced but not defined"
        for text in optional[extra]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == name:
                pending.extend(requirement.extras)
            else:
                found.append(requirement)
    return found


def _requirements(project: dict, extras: set[str]) -> list[Requirement]:
    """Everything ``pip install '.[extras]'`` asks for: core dependencies plus the extras'."""
    return [Requirement(r) for r in project["dependencies"]] + _extra_requirements(project, extras)


def _names(requirements: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in requirements}


def _only(project: dict, extra: str, names: set[str]) -> Requirement:
    """The one requirement of ``extra`` (beyond the core) whose distribution is one of ``names``."""
    matching = [r for r in _requirements(project, {extra}) if canonicalize_name(r.name) in names]
    assert len(matching) == 1, f"extra {extra!r} should name exactly one of {sorted(names)}, names {matching}"
    return matching[0]


def test_no_distribution_is_both_a_core_dependency_and_in_an_extra(project):
    core = _names(_requirements(project, set()))
    for extra in project["optional-dependencies"]:
        overlap = core & _names(_extra_requirements(project, {extra}))
        assert not overlap, f"extra {extra!r} also names core dependencies {sorted(overlap)}"


def test_no_single_extra_installs_both_onnxruntime_flavours(project):
    for extra in project["optional-dependencies"]:
        flavours = _names(_requirements(project, {extra})) & ORT_FLAVOURS
        assert len(flavours) <= 1, (
            f"pip install '.[{extra}]' installs {sorted(flavours)}: both wheels write the same onnxruntime "
            "package, so the one installed last hides the other's execution providers (microsoft/onnxruntime#26996)"
        )


def test_core_and_dev_name_no_onnxruntime_so_dev_combines_with_either_flavour(project):
    assert not _names(_requirements(project, set())) & ORT_FLAVOURS, (
        "ONNX Runtime must come from the cpu or gpu extra, not the core dependencies: a core onnxruntime "
        "beside the gpu extra's onnxruntime-gpu hides the GPU providers"
    )
    assert not _names(_requirements(project, {"dev"})) & ORT_FLAVOURS, (
        "dev must name no ONNX Runtime, so that '.[gpu,dev]' does not install both flavours"
    )


@pytest.mark.parametrize("extra, flavour", [("cpu", "onnxruntime"), ("gpu", "onnxruntime-gpu")])
def test_cpu_and_gpu_extras_each_give_one_onnxruntime_recent_enough_for_the_memory_estimate(project, extra, flavour):
    requirement = _only(project, extra, ORT_FLAVOURS)
    assert canonicalize_name(requirement.name) == flavour
    assert not requirement.specifier.contains(ORT_BROKEN), (
        f"{requirement} admits {ORT_BROKEN}, whose symbolic shape inference mis-sizes opset-18 Resize"
    )
    assert requirement.specifier.contains(ORT_GOOD), (
        f"{requirement} excludes {ORT_GOOD}, measured good (and onnxruntime-gpu {ORT_GPU_NEWEST} is the newest "
        "onnxruntime-gpu: a gpu extra without it cannot install)"
    )
    assert "symbolic" in requirement.extras, "the memory estimate's shape inference imports sympy (ORT's 'symbolic' extra)"


def test_trt_extra_is_tensorrt_10_for_cuda_13_as_onnxruntime_gpus_tensorrt_provider_links(project):
    requirement = _only(project, "trt", {"tensorrt", "tensorrt-cu12", "tensorrt-cu13"})
    reason = (
        f"onnxruntime-gpu {ORT_GPU_NEWEST}'s TensorRT provider links libnvinfer.so.10 and libcudart.so.13, so the "
        "onnxruntime-tensorrt backend loads only beside TensorRT 10 built for CUDA 13"
    )
    assert canonicalize_name(requirement.name) == "tensorrt-cu13", f"{requirement}: {reason}"
    assert requirement.specifier.contains(TRT10_REVIEWED), f"{requirement} excludes {TRT10_REVIEWED}, the reviewed 10"
    for version in (TRT11_FIRST, TRT11_REVIEWED, "12.0.0"):
        assert not requirement.specifier.contains(version), f"{requirement} admits TensorRT {version}: {reason}"
    assert not requirement.specifier.contains("10.16.0.72"), f"{requirement} admits releases older than the reviewed {TRT10_REVIEWED}"


def test_trt11_extra_is_tensorrt_11_only(project):
    requirement = _only(project, "trt11", {"tensorrt", "tensorrt-cu12", "tensorrt-cu13"})
    assert requirement.specifier.contains(TRT11_REVIEWED), f"{requirement} excludes {TRT11_REVIEWED}, the reviewed 11"
    for version in (TRT10_REVIEWED, TRT11_FIRST, "12.0.0"):
        assert not requirement.specifier.contains(version), (
            f"{requirement} admits TensorRT {version} (the trt11 extra is the reviewed TensorRT 11; trt is 10)"
        )


def test_rtx_extra_pins_one_tensorrt_rtx_and_dev_installs_it(project):
    """Engines run only under the TensorRT-RTX version that built them: one exact version, the one
    the build records; CI (README's install: `dev`) builds real engines with it."""
    requirement = _only(project, "rtx", {"tensorrt-rtx"})
    pinned = [spec for spec in requirement.specifier if spec.operator == "=="]
    assert len(pinned) == 1 and len(requirement.specifier) == 1, f"{requirement} is not one exact version"
    assert "tensorrt-rtx" in _names(_extra_requirements(project, {"dev"}))
    from importlib.metadata import PackageNotFoundError, version

    try:
        assert version("tensorrt-rtx") == pinned[0].version, "the installed tensorrt-rtx is not the pinned one"
    except PackageNotFoundError:
        pytest.skip("tensorrt-rtx is not installed here")


def test_polygraphy_floor_has_the_keywords_and_guards_the_build_needs(project):
    requirement = _only(project, "dev", {"polygraphy"})
    for version in POLYGRAPHY_BROKEN:
        assert not requirement.specifier.contains(version), (
            f"{requirement} admits polygraphy {version} (no progress_monitor keyword, or reads attributes TensorRT 11 removed)"
        )
    assert requirement.specifier.contains(POLYGRAPHY_GOOD)


def test_ci_installs_what_the_readme_tells_people_to_install():
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in ci.splitlines() if re.match(r"\s*python -m pip install torch", line)]
    assert len(lines) == 1, f".ci/run should have one install line, has {lines}"
    command = lines[0].removeprefix("python -m ")
    assert command in (ROOT / "README.md").read_text(), (
        f"README's install command differs from .ci/run's {command!r}: CI must test what people install"
    )


# Import name -> distribution, for every third-party package the project imports.
DISTRIBUTIONS = {
    "torch": "torch", "numpy": "numpy", "safetensors": "safetensors", "ml_dtypes": "ml-dtypes", "PIL": "pillow",
    "onnx": "onnx", "onnxscript": "onnxscript", "onnxslim": "onnxslim", "polygraphy": "polygraphy",
    "diffusers": "diffusers", "huggingface_hub": "huggingface-hub", "matplotlib": "matplotlib",
    "onnxruntime": "onnxruntime", "tensorrt": "tensorrt-cu13", "tensorrt_rtx": "tensorrt-rtx",
    # serving: the server and its Python backend's module come with nvidia-pytriton (or NGC's container)
    "pytriton": "nvidia-pytriton", "triton_python_backend_utils": "nvidia-pytriton", "tritonclient": "tritonclient",
}
PROJECT_PACKAGES = ("engines", "export", "runtime", "calib", "benchmarks")
# Modules of the program that imports the code, not of any distribution: ComfyUI's, for its nodes only.
HOST_MODULES = {"folder_paths": "runtime/comfyui/", "comfy": "runtime/comfyui/"}


def _third_party_imports(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Top-level third-party import name -> the project modules importing it (lazily or not)."""
    import ast
    import sys

    found: dict[str, set[str]] = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in HOST_MODULES:
                        assert str(path.relative_to(ROOT)).startswith(HOST_MODULES[top]), f"{path} imports {top}"
                    elif top not in sys.stdlib_module_names and top not in PROJECT_PACKAGES and top != "__future__":
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_import_is_declared_in_the_core_or_an_extra(project):
    imported = _third_party_imports(PROJECT_PACKAGES)
    unknown = {name: sorted(where) for name, where in imported.items() if name not in DISTRIBUTIONS}
    assert unknown == {}, f"imports with no known distribution (add them to pyproject.toml and here): {unknown}"
    declared = _names(_requirements(project, set(project["optional-dependencies"])))
    missing = {DISTRIBUTIONS[name] for name in imported} - declared - {"onnxruntime"}
    assert missing == set(), f"imported but never declared: {sorted(missing)}"
    assert "onnxruntime" in _names(_requirements(project, {"cpu"}))


def test_a_runtime_only_install_is_the_core_and_one_onnxruntime(project):
    """What an app embedding the runtime installs: `.[cpu]` or `.[gpu]`; the torch backend adds `models`."""
    core = _names(_requirements(project, set()))
    assert core == {"torch", "numpy", "safetensors", "ml-dtypes", "pillow"}
    runtime_imports = _third_party_imports(("runtime",))
    serving = _names(_extra_requirements(project, {"serve"}))  # python -m runtime.serve only
    assert serving == {"nvidia-pytriton", "tritonclient"}
    needed = {DISTRIBUTIONS[name] for name in runtime_imports} - {"onnxruntime", "tensorrt-cu13", "tensorrt-rtx"} - serving
    assert needed <= core, f"the runtime imports {sorted(needed - core)} beyond the core"
    build_side = {"onnx", "onnxscript", "onnxslim", "polygraphy", "diffusers", "huggingface-hub", "matplotlib"}
    assert not core & build_side
    assert {"diffusers", "huggingface-hub"} <= _names(_extra_requirements(project, {"models"}))
    assert build_side - {"matplotlib"} <= _names(_extra_requirements(project, {"build"}))
    assert build_side | serving | {"pytest"} <= _names(_extra_requirements(project, {"dev"}))


def test_every_package_ships_py_typed_and_the_public_api_is_typed():
    for package in PROJECT_PACKAGES:
        assert (ROOT / package / "py.typed").is_file(), f"{package}/py.typed is missing"
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["*"]
    import inspect

    from runtime import Upscaler

    for name in ("load", "upscale", "decode", "check_input", "memory_bytes", "close"):
        signature = inspect.signature(getattr(Upscaler, name))
        untyped = [p.name for p in signature.parameters.values() if p.name not in ("self", "cls") and
                   p.annotation is inspect.Parameter.empty]
        assert not untyped and signature.return_annotation is not inspect.Signature.empty, (name, untyped)

"""The runtime's first-use check and the user cache folder.

The backends here are test doubles of OUR ``Backend`` class: the ONNX Runtime backend on the
folder's graphs with a ``verification_identity`` (which TensorRT's backend has), and ones whose U-Net
is off on purpose: always, on later calls at a shape only (what a wrong CUDA-graph replay looks
like), or at one shape only. They test the runtime's logic around the check (run once per identity,
cache the verdict, refuse failures), not TensorRT.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

import runtime.checkset as checkset
from runtime import BackendUnavailable, Upscaler
from engines.manifest import MANIFEST_NAME, load_manifest
from runtime.backends import OnnxRuntimeBackend
from runtime.backends.registry import BackendSpec, registered
from runtime.cache import CACHE_ENV, CacheLocationError, cache_dir, cache_root
from runtime.checkset import EngineCheckFailed

from .cpu_units import WITHOUT_BF16, pretend_cpu


class CheckedEngines(OnnxRuntimeBackend):
    """The folder's graphs, presented as engines that need a first-use check."""

    closed = 0

    def __init__(self, folder: Path, identity: dict, velocity_error: float = 0.0, wrong=None):
        manifest = load_manifest(folder)
        super().__init__({n: folder / r.onnx_file for n, r in manifest.components.items()}, torch.device("cpu"))
        self.name, self.identity, self.velocity_error = "fake-engines", identity, velocity_error
        self.wrong = wrong  # (sample shape, call number at that shape) -> whether the velocity is off
        self.calls: Counter = Counter()

    def verification_identity(self) -> dict | None:
        return self.identity

    def run(self, component, inputs):
        outputs = super().run(component, inputs)
        if component == "unet":
            shape = tuple(inputs["sample"].shape)
            self.calls[shape] += 1
            if self.velocity_error or (self.wrong and self.wrong(shape, self.calls[shape])):
                outputs = {"velocity": outputs["velocity"] * (1 + (self.velocity_error or 0.2))}
        return outputs

    def close(self) -> None:
        CheckedEngines.closed += 1
        super().close()


IDENTITY = {"engines": {"unet": "ab" * 32}, "gpu": "test double", "driver": "1.0", "flavour": "none", "version": "0"}


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "user-cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


@pytest.fixture()
def runs(monkeypatch) -> list[str]:
    """Counts the check-set runs (the function ``verify_first_use`` calls)."""
    calls: list[str] = []
    real = checkset.run_check_set

    def counting(backend, folder, manifest):
        calls.append(backend.name)
        return real(backend, folder, manifest)

    monkeypatch.setattr(checkset, "run_check_set", counting)
    return calls


@pytest.fixture()
def engines(monkeypatch):
    """``tensorrt`` (registered in its place for the test, running on the CPU) opens a
    ``CheckedEngines`` (set ``engines.identity``/``velocity_error`` per test); ``auto`` tries it
    first wherever it runs, as it does on a GPU, then the CPU's fp32 path (ONNX Runtime, torch)."""
    pretend_cpu(monkeypatch, WITHOUT_BF16)
    settings = {"identity": IDENTITY, "velocity_error": 0.0, "wrong": None}

    def open_engines(request):
        return CheckedEngines(request.folder, settings["identity"], settings["velocity_error"], settings["wrong"])

    CheckedEngines.closed = 0
    with registered(BackendSpec("tensorrt", "the folder's graphs as engines (a test double)", ("cpu",), open_engines)):
        yield settings


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_passing_engines_are_checked_once_per_identity_and_the_verdict_cached(small_artifacts, cache, runs, engines):
    before = _files(small_artifacts)
    with Upscaler.load(small_artifacts, backend="tensorrt", device="cpu") as upscaler:
        assert upscaler.backend_name == "fake-engines"
    assert runs == ["fake-engines"]
    verdicts = list((cache / "verdicts").iterdir())
    assert len(verdicts) == 1
    verdict = json.loads(verdicts[0].read_text())
    assert verdict["passed"] is True and verdict["identity"] == IDENTITY
    assert {o["component"] for o in verdict["result"]["outputs"]} == {"cond_encoder", "unet", "vae_decoder", "pass"}

    with Upscaler.load(small_artifacts, backend="tensorrt", device="cpu"):
        pass
    assert runs == ["fake-engines"]  # the cached verdict: not run again

    engines["identity"] = {**IDENTITY, "driver": "2.0"}  # another driver: checked again
    with Upscaler.load(small_artifacts, backend="auto", device="cpu") as upscaler:
        assert upscaler.backend_name == "fake-engines"
    assert runs == ["fake-engines", "fake-engines"] and len(list((cache / "verdicts").iterdir())) == 2
    assert _files(small_artifacts) == before  # nothing written into the artifact folder


def test_failing_engines_raise_when_asked_for_and_auto_falls_back(small_artifacts, cache, runs, engines):
    engines["velocity_error"] = 0.2  # 20 % off: rel-L2 about 0.2, over fp16's 0.01
    with pytest.raises(EngineCheckFailed) as raised:
        Upscaler.load(small_artifacts, backend="tensorrt", device="cpu")
    message = str(raised.value)
    assert "failed their check set" in message and "pass x0" in message
    assert "unet velocity at sample 1x32x16x16, first call (rel-L2 0.2" in message
    assert "\n" not in message and "verdict cached in" in message and isinstance(raised.value, BackendUnavailable)
    assert CheckedEngines.closed == 1 and runs == ["fake-engines"]
    verdict = json.loads(next((cache / "verdicts").iterdir()).read_text())
    assert verdict["passed"] is False

    with pytest.raises(EngineCheckFailed, match="cached verdict .*delete it to check again"):
        Upscaler.load(small_artifacts, backend="tensorrt", device="cpu")
    assert runs == ["fake-engines"]  # refused from the cache

    with Upscaler.load(small_artifacts, backend="auto", device="cpu") as upscaler:
        assert upscaler.backend_name == "onnxruntime-cpu"
        assert "failed their check set" in upscaler.skipped_backends["tensorrt"]
    assert CheckedEngines.closed == 3


@pytest.mark.parametrize("wrong_from, named", [
    (3, ["replayed call"]),  # TensorRT's order at one shape: plain, plain then capture, replay
    (2, ["second call", "replayed call"]),
])
def test_engines_right_on_the_first_call_and_wrong_on_later_ones_fail_naming_the_call(
        small_artifacts, cache, runs, engines, wrong_from, named):
    engines["wrong"] = lambda shape, call: call >= wrong_from
    with pytest.raises(EngineCheckFailed) as raised:
        Upscaler.load(small_artifacts, backend="tensorrt", device="cpu")
    message = str(raised.value)
    for profile in load_manifest(small_artifacts).components["unet"].profiles:
        for end in (profile.min, profile.max):
            shape = "x".join(map(str, end["sample"]))
            for call in ("first call", "second call", "replayed call"):
                assert (f"unet velocity at sample {shape}, {call} (rel-L2 0.2" in message) == (call in named), (
                    shape, call, message)
    verdict = json.loads(next((cache / "verdicts").iterdir()).read_text())
    assert verdict["passed"] is False


def test_engines_wrong_only_at_a_profiles_largest_shape_fail_naming_it(small_artifacts, cache, runs, engines):
    largest = tuple(load_manifest(small_artifacts).components["unet"].profiles[-1].max["sample"])  # (4, 32, 64, 64)
    engines["wrong"] = lambda shape, call: shape == largest
    with pytest.raises(EngineCheckFailed) as raised:
        Upscaler.load(small_artifacts, backend="tensorrt", device="cpu")
    failures = json.loads(next((cache / "verdicts").iterdir()).read_text())["failures"]
    shape = "x".join(map(str, largest))
    assert len(failures) == 3, failures  # nothing else: the other shapes and the pass are right
    for failure, call in zip(failures, ("first call", "second call", "replayed call")):
        assert failure.startswith(f"unet velocity at sample {shape}, {call} (rel-L2 0.2"), failures
    assert f"unet velocity at sample {shape}, first call" in str(raised.value)


def test_a_check_set_of_another_layout_cannot_check_engines(small_artifacts, cache, runs, engines, tmp_path):
    folder = tmp_path / "artifacts"
    shutil.copytree(small_artifacts, folder)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["check_set"]["version"] = 1
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(EngineCheckFailed, match="cannot be checked: the check set .* has layout version 1; this "
                                               "runtime reads version 2 .*rebuild with"):
        Upscaler.load(folder, backend="tensorrt", device="cpu")
    assert not (cache / "verdicts").exists() and CheckedEngines.closed == 1


def test_backends_without_an_identity_are_not_checked(small_artifacts, cache, runs):
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as upscaler:
        assert upscaler.backend.verification_identity() is None
    assert runs == [] and not cache.exists()


def test_engines_that_cannot_run_their_check_set_are_refused_and_nothing_is_cached(
        small_artifacts, cache, runs, engines, monkeypatch):
    def unavailable(self, component):
        if component == "vae_decoder":
            raise BackendUnavailable("no decoder here")

    monkeypatch.setattr(CheckedEngines, "check", unavailable)
    with pytest.raises(EngineCheckFailed, match="could not run their check set here: vae_decoder cannot run here: "
                                               "no decoder here"):
        Upscaler.load(small_artifacts, backend="tensorrt", device="cpu")
    assert not (cache / "verdicts").exists()


def test_an_unreadable_verdict_is_checked_again(small_artifacts, cache, runs, engines):
    with Upscaler.load(small_artifacts, backend="tensorrt", device="cpu"):
        pass
    path = next((cache / "verdicts").iterdir())
    path.write_text("{not json")
    with Upscaler.load(small_artifacts, backend="tensorrt", device="cpu"):
        pass
    assert len(runs) == 2 and json.loads(path.read_text())["passed"] is True


def test_a_cache_inside_the_artifact_folder_is_refused(small_artifacts, runs, engines, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(small_artifacts / "cache"))
    with pytest.raises(CacheLocationError, match=f"inside the artifact folder .*set {CACHE_ENV}"):
        Upscaler.load(small_artifacts, backend="tensorrt", device="cpu")
    assert not (small_artifacts / "cache").exists() and CheckedEngines.closed == 1


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root() == tmp_path / "xdg" / "flow-upscaler"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # invalid by the XDG spec: ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "flow-upscaler"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == tmp_path / "home" / ".cache" / "flow-upscaler"
    assert cache_dir("verdicts", tmp_path / "artifacts") == tmp_path / "home" / ".cache" / "flow-upscaler" / "verdicts"
    assert not (tmp_path / "home").exists()  # nothing made until written

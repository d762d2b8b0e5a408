"""The runtime's check set call by call: a later call that writes nothing into the buffers a backend
hands back again, a run that raises on one call or returns too little, and a check set of an older
layout whose verdict is already cached.

The backends are test doubles of OUR ``Backend`` class (the ONNX Runtime backend on the folder's
graphs, with buffers kept per shape as TensorRT's launches keep theirs): they test the check's own
logic, not TensorRT.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from engines.manifest import MANIFEST_NAME, load_manifest
from runtime.backends import OnnxRuntimeBackend
from runtime.cache import CACHE_ENV
from runtime.checkset import EngineCheckFailed, run_check_set, verify_first_use

IDENTITY = {"engines": {"unet": "cd" * 32}, "gpu": "test double", "driver": "1.0", "flavour": "none", "version": "0"}


class KeptBuffers(OnnxRuntimeBackend):
    """The folder's graphs; the U-Net's velocity is written into one buffer per shape, handed back
    on every call. ``writes``: how many calls at a shape write it (all by default; later ones leave
    it as it was, as a replayed CUDA graph that recorded no work does); ``fail``: (call at a shape)
    -> an error to raise, or None."""

    def __init__(self, folder: Path, writes: int | None = None, fail=None, drop_velocity: bool = False,
                 stale_inputs: bool = False):
        manifest = load_manifest(folder)
        super().__init__({n: folder / r.onnx_file for n, r in manifest.components.items()}, torch.device("cpu"))
        self.name, self.writes, self.fail, self.drop_velocity = "kept-buffers", writes, fail, drop_velocity
        self.stale_inputs, self.second_inputs = stale_inputs, {}
        self.calls: Counter = Counter()
        self.buffers: dict[tuple, torch.Tensor] = {}

    def verification_identity(self) -> dict | None:
        return IDENTITY

    def run(self, component, inputs):
        if component != "unet":
            return super().run(component, inputs)
        shape = tuple(inputs["sample"].shape)
        self.calls[shape] += 1
        call = self.calls[shape]
        if self.fail and (error := self.fail(call)):
            raise error
        if self.drop_velocity:
            return {}
        if self.stale_inputs and call == 2:  # kept, as a replay whose input copies are missing keeps them
            self.second_inputs[shape] = {n: t.clone() for n, t in inputs.items()}
        elif self.stale_inputs and call > 2:
            inputs = self.second_inputs[shape]
        if self.writes is None or call <= self.writes:
            velocity = super().run(component, inputs)["velocity"]
            if shape not in self.buffers:
                with torch.inference_mode(False):
                    self.buffers[shape] = torch.empty_like(velocity)
            self.buffers[shape].copy_(velocity)
        return {"velocity": self.buffers[shape]}


def _unet_samples(folder: Path) -> list[str]:
    cases = load_manifest(folder).check_set.components["unet"]["cases"]
    return ["x".join(map(str, case["inputs"]["sample"])) for case in cases]


def test_buffers_kept_right_on_every_call_pass(small_artifacts):
    """The double itself is right when every call writes: what the next test changes is the writes."""
    result = run_check_set(KeptBuffers(small_artifacts), small_artifacts, load_manifest(small_artifacts))
    assert result.passed, result.failures


def test_a_later_call_that_writes_nothing_fails_on_that_call(small_artifacts):
    """Calls after the second leave the first two's values in the buffer: right numbers, not computed."""
    backend = KeptBuffers(small_artifacts, writes=2)
    result = run_check_set(backend, small_artifacts, load_manifest(small_artifacts))
    assert not result.passed
    failures = [f for f in result.failures if f.startswith("unet velocity")]
    samples = _unet_samples(small_artifacts)
    assert len(failures) == len(samples) >= 4, failures  # every U-Net case, on its third call only
    for failure, sample in zip(failures, samples):
        assert failure.startswith(f"unet velocity at sample {sample}, replayed call (non-finite values"), failures


def test_a_replay_on_the_previous_calls_inputs_fails_where_the_batch_can_be_reordered(small_artifacts):
    """Calls after the second compute on the second call's inputs (a replay that reads stale input
    buffers): the replayed call's batch comes in reverse order, so every case with more than one item
    fails on that call; a one-item case cannot tell."""
    backend = KeptBuffers(small_artifacts, stale_inputs=True)
    result = run_check_set(backend, small_artifacts, load_manifest(small_artifacts))
    failures = [f for f in result.failures if f.startswith("unet velocity")]
    batched = [s for s in _unet_samples(small_artifacts) if int(s.split("x")[0]) > 1]
    assert len(failures) == len(batched) >= 2, (failures, batched)
    for failure, sample in zip(failures, batched):
        assert failure.startswith(f"unet velocity at sample {sample}, replayed call ("), failures


def test_a_call_that_raises_is_named_with_its_shape(small_artifacts):
    backend = KeptBuffers(small_artifacts, fail=lambda call: RuntimeError("graph replay failed") if call == 3 else None)
    result = run_check_set(backend, small_artifacts, load_manifest(small_artifacts))
    first = _unet_samples(small_artifacts)[0]
    assert result.errors["unet"] == f"at sample {first}, replayed call: graph replay failed"
    assert not result.passed and "pass" not in result.errors  # the pass needs the U-Net to have run


def test_a_backend_that_returns_no_velocity_is_its_error_not_the_check_sets(small_artifacts):
    backend = KeptBuffers(small_artifacts, drop_velocity=True)
    result = run_check_set(backend, small_artifacts, load_manifest(small_artifacts))
    first = _unet_samples(small_artifacts)[0]
    assert result.errors["unet"] == f"at sample {first}, first call: the backend returned no output velocity"


def test_an_older_layout_is_refused_even_with_a_cached_verdict(small_artifacts, tmp_path, monkeypatch):
    """A verdict cached for a version-1 check set vouched for one shape: it does not let the engines in."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "user-cache"))
    folder = tmp_path / "artifacts"
    shutil.copytree(small_artifacts, folder)
    verify_first_use(KeptBuffers(folder), folder, load_manifest(folder))  # passes, verdict cached
    assert len(list((tmp_path / "user-cache" / "verdicts").iterdir())) == 1
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["check_set"]["version"] = 1  # the same file and engines: the cached verdict's key is unchanged
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    backend = KeptBuffers(folder)
    with pytest.raises(EngineCheckFailed, match="cannot be checked: the check set .* has layout version 1; this "
                                               "runtime reads version 2 .*rebuild with"):
        verify_first_use(backend, folder, load_manifest(folder))
    assert backend.calls == Counter()  # refused before running anything

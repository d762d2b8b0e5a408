"""manifest.json: round trip, and the error for each way an artifact folder can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines.manifest import (
    MANIFEST_NAME,
    ComponentRecord,
    EngineRecord,
    Manifest,
    ManifestError,
    load_manifest,
    read_manifest,
    sha256_file,
)
from engines.profiles import Profile

REBUILD = "python -m export.build --target rtx4090 --out art"


def _profile() -> Profile:
    return Profile("unet:128", {"sample": (1, 32, 128, 128)}, {"sample": (1, 32, 128, 128)}, {"sample": (2, 32, 128, 128)})


def _write(folder: Path, relative: str, data: bytes) -> str:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return sha256_file(path)


@pytest.fixture()
def artifact(tmp_path) -> Path:
    onnx_sha = _write(tmp_path, "onnx/unet.fp16.onnx", b"graph bytes")
    engine_sha = _write(tmp_path, "engines/unet.plan", b"engine bytes")
    record = ComponentRecord(
        name="unet",
        precision="fp16",
        onnx_file="onnx/unet.fp16.onnx",
        onnx_sha256=onnx_sha,
        onnx_key="k1",
        inputs=["sample"],
        outputs=["velocity"],
        profiles=[_profile()],
        engine=EngineRecord(
            file="engines/unet.plan",
            sha256=engine_sha,
            key="k2",
            tensorrt_version="10.9.0",
            gpu="NVIDIA GeForce RTX 4090",
            compute_capability="8.9",
            facts={"build_seconds": 12.5},
        ),
        validation={"status": "passed"},
        memory_estimate_bytes=[123],
    )
    Manifest(
        target={"name": "rtx4090"},
        weights={"unet": {"sha256": "abc"}},
        build_options={"optimization_level": 3},
        toolkit={"opset": 18},
        rebuild_command=REBUILD,
        components={"unet": record},
        created="2026-11-23T00:00:00+00:00",
    ).write(tmp_path)
    return tmp_path


def _load(folder, **kwargs):
    return load_manifest(folder, engines=True, tensorrt_version="10.9.0", compute_capability=(8, 9), **kwargs)


def test_round_trip_preserves_every_field(artifact):
    manifest = _load(artifact)
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again.to_dict() == manifest.to_dict()
    unet = manifest.components["unet"]
    assert unet.profiles == [_profile()]
    assert unet.engine.built and unet.engine.facts == {"build_seconds": 12.5}
    assert json.loads((artifact / MANIFEST_NAME).read_text())["schema_version"] == 1


def test_missing_file_is_named_with_the_rebuild_command(artifact):
    (artifact / "engines/unet.plan").unlink()
    with pytest.raises(ManifestError, match=r"engine engines/unet.plan .* is missing .* rebuild with: python -m export.build --target rtx4090"):
        _load(artifact)


def test_changed_file_is_a_hash_mismatch(artifact):
    (artifact / "onnx/unet.fp16.onnx").write_bytes(b"other graph")
    with pytest.raises(ManifestError, match=r"ONNX graph onnx/unet.fp16.onnx does not match the manifest \(sha256"):
        load_manifest(artifact)


def test_other_tensorrt_version_is_refused(artifact):
    with pytest.raises(ManifestError, match=r"TensorRT 10.9.0 at build, 10.13.0 here. Rebuild for this GPU and version with: python -m export.build"):
        load_manifest(artifact, engines=True, tensorrt_version="10.13.0", compute_capability=(8, 9))


def test_other_compute_capability_is_refused(artifact):
    with pytest.raises(ManifestError, match=r"compute capability 8.9 \(NVIDIA GeForce RTX 4090\) at build, 12.0 here"):
        load_manifest(artifact, engines=True, tensorrt_version="10.9.0", compute_capability=(12, 0))


def test_engine_not_built_says_where_to_run_the_build(artifact):
    data = json.loads((artifact / MANIFEST_NAME).read_text())
    data["components"]["unet"]["engine"] = {"built": False, "reason": "TensorRT is not installed"}
    (artifact / MANIFEST_NAME).write_text(json.dumps(data))
    assert not load_manifest(artifact).components["unet"].engine.built  # ONNX use is still fine
    with pytest.raises(ManifestError, match="unet engine was not built \\(TensorRT is not installed\\); on the target GPU run"):
        _load(artifact)


def test_missing_component_lists_what_the_folder_has(artifact):
    with pytest.raises(ManifestError, match="has no vae_decoder component \\(it has unet\\)"):
        _load(artifact, components=["vae_decoder"])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "has no manifest.json"),
        ("{not json", "not readable JSON"),
        (json.dumps({"schema": "flow-upscaler-artifacts", "schema_version": 99}), "version 99, this toolkit reads"),
        (json.dumps({"schema": "flow-upscaler-artifacts", "schema_version": 1, "rebuild_command": "x"}), "missing the field"),
    ],
)
def test_unusable_manifest_files(tmp_path, content, message):
    if content is not None:
        (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)

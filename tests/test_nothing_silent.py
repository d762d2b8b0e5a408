"""Nothing wrong passes silently (issue 33 items 2-4): latents far outside what a FLUX.2 VAE makes
are refused by their magnitude, whatever their dtype; a backend's NaN is never returned as a
result; numpy views torch cannot share are read, not crashed on; flags are bools; a manifest that
names files outside its folder is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engines.manifest import MANIFEST_NAME
from runtime import InvalidArgumentError, InvalidLatentsError, ManifestError, NonFiniteOutputError, Upscaler
from runtime.backends.registry import BackendSpec, registered, spec
from runtime.latents import validate_latents
from runtime.serving.requests import Request, Result, serve_batch


def _latents(side: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 32, side, side), dtype=np.float32)


@pytest.fixture(scope="module")
def upscaler(small_artifacts):
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as opened:
        yield opened


@pytest.mark.parametrize("latents", [
    np.full((1, 32, 8, 8), 1e6, np.float32),  # onnxruntime gave all NaN
    torch.full((1, 32, 8, 8), 3e38),  # torch gave NaN
    torch.full((1, 32, 8, 8), 1e39, dtype=torch.float64),  # finite in fp64, inf in fp32
    np.where(np.arange(32 * 64).reshape(1, 32, 8, 8) == 7, -5e4, 0.5).astype(np.float16),  # one value
], ids=["1e6-numpy", "3e38-torch", "1e39-float64", "-5e4-one-value-fp16"])
def test_latents_far_outside_a_vaes_range_are_refused_with_the_bound(upscaler, latents):
    with pytest.raises(InvalidLatentsError, match=r"accepted within \+-1000 \(runtime.latents.LATENT_LIMIT\)"):
        upscaler.upscale(latents)
    with pytest.raises(InvalidLatentsError, match="LATENT_LIMIT"):
        upscaler.decode(latents)


def test_the_bound_is_inclusive_and_nan_is_named_as_such():
    x = torch.zeros(1, 32, 4, 4)
    x[0, 3, 1, 1] = -1000.0
    validate_latents(x)
    x[0, 3, 1, 1] = 1000.5
    with pytest.raises(InvalidLatentsError, match="values up to 1000"):
        validate_latents(x)
    x[0, 3, 1, 1] = float("nan")
    with pytest.raises(InvalidLatentsError, match="contains NaN or Inf"):
        validate_latents(x)


def test_a_served_request_of_huge_latents_is_refused_alone(upscaler):
    good = _latents(8, seed=1)
    requests = [Request(np.full((1, 32, 8, 8), 1e30, np.float32), np.array([[2]], np.int32), np.array([[3]], np.int64)),
                Request(good, np.array([[2]], np.int32), np.array([[3]], np.int64))]
    answers = serve_batch(upscaler, requests)
    assert isinstance(answers[0], InvalidLatentsError) and "LATENT_LIMIT" in str(answers[0])
    assert isinstance(answers[1], Result) and np.isfinite(answers[1].upscaled).all()


def _broken_onnxruntime(broken: dict):
    """The real onnxruntime backend, whose ``broken`` component returns NaN once armed."""
    real = spec("onnxruntime")

    def open_broken(request):
        backend = real.open(request)
        run = backend.run

        def run_broken(component, inputs):
            outputs = run(component, inputs)
            if broken.get("component") == component:
                outputs = {name: torch.full_like(value, float("nan")) for name, value in outputs.items()}
            return outputs

        backend.run = run_broken
        return backend

    return BackendSpec("onnxruntime", real.needs, real.devices, open_broken)


@pytest.mark.parametrize("component, call", [("unet", "upscale"), ("vae_decoder", "upscale-decode"),
                                             ("vae_decoder", "decode")])
def test_a_backends_nan_is_an_error_not_a_result(small_artifacts, component, call):
    broken: dict = {}
    with registered(_broken_onnxruntime(broken)), Upscaler.load(small_artifacts, backend="onnxruntime",
                                                                device="cpu") as upscaler:
        x = torch.from_numpy(_latents(8))
        assert torch.isfinite(upscaler.upscale(x, decode=True)).all()  # fine until armed
        broken["component"] = component
        what = "decoded images" if call != "upscale" else "2x upscaled latents"
        with pytest.raises(NonFiniteOutputError, match=rf"onnxruntime-cpu backend returned NaN or Inf in the {what}"):
            if call == "decode":
                upscaler.decode(x)
            else:
                upscaler.upscale(x, decode=call == "upscale-decode")
        broken.clear()
        assert torch.isfinite(upscaler.upscale(x)).all()  # still usable


def test_numpy_views_torch_cannot_share_are_read_as_their_values(upscaler):
    x = _latents(8, seed=2)
    expected = upscaler.upscale(np.ascontiguousarray(x[:, :, ::-1]), seed=4)
    assert np.array_equal(upscaler.upscale(x[:, :, ::-1], seed=4), expected)  # negative strides
    big_endian = np.ascontiguousarray(x[:, :, ::-1]).astype(">f4")
    assert np.array_equal(upscaler.upscale(big_endian, seed=4), expected)
    with pytest.raises(InvalidLatentsError, match="must be a floating-point array, got numpy dtype <U1"):
        upscaler.upscale(np.full((1, 32, 8, 8), "a"))


@pytest.mark.parametrize("flag", ["no", 0, 1, None, "False"])
def test_decode_must_be_a_bool(upscaler, flag):
    with pytest.raises(InvalidArgumentError, match="decode must be True or False"):
        upscaler.upscale(_latents(8), decode=flag)


def test_numpy_bools_are_bools(upscaler):
    assert upscaler.upscale(_latents(8), decode=np.False_).shape == (1, 32, 16, 16)


@pytest.mark.parametrize("key, path", [("onnx", "../outside.onnx"), ("onnx", "/tmp/outside.onnx"),
                                       ("engine", "engines/../../outside.plan"), ("onnx", "C:\\outside.onnx")])
def test_a_manifest_naming_files_outside_its_folder_is_refused(small_artifacts, tmp_path, key, path):
    copy = tmp_path / "art"
    shutil.copytree(small_artifacts, copy)
    document = json.loads((copy / MANIFEST_NAME).read_text())
    record = document["components"]["unet"][key]
    record.update(file=path, built=True, sha256="0" * 64, tensorrt_version="10", compute_capability="8.9") \
        if key == "engine" else record.update(file=path)
    (copy / MANIFEST_NAME).write_text(json.dumps(document))
    with pytest.raises(ManifestError, match=rf"names components.unet.{key}.file .* not a path inside the folder"):
        Upscaler.load(copy, backend="onnxruntime", device="cpu")

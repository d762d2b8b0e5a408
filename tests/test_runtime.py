"""The runtime on the small configuration: ONNX Runtime (CPU) and torch backends against the
fp32 eager reference chain, input checks, concurrency, tiled decoding and the CLI."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from engines.manifest import MANIFEST_NAME
from export.models import VAEDecoder
from export.onnx.components import Models
from export.reference import upscale as reference_upscale
from runtime import BackendUnavailable, InvalidLatentsError, SizeOutOfRangeError, Upscaler
from runtime.backends import Backend
from runtime.latents import pack, read_latents, write_latents
from runtime.tiling import decode_tiled, tile_starts
from runtime.upscale import main

from .cpu_units import WITH_BF16, WITHOUT_BF16, pretend_cpu


RANDOM = {"source": "random", "seed": 0}


def _latents(*shape, seed=1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def models(small_models) -> Models:
    return small_models


@pytest.fixture(scope="module")
def artifacts(small_artifacts):
    return small_artifacts


@pytest.fixture(scope="module")
def upscaler(artifacts):
    with Upscaler.load(artifacts, backend="onnxruntime", device="cpu") as loaded:
        yield loaded


@pytest.mark.parametrize("scale", [2, 4])
def test_onnxruntime_chain_matches_the_eager_reference_chain(upscaler, models, scale):
    x = _latents(1, 32, 8, 12)
    got = upscaler.upscale(x, scale=scale, seed=3)
    ref = reference_upscale(models.unet, x, scale, seed=3)
    assert got.shape == (1, 32, 8 * scale, 12 * scale) and got.dtype == torch.float32
    assert _rel_l2(got, ref) < 1e-2  # the fp16 graphs' tolerance


def test_torch_backend_is_the_reference_and_checks_its_weights(artifacts, models):
    x = _latents(2, 32, 10, 8)
    with Upscaler.load(artifacts, backend="torch", device="cpu") as eager:
        assert eager.backend_name == "torch"
        torch.testing.assert_close(eager.upscale(x, scale=4, seed=9), reference_upscale(models.unet, x, 4, seed=9))


def test_auto_on_a_cpu_with_bf16_units_runs_torch_in_bf16_channels_last_within_the_bf16_gate(
        artifacts, models, monkeypatch):
    pretend_cpu(monkeypatch, WITH_BF16)
    x = _latents(1, 32, 8, 12)
    with Upscaler.load(artifacts, device="cpu") as auto:
        assert auto.backend_name == "torch-bf16" and auto.memory_bytes() == 0
        conv = next(m for m in auto.backend._modules["unet"].modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.dtype == torch.bfloat16 and conv.weight.is_contiguous(memory_format=torch.channels_last)
        got = auto.upscale(x, scale=2, seed=4)
    error = _rel_l2(got, reference_upscale(models.unet, x, 2, seed=4))
    assert 1e-5 < error < 0.03  # bf16, not fp32; within the bf16 accuracy gate (calib/thresholds.py)


def test_auto_on_a_cpu_without_bf16_units_or_asked_for_fp32_keeps_the_fp32_path(artifacts, monkeypatch):
    pretend_cpu(monkeypatch, WITHOUT_BF16)
    with Upscaler.load(artifacts, device="cpu") as auto:
        assert auto.backend_name == "onnxruntime-cpu" and auto.memory_bytes() == 0
    pretend_cpu(monkeypatch, WITH_BF16)
    with Upscaler.load(artifacts, device="cpu", precision="fp32") as fp32:
        assert fp32.backend_name == "onnxruntime-cpu"


def test_same_seed_same_noise_on_every_backend(artifacts, upscaler):
    x = _latents(1, 32, 8, 8)
    with Upscaler.load(artifacts, backend="torch", device="cpu") as eager:
        assert _rel_l2(upscaler.upscale(x, seed=5), eager.upscale(x, seed=5)) < 1e-2
        assert _rel_l2(upscaler.upscale(x, seed=5), eager.upscale(x, seed=6)) > 0.5


def test_packed_and_numpy_inputs_keep_their_form(upscaler):
    x = _latents(1, 32, 8, 12)
    unpacked = upscaler.upscale(x, seed=2)
    packed = upscaler.upscale(pack(x), seed=2, latent_format="flux2_packed")
    assert packed.shape == (1, 128, 8, 12)
    torch.testing.assert_close(packed, pack(unpacked))
    as_numpy = upscaler.upscale(x.numpy(), seed=2)
    assert isinstance(as_numpy, np.ndarray)
    np.testing.assert_array_equal(as_numpy, unpacked.numpy())


@pytest.mark.parametrize(
    "latents, kwargs, error, message",
    [
        (_latents(32, 8, 8), {}, InvalidLatentsError, "rank 4"),
        (_latents(1, 16, 8, 8), {}, InvalidLatentsError, r"16 channels, as FLUX.1, SD3 or Wan latents do; .*\[batch, 32, H/8"),
        (_latents(1, 24, 8, 8), {}, InvalidLatentsError, "must have 32 channels"),
        (_latents(1, 128, 8, 8), {}, InvalidLatentsError, "pass latent_format='flux2_packed'"),
        (_latents(1, 32, 8, 8), {"latent_format": "flux2_packed"}, InvalidLatentsError, r"must be \[batch, 128, h, w\]"),
        (torch.ones(1, 32, 8, 8, dtype=torch.int64), {}, InvalidLatentsError, "floating-point"),
        (torch.full((1, 32, 8, 8), float("nan")), {}, InvalidLatentsError, "NaN or Inf"),
        (_latents(1, 32, 9, 8), {}, InvalidLatentsError, "multiples of 2, got 9x8"),
        (_latents(1, 32, 6, 8), {}, SizeOutOfRangeError, r"first pass's input of 6x8 .* takes sides 8\.\.32 \(64\.\.256 px\)"),
        (_latents(1, 32, 32, 32), {"scale": 4}, SizeOutOfRangeError, "second pass's input of 64x64"),
        (_latents(5, 32, 8, 8), {}, SizeOutOfRangeError, "batch up to 4"),
        (_latents(1, 32, 8, 8), {"scale": 3}, InvalidLatentsError, r"scale must be one of \(2, 4, 8\)"),
        (_latents(1, 32, 8, 8), {"latent_format": "sd3"}, InvalidLatentsError, "latent_format must be one of"),
        ([[1.0]], {}, InvalidLatentsError, "torch.Tensor or numpy array, got list"),
    ],
)
def test_bad_input_is_refused_before_any_work(upscaler, monkeypatch, latents, kwargs, error, message):
    def no_work(*args, **kw):
        raise AssertionError("the backend ran before the input was checked")

    monkeypatch.setattr(upscaler.backend, "run", no_work)
    with pytest.raises(error, match=message):
        upscaler.upscale(latents, **kwargs)


def test_rebuild_hint_names_the_folder_command(upscaler):
    with pytest.raises(SizeOutOfRangeError, match="Rebuild with other --min-px/--max-px/--max-batch: python -m export.build"):
        upscaler.upscale(_latents(1, 32, 64, 64))


def test_concurrent_calls_give_their_sequential_results(upscaler):
    inputs = {seed: _latents(1, 32, 8, 8 + 2 * (seed % 3), seed=seed) for seed in range(6)}
    expected = {seed: upscaler.upscale(x, seed=seed) for seed, x in inputs.items()}
    results: dict[int, torch.Tensor] = {}

    def work(seed: int) -> None:
        results[seed] = upscaler.upscale(inputs[seed], seed=seed)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[s], expected[s]) for s in inputs)


def test_tiles_cover_the_image_and_stay_inside_it():
    assert tile_starts(48, 64, 16) == [0]
    assert tile_starts(96, 64, 16) == [0, 32]
    assert tile_starts(200, 64, 16) == [0, 48, 96, 136]
    for size, tile, overlap in ((96, 64, 16), (200, 64, 16), (130, 32, 8)):
        starts = tile_starts(size, tile, overlap)
        covered = set().union(*(range(s, s + tile) for s in starts))
        assert covered == set(range(size))
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_tiled_decode_stays_within_the_documented_distance_of_the_whole(models):
    # The decoder's GroupNorm statistics and mid-block attention are global, so tiles cannot be
    # exact; blending overlaps must keep them close. Bound documented in runtime/README.md (Noise, threads, decoding).
    decoder = VAEDecoder(models.vae).eval()
    z = _latents(1, 32, 96, 80, seed=4)
    with torch.no_grad():
        whole = decoder(z)
        blended = decode_tiled(decoder, z, tile=64, overlap=16)
        butted = decode_tiled(decoder, z, tile=64, overlap=0)
    assert blended.shape == whole.shape
    assert _rel_l2(blended, whole) < 0.08
    assert _rel_l2(blended, whole) < 0.5 * _rel_l2(butted, whole)


def test_decode_matches_eager_decoder_and_tiles_large_latents(upscaler, models):
    decoder = VAEDecoder(models.vae).eval()
    small, large = _latents(1, 32, 24, 32, seed=7), _latents(1, 32, 96, 80, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(upscaler.decode(small), decoder(small), rtol=1e-4, atol=1e-4)
        whole = decoder(large)
    tiled = upscaler.decode(large)  # the profile's tile is 64: two rows of two tiles
    assert tiled.shape == (1, 3, 768, 640) and _rel_l2(tiled, whole) < 0.08
    images = upscaler.upscale(_latents(1, 32, 8, 8), scale=2, seed=1, decode=True)
    assert images.shape == (1, 3, 128, 128)


def test_cli_upscales_and_decodes_to_png(artifacts, tmp_path, capsys):
    source, output, png = tmp_path / "in.safetensors", tmp_path / "out.safetensors", tmp_path / "out.png"
    x = _latents(1, 32, 8, 12)
    write_latents(source, x)
    code = main([str(artifacts), "--input", str(source), "--output", str(output), "--scale", "4", "--decode", str(png), "--seed", "3"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    with Upscaler.load(artifacts, device="cpu") as loaded:  # what auto chooses here, as the CLI did
        assert f"backend {loaded.backend_name}" in printed
        torch.testing.assert_close(read_latents(output), loaded.upscale(x, scale=4, seed=3))
    with Image.open(png) as image:
        assert image.size == (12 * 4 * 8, 8 * 4 * 8) and image.mode == "RGB"


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda p: p.write_bytes(b"not a safetensors file"), "is not a readable .safetensors file"),
        (lambda p: write_latents(p, _latents(1, 32, 7, 8)), "multiples of 2, got 7x8"),
        (lambda p: None, "does not exist"),
    ],
)
def test_cli_bad_input_exits_1_with_one_line(artifacts, tmp_path, capsys, make_input, message):
    source, output = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    make_input(source)
    assert main([str(artifacts), "--input", str(source), "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1
    assert not output.exists()


def test_cli_missing_artifacts_exits_1(tmp_path, capsys):
    write_latents(tmp_path / "in.safetensors", _latents(1, 32, 8, 8))
    assert main([str(tmp_path / "nowhere"), "--input", str(tmp_path / "in.safetensors"), "--output", str(tmp_path / "o")]) == 1
    assert "has no manifest.json" in capsys.readouterr().err


def test_decoder_the_backend_cannot_run_is_refused_before_any_work(upscaler, monkeypatch):
    from runtime import BackendUnavailable

    monkeypatch.setitem(upscaler.backend._unavailable, "vae_decoder", "ONNX Runtime (cpu) cannot run vae_decoder.bf16.onnx")

    def no_work(*args, **kw):
        raise AssertionError("the backend ran before the decoder was checked")

    monkeypatch.setattr(upscaler.backend, "run", no_work)
    with pytest.raises(BackendUnavailable, match="cannot run vae_decoder.bf16.onnx"):
        upscaler.upscale(_latents(1, 32, 8, 8), decode=True)


class ReusingBackend(Backend):
    """Hands back the same output buffers for every call at the same shapes, as backends with
    preallocated outputs do (the TensorRT backend among them): not an imitation of TensorRT, a
    test of the ``Upscaler``'s promise that what it returns owns its memory."""

    def __init__(self, inner: Backend):
        self.inner, self.name, self.device = inner, "reusing", inner.device
        self.buffers: dict[tuple, dict[str, torch.Tensor]] = {}

    def check(self, component):
        self.inner.check(component)

    def run(self, component, inputs):
        outputs = self.inner.run(component, inputs)
        key = (component, *((n, tuple(t.shape)) for n, t in inputs.items()))
        kept = self.buffers.setdefault(key, {n: torch.empty_like(t) for n, t in outputs.items()})
        for name, tensor in outputs.items():
            kept[name].copy_(tensor)
        return kept


def test_returned_tensors_own_their_memory_whatever_the_backend_reuses(artifacts, upscaler):
    reusing = Upscaler(artifacts, upscaler.manifest, ReusingBackend(upscaler.backend))
    first, second = _latents(1, 32, 8, 8, seed=1), _latents(1, 32, 8, 8, seed=2)
    calls = [
        lambda x: reusing.decode(x),  # one tile: the decoder's own output
        lambda x: reusing.upscale(x, scale=2, seed=0),
        lambda x: reusing.upscale(x, scale=2, seed=0, decode=True),
    ]
    for call in calls:
        kept = call(first)
        expected = kept.clone()
        call(second)
        assert torch.equal(kept, expected)


def test_auto_never_downloads_weights_a_folder_was_built_from(artifacts, tmp_path, monkeypatch):
    """A folder copied to a server without its checkpoint: auto's torch path looks in the local
    Hugging Face cache only, then runs the graphs at once; backend="torch" may download."""
    import huggingface_hub

    copied = tmp_path / "copied"
    shutil.copytree(artifacts, copied)
    manifest = json.loads((copied / MANIFEST_NAME).read_text())
    manifest["weights"]["unet"]["source"] = "flow-upscaler-tests/not-cached"
    (copied / MANIFEST_NAME).write_text(json.dumps(manifest))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    asked: list[bool] = []

    def no_download(repo_id, filename, local_files_only=False, **options):
        asked.append(local_files_only)
        raise huggingface_hub.errors.LocalEntryNotFoundError(f"{repo_id}/{filename} is not cached (test)")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    pretend_cpu(monkeypatch, WITH_BF16)
    with Upscaler.load(copied, device="cpu") as auto:
        assert auto.backend_name == "onnxruntime-cpu"
        assert "the Hugging Face cache only" in auto.skipped_backends["torch"]
    assert asked == [True]
    with pytest.raises(BackendUnavailable, match="is not in the local cache"):
        Upscaler.load(copied, backend="torch", device="cpu")
    assert asked == [True, False]


def test_auto_on_the_cpu_without_the_model_code_runs_the_graphs(artifacts, monkeypatch, caplog):
    """An app installed with the runtime's core only (no `models` extra: no diffusers): auto's
    torch path is skipped, said at INFO, and ONNX Runtime runs the graphs."""
    import sys

    monkeypatch.setitem(sys.modules, "export.models.precision", None)  # what a missing diffusers does to it
    pretend_cpu(monkeypatch, WITH_BF16)
    with caplog.at_level("INFO", logger="runtime.upscaler"):
        with Upscaler.load(artifacts, device="cpu") as auto:
            assert auto.backend_name == "onnxruntime-cpu"
            assert "pip install -e '.[models]'" in auto.skipped_backends["torch"]
    skipped = [r for r in caplog.records if "skipped torch" in r.getMessage()]
    assert [r.levelname for r in skipped] == ["INFO"]

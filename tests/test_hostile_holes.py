"""Holes a hostile pass found in the runtime and the benchmarks (issue 23): a decode larger than
the memory refused before any work, a 2-D seed array named as such, a benchmark left with nothing
to measure refused, and the uint8 RGB mapping of decoded images pinned by hand-computed values
where users get it (PNG files, the served image).

The memory cases fix the free memory the check sees (``runtime.inputs.available_memory``), so
they refuse the same sizes on every machine; one case reads the real figure, with a decode no
machine holds.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from benchmarks import latency
from runtime import InvalidArgumentError, SizeOutOfRangeError, Upscaler
from runtime import inputs as inputs_module
from runtime.tiling import decode_bytes, rgb8

GIB = 2**30


@pytest.fixture(scope="module")
def upscaler(small_artifacts):
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as loaded:
        yield loaded


@pytest.fixture()
def no_backend_work(upscaler, monkeypatch):
    """The backend fails the test if anything runs on it."""

    def run(component, inputs):
        raise AssertionError(f"{component} ran: the refusal came after work started")

    monkeypatch.setattr(upscaler.backend, "run", run)


def _free(monkeypatch, size: int) -> None:
    monkeypatch.setattr(inputs_module, "available_memory", lambda device: size)


# -- decode larger than the free memory ----------------------------------------------------------

def test_the_hostile_decode_is_refused_before_any_work_with_the_largest_that_fits(upscaler, no_backend_work, monkeypatch):
    _free(monkeypatch, 8 * GIB)
    huge = torch.randn(1, 32, 1, 1).expand(1, 32, 6000, 6000)  # the call: 17 s, then a raw RuntimeError
    with pytest.raises(SizeOutOfRangeError) as refused:
        upscaler.decode(huge)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("decoding 1x6000x6000 latents (48000x48000 px) needs about 34.")  # 25.7 GiB + 8.6 + ...
    assert "but cpu has about 8.0 GiB free: at batch 1 it decodes up to about " in message
    side = int(re.search(r"up to about (\d+)x\1 latents \((\d+)x\2 px\)", message).group(1))
    # the maximum is what the check accepts: that side passes, the next size on the grid does not
    upscaler._check_decode_memory(1, side, side)
    with pytest.raises(SizeOutOfRangeError):
        upscaler._check_decode_memory(1, side + 2, side + 2)
    image, work = upscaler.decode_memory_bytes(1, side, side)
    assert image + work <= 8 * GIB < sum(upscaler.decode_memory_bytes(1, side + 2, side + 2))


def test_upscale_with_decode_is_refused_before_the_first_pass(upscaler, no_backend_work, monkeypatch):
    x = torch.randn(2, 32, 16, 16)  # inside the folder's profiles; 2x -> 32x32 latents -> 2x3x256x256 images
    needed = sum(upscaler.decode_memory_bytes(2, 32, 32, new_latents=True))
    _free(monkeypatch, needed - 1)
    with pytest.raises(SizeOutOfRangeError, match=r"decoding 2x32x32 latents \(256x256 px\) needs about"):
        upscaler.upscale(x, scale=2, decode=True)
    _free(monkeypatch, needed)  # exactly enough: the check lets it through (and the stub backend is reached)
    with pytest.raises(AssertionError, match="cond_encoder ran"):
        upscaler.upscale(x, scale=2, decode=True)


def test_a_decode_no_machine_holds_is_refused_with_the_real_free_memory(upscaler, no_backend_work):
    free = inputs_module.available_memory(torch.device("cpu"))
    assert free is not None and 0 < free  # read from /proc/meminfo (or sysconf) here
    # 200000^2 latents: a 1.6-million-pixel-wide image, ~28 TiB in fp32. The NaN scan would allocate
    # a flag per value of the expanded tensor (1.2 TiB): the size is refused before it.
    huge = torch.zeros(1, 32, 1, 1).expand(1, 32, 200_000, 200_000)
    with pytest.raises(SizeOutOfRangeError, match="free: at batch 1 it decodes up to about"):
        upscaler.decode(huge)


def test_decode_that_fits_runs_and_half_precision_input_counts_its_fp32_copy(upscaler, monkeypatch):
    x = torch.randn(1, 32, 8, 8)
    image, work = upscaler.decode_memory_bytes(1, 8, 8)
    assert image == decode_bytes(1, 8, 8, upscaler._decode_tile()) == 2 * 4 * 3 * 64 * 64
    copy = 4 * 32 * 8 * 8
    assert sum(upscaler.decode_memory_bytes(1, 8, 8, new_latents=True)) == image + work + copy
    _free(monkeypatch, image + work + copy - 1)
    assert upscaler.decode(x).shape == (1, 3, 64, 64)  # fp32 in: no copy counted, it fits
    with pytest.raises(SizeOutOfRangeError):
        upscaler.decode(x.half())  # fp16 in: its fp32 copy does not fit


def test_tiled_decode_counts_the_blend_weights_and_one_tile():
    # 200x100 latents in 64-tiles: the image, its one-channel weights, a tile's piece three times
    assert decode_bytes(2, 200, 100, 64) == 4 * (2 * 3 * 1600 * 800 + 1600 * 800 + 3 * 2 * 3 * 512 * 512)


# -- seeds ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [np.array([[5], [6]]), torch.tensor([[5, 6]]), np.zeros((2, 1, 1), np.int64)])
def test_a_seed_array_of_more_than_one_dimension_is_named(upscaler, seed):
    with pytest.raises(InvalidArgumentError) as refused:
        upscaler.upscale(torch.randn(2, 32, 8, 8), seed=seed)
    assert f"seed as an array must be 1-D, one seed per batch item (2 for this batch), got a {seed.ndim}-D array " \
           f"of shape {tuple(seed.shape)}" in str(refused.value)


def test_a_scalar_array_is_one_seed(upscaler):
    x = torch.randn(1, 32, 8, 8)
    assert torch.equal(upscaler.upscale(x, seed=np.array(5)), upscaler.upscale(x, seed=5))
    with pytest.raises(InvalidArgumentError, match="seed must be an integer"):
        upscaler.upscale(x, seed=np.array(5.0))


# -- benchmarks.latency with nothing to measure ----------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--sizes", ","], "argument --sizes: no value in ','"),
    (["--sizes", ""], "argument --sizes: no value in ''"),
    (["--backends", ","], "argument --backends: no value in ','"),
    (["--components", ","], "argument --components: no value"),
    (["--noise", ","], "argument --noise: no value"),
    (["--device", "cpu", "--backends", "eager-fp16,torch-fp16,tensorrt"], "nothing to measure: --backends "
     "eager-fp16,torch-fp16,tensorrt run on CUDA only (--device cpu); on the CPU: eager-fp32,auto,onnxruntime,"
     "onnxruntime-int8,torch,torch-bf16,torch-bf16-compile"),
    (["--device", "cpu", "--backends", "eager-fp32", "--components", "backend_pass"],
     "nothing to measure: --components backend_pass is a row of the runtime's backends"),
])
def test_latency_options_that_leave_nothing_to_measure_are_usage_errors(small_artifacts, tmp_path, capsys, argv, message):
    report = tmp_path / "latency.json"
    with pytest.raises(SystemExit) as exit_info:
        latency.main(["--artifacts", str(small_artifacts), "--json", str(report), "--runs", "1", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not report.exists()


def test_latency_run_where_every_row_is_skipped_fails(small_artifacts, tmp_path, capsys):
    report = tmp_path / "latency.json"
    # the folder's cond_encoder takes low-res sides 8..32: at 2048 px (side 128) every row is skipped
    code = latency.main(["--artifacts", str(small_artifacts), "--device", "cpu", "--backends", "onnxruntime",
                         "--components", "cond_encoder,pipeline", "--sizes", "2048", "--runs", "1", "--warmup", "0",
                         "--json", str(report)])
    err = capsys.readouterr().err
    assert code == 1 and err.endswith("error: nothing was measured: every row was skipped (2 skips, reasons above); "
                                      "no file was written\n"), err
    assert not report.exists()


# -- decoded images as uint8 RGB -------------------------------------------------------------------

# [-1, 1] -> 0..255: v -> round((v + 1) * 127.5), half to even; outside [-1, 1] clamped. By hand:
# 0.25 -> 159.375, 0.5 -> 191.25, 0.999 -> 254.87, -0.999 -> 0.13, 0 -> 127.5 -> 128 (even)
VALUES = [-7.0, -1.0, -0.999, -0.5, 0.0, 0.25, 0.5, 0.999, 1.0, 3.0]
EXPECTED = [0, 0, 0, 64, 128, 159, 191, 255, 255, 255]
NEGATED = [255, 255, 255, 191, 128, 96, 64, 0, 0, 0]  # -0.25 -> 95.625, -0.5 -> 63.75


def _images() -> torch.Tensor:
    """[1, 3, 2, 5]: red VALUES, green the negated VALUES, blue VALUES mirrored left to right."""
    v = torch.tensor(VALUES).reshape(2, 5)
    return torch.stack([v, -v, v.flip(1)])[None]


def _expected() -> np.ndarray:
    """[1, 2, 5, 3] uint8, as a PNG or an image client holds it."""
    red, green = np.array(EXPECTED).reshape(2, 5), np.array(NEGATED).reshape(2, 5)
    return np.stack([red, green, red[:, ::-1]], axis=-1)[None].astype(np.uint8)


def test_rgb8_maps_by_hand_computed_values_and_leaves_its_input_alone():
    images = _images()
    before = images.clone()
    got = rgb8(images)
    assert got.dtype == np.uint8 and got.shape == (1, 2, 5, 3)
    assert np.array_equal(got, _expected()), got
    assert torch.equal(images, before)
    assert np.array_equal(rgb8(images.half()), rgb8(images.half().float()))


def test_png_files_hold_the_hand_computed_pixels(tmp_path):
    from PIL import Image

    from runtime.upscale import write_outputs

    png = tmp_path / "image.png"
    write_outputs(tmp_path / "out.safetensors", torch.zeros(1, 32, 2, 2), [png], _images())
    with Image.open(png) as image:
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image)[None], _expected())


def test_the_served_image_holds_the_hand_computed_pixels(upscaler, monkeypatch):
    from runtime.serving.requests import Request, Result, serve_batch

    images = torch.cat([_images(), -_images()])  # two requests gathered: each gets its own images

    def decode(latents, *args, **kwargs):
        assert latents.shape[0] == 2
        return images

    monkeypatch.setattr(upscaler, "decode", decode)
    latents = np.random.default_rng(0).standard_normal((1, 32, 8, 8), dtype=np.float32)
    request = lambda seed: Request(latents, np.array([[2]], np.int32), np.array([[seed]], np.int64),
                                   np.array([[True]]))
    first, second = serve_batch(upscaler, [request(1), request(2)])
    assert isinstance(first, Result) and isinstance(second, Result)
    assert first.image.dtype == np.uint8 and np.array_equal(first.image, _expected())
    assert np.array_equal(second.image[..., 0], np.array(NEGATED).reshape(1, 2, 5))  # red: -VALUES
    assert np.array_equal(second.image[..., 1], np.array(EXPECTED).reshape(1, 2, 5))  # green: VALUES

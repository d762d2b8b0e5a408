"""The eager reference: one Euler step, the 4x/8x chains, input validation and the CLI."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.latents import InvalidLatentsError, pack
from export.reference import main, upscale, upscale_step, validate_pass_inputs, velocity


def test_step_is_noise_minus_velocity_at_t_1000(small_unet):
    small = torch.randn(1, 32, 6, 8)
    noise = torch.randn(1, 32, 12, 16)
    with torch.no_grad():
        v = small_unet(noise, torch.tensor([1000.0]), small)
    assert torch.equal(upscale_step(small_unet, small, noise), noise - v)


def test_4x_chain_is_two_steps_with_sequential_cpu_noise(small_unet):
    latents = torch.randn(1, 32, 4, 6)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        noise_1 = torch.randn(1, 32, 8, 12, generator=gen)
        x = noise_1 - small_unet(noise_1, torch.tensor([1000.0]), latents)
        noise_2 = torch.randn(1, 32, 16, 24, generator=gen)
        expected = noise_2 - small_unet(noise_2, torch.tensor([1000.0]), x)
    assert torch.equal(upscale(small_unet, latents, scale=4, seed=7), expected)


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_output_size_per_scale(small_unet, scale):
    out = upscale(small_unet, torch.randn(2, 32, 2, 4), scale=scale)
    assert out.shape == (2, 32, 2 * scale, 4 * scale) and out.dtype == torch.float32


def test_seed_decides_the_noise(small_unet):
    latents = torch.randn(1, 32, 8, 8)
    a, b = upscale(small_unet, latents, seed=1), upscale(small_unet, latents, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, upscale(small_unet, latents, seed=2))


@pytest.mark.parametrize(
    "sample, small, message",
    [
        (torch.randn(1, 32, 18, 20), torch.randn(1, 32, 9, 10), r"sample height and width must be positive multiples of 4, got 18x20"),
        (torch.randn(1, 16, 16, 16), torch.randn(1, 16, 8, 8), "must have 32 channels"),
        (torch.randn(32, 16, 16), torch.randn(1, 32, 8, 8), "must have rank 4"),
        (torch.randn(1, 32, 16, 16), torch.randn(1, 32, 8, 6), r"latents_small must be \(1, 32, 8, 8\)"),
        (torch.randn(2, 32, 16, 16), torch.randn(1, 32, 8, 8), r"latents_small must be \(2, 32, 8, 8\)"),
        (torch.randn(1, 32, 16, 16), torch.full((1, 32, 8, 8), float("nan")), "NaN or Inf"),
        (torch.full((1, 32, 16, 16), float("inf")), torch.randn(1, 32, 8, 8), "NaN or Inf"),
        (torch.zeros(1, 32, 16, 16, dtype=torch.int32), torch.randn(1, 32, 8, 8), "floating-point"),
        ([[1.0]], torch.randn(1, 32, 8, 8), "must be a torch.Tensor"),
    ],
)
def test_invalid_pass_inputs_are_refused(sample, small, message):
    with pytest.raises(InvalidLatentsError, match=message):
        validate_pass_inputs(sample, small)


def test_upscale_refuses_odd_sizes_and_bad_scales(small_unet):
    with pytest.raises(InvalidLatentsError, match="multiples of 2, got 5x4"):
        upscale(small_unet, torch.randn(1, 32, 5, 4))
    with pytest.raises(ValueError, match=r"scale must be one of \(2, 4, 8\), got 3"):
        upscale(small_unet, torch.randn(1, 32, 4, 4), scale=3)


def test_training_mode_is_refused(small_unet):
    small_unet.train()
    with pytest.raises(RuntimeError, match="eval"):
        velocity(small_unet, torch.randn(1, 32, 8, 8), torch.randn(1, 32, 4, 4))


def test_cli_upscales_a_file_with_the_full_size_model(tmp_path):
    from export.checkpoint import load_unet

    latents = torch.randn(1, 32, 4, 6)
    save_file({"latents": latents}, str(tmp_path / "in.safetensors"))
    out = tmp_path / "out" / "x4.safetensors"
    code = main(["--random-weights", "--input", str(tmp_path / "in.safetensors"), "--scale", "4",
                 "--seed", "3", "--output", str(out)])
    assert code == 0
    expected = upscale(load_unet(random_weights=True), latents, scale=4, seed=3)
    torch.testing.assert_close(load_file(str(out))["latents"], expected, rtol=0, atol=0)
    assert [p.name for p in out.parent.iterdir()] == ["x4.safetensors"]


def test_cli_packed_format_round_trips(tmp_path):
    latents = torch.randn(1, 32, 4, 4)
    save_file({"x": pack(latents)}, str(tmp_path / "in.safetensors"))
    out = tmp_path / "out.safetensors"
    assert main(["--random-weights", "--input", str(tmp_path / "in.safetensors"),
                 "--latent-format", "flux2_packed", "--output", str(out)]) == 0
    assert load_file(str(out))["latents"].shape == (1, 128, 4, 4)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"latents": torch.randn(1, 16, 4, 4)}, "must have 32 channels"),
        ({"a": torch.randn(1, 32, 4, 4), "b": torch.randn(1, 32, 4, 4)}, "holds 2 tensors"),
        ({"latents": torch.full((1, 32, 4, 4), float("nan"))}, "NaN"),
    ],
)
def test_cli_bad_input_exits_1_with_one_line_and_writes_nothing(tmp_path, capsys, tensors, message):
    save_file(tensors, str(tmp_path / "in.safetensors"))
    out = tmp_path / "out.safetensors"
    code = main(["--random-weights", "--input", str(tmp_path / "in.safetensors"), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_missing_input_file(tmp_path, capsys):
    code = main(["--random-weights", "--input", str(tmp_path / "none.safetensors"), "--output", str(tmp_path / "o.safetensors")])
    assert code == 1 and "none.safetensors" in capsys.readouterr().err

"""diffusers' FLUX.2 pipelines hand their latents to the runtime (``runtime.latents``, ``latent_format``).

``Flux2Pipeline`` returns BN-normalised tokens [B, h*w, 128] (``tokens_to_packed`` -> ``flux2_packed``);
``Flux2KleinPipeline`` returns raw VAE latents [B, 32, H/8, W/8] (``latent_format="flux2_vae"``, with
the folder's BN statistics). Checked against diffusers' own code: its pipelines' static packing
helpers, and tiny random real pipelines (``tests/flux2_pipelines``) run with ``output_type="latent"``
and with an image output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline

from runtime import Upscaler
from runtime.latents import (
    InvalidLatentsError,
    LatentStats,
    denormalise,
    normalise,
    pack,
    packed_to_tokens,
    patchify,
    tokens_to_packed,
    unpack,
)
from runtime import InvalidArgumentError

from .flux2_pipelines import prompt_embeds, run, tiny_pipeline


def _latents(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- the forms, against diffusers' own packing code --------------------------------------------------

def test_tokens_are_diffusers_packing_and_convert_exactly_both_ways():
    packed = _latents((2, 128, 3, 5))
    tokens = Flux2Pipeline._pack_latents(packed)  # what the pipeline denoises and returns
    assert torch.equal(packed_to_tokens(packed), tokens)
    ids = Flux2Pipeline._prepare_latent_ids(packed)
    unpacked = Flux2Pipeline._unpack_latents_with_ids(tokens, ids)  # what it decodes
    assert torch.equal(tokens_to_packed(tokens, height=48, width=80), unpacked)
    assert torch.equal(tokens_to_packed(tokens, height=63, width=95), unpacked)  # it rounds down as the pipeline does
    assert torch.equal(patchify(unpack(unpacked)), Flux2Pipeline._patchify_latents(unpack(unpacked)))


def test_tokens_without_the_right_size_are_refused_by_name():
    tokens = _latents((1, 15, 128))
    with pytest.raises(InvalidLatentsError, match=r"15 positions, but a 64x64 px image has 4x4 = 16"):
        tokens_to_packed(tokens, 64, 64)
    with pytest.raises(InvalidLatentsError, match="height must be the image's height in pixels"):
        tokens_to_packed(tokens, None, 64)
    with pytest.raises(InvalidLatentsError, match=r"tokens must be a tensor \[batch, h\*w, 128\]"):
        tokens_to_packed(_latents((1, 32, 8, 8)), 64, 64)


def test_the_folder_records_its_vaes_statistics_bit_exact(small_artifacts, small_models):
    vae = small_models.vae
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as upscaler:
        stats = upscaler.latent_stats
    expected = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps)  # as the pipelines compute it
    assert torch.equal(stats.std.flatten(), expected) and torch.equal(stats.mean.flatten(), vae.bn.running_mean)
    assert not torch.equal(stats.mean, torch.zeros_like(stats.mean))  # the random VAE's statistics are not trivial


def test_raw_vae_latents_upscale_as_their_normalised_form(small_artifacts, small_models):
    stats = LatentStats.from_vae(small_models.vae)
    raw = denormalise(_latents((2, 32, 8, 8), seed=3), stats)  # what Flux2KleinPipeline returns
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as upscaler:
        out = upscaler.upscale(raw, 2, seed=[5, 6], latent_format="flux2_vae")
        normalised = upscaler.upscale(normalise(raw, stats), 2, seed=[5, 6])
        images = upscaler.decode(out, latent_format="flux2_vae")
        expected_images = upscaler.decode(normalised)
    assert out.shape == (2, 32, 16, 16)
    torch.testing.assert_close(out, denormalise(normalised, stats), rtol=0, atol=1e-5)  # one rounding apart
    torch.testing.assert_close(images, expected_images, rtol=0, atol=1e-4)


def test_wrong_forms_are_refused_with_what_to_do(small_artifacts, tmp_path):
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as upscaler:
        with pytest.raises(InvalidLatentsError, match=r"look like Flux2Pipeline's tokens.*tokens_to_packed"):
            upscaler.upscale(_latents((1, 16, 128)), 2)
        with pytest.raises(InvalidLatentsError, match="16 channels, as FLUX.1, SD3 or Wan latents do"):
            upscaler.upscale(_latents((1, 16, 8, 8)), 2, latent_format="flux2_vae")
        with pytest.raises(InvalidLatentsError, match="4 channels, as SD 1.x/2.x/SDXL"):
            upscaler.decode(_latents((1, 4, 8, 8)))
        with pytest.raises(InvalidLatentsError, match="latent_format must be one of"):
            upscaler.upscale(_latents((1, 32, 8, 8)), 2, latent_format="flux2_tokens")

    manifest = json.loads((small_artifacts / "manifest.json").read_text())
    del manifest["weights"]["vae"]["latent_stats"]  # a folder built before the statistics were recorded
    older = tmp_path / "older"
    older.mkdir()
    for entry in small_artifacts.iterdir():
        (older / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (older / "manifest.json").unlink()
    (older / "manifest.json").write_text(json.dumps(manifest))
    with Upscaler.load(older, backend="onnxruntime", device="cpu") as upscaler:
        with pytest.raises(InvalidArgumentError, match=r"records no VAE statistics.*LatentStats.from_vae\(pipe.vae\)"):
            upscaler.upscale(_latents((1, 32, 8, 8)), 2, latent_format="flux2_vae")
        assert upscaler.upscale(_latents((1, 32, 8, 8)), 2).shape == (1, 32, 16, 16)  # the other forms still run



# -- diffusers' real pipelines, tiny and random ------------------------------------------------------

@pytest.fixture(scope="module")
def pipelines(small_models):
    """Both pipelines on the VAE the small folder was built from (so its decoder is their VAE)."""
    return {kind: tiny_pipeline(kind, small_models.vae) for kind in ("flux2", "klein")}


def test_flux2_pipelines_tokens_converted_decode_to_its_own_image(pipelines):
    pipe = pipelines["flux2"]
    tokens = run(pipe, "latent", seed=4)
    image = run(pipe, "pt", seed=4)
    packed = tokens_to_packed(tokens, 64, 64)
    assert packed.shape == (1, 128, 4, 4) and torch.equal(packed_to_tokens(packed), tokens)  # exact both ways
    raw = denormalise(unpack(packed), LatentStats.from_vae(pipe.vae))
    with torch.no_grad():
        decoded = pipe.image_processor.postprocess(pipe.vae.decode(raw).sample, output_type="pt")
    torch.testing.assert_close(decoded, image, rtol=0, atol=1e-6)


def test_klein_pipelines_raw_latents_round_trip_and_decode_to_its_own_image(pipelines, small_artifacts):
    pipe = pipelines["klein"]
    raw = run(pipe, "latent", seed=4)
    image = run(pipe, "pt", seed=4)
    assert raw.shape == (1, 32, 8, 8)
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as upscaler:
        stats = upscaler.latent_stats  # the folder's, no diffusers needed
    back = denormalise(normalise(raw, stats), stats)
    torch.testing.assert_close(back, raw, rtol=0, atol=1e-6)  # fp32: (x - m) / s * s + m, one rounding each way
    with torch.no_grad():
        decoded = pipe.image_processor.postprocess(pipe.vae.decode(back).sample, output_type="pt")
    torch.testing.assert_close(decoded, image, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["flux2", "klein"])
def test_a_pipelines_latents_upscale_decode_and_start_it_again_at_the_new_size(pipelines, small_artifacts, kind):
    pipe = pipelines[kind]
    latents = run(pipe, "latent", seed=2)
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as upscaler:
        if kind == "flux2":
            packed4x = upscaler.upscale(tokens_to_packed(latents, 64, 64), 4, seed=0, latent_format="flux2_packed")
            raw4x = denormalise(unpack(packed4x), upscaler.latent_stats)
        else:
            raw4x = upscaler.upscale(latents, 4, seed=0, latent_format="flux2_vae")
            packed4x = pack(normalise(raw4x, upscaler.latent_stats))
        ours = upscaler.decode(raw4x, latent_format="flux2_vae")
    assert raw4x.shape == (1, 32, 32, 32) and ours.shape == (1, 3, 256, 256)
    with torch.no_grad():
        theirs = pipe.vae.decode(raw4x).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-3)  # the folder's fp32 decoder graph is this VAE
    again = run(pipe, "latent", seed=0, height=256, width=256, latents=packed4x)  # a second pass at 4x
    assert again.shape == ((1, 256, 128) if kind == "flux2" else (1, 32, 32, 32))


# -- the README's example, as written --------------------------------------------------------------

class _PromptsAsEmbeddings:
    """A tiny pipeline standing in for a published one: the same calls, random prompt embeddings in
    place of the text encoder (whose weights are not reachable here), 2 steps."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def to(self, device):
        self.pipe.to(device)
        return self

    def __call__(self, prompt: str, **kwargs):
        return self.pipe(prompt_embeds=prompt_embeds(self.pipe), num_inference_steps=2, **kwargs)


def test_the_readme_example_runs(pipelines, small_artifacts, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## diffusers' FLUX.2 pipelines", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    # the small folder takes images of 64..128 px at 4x; the published pipelines are not reachable
    substitutions = {'"build/rtx5090"': repr(str(small_artifacts)), "height=512, width=512": "height=128, width=128"}
    for published, small in substitutions.items():
        assert published in code
        code = code.replace(published, small)
    for cls, kind in ((Flux2KleinPipeline, "klein"), (Flux2Pipeline, "flux2")):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(
            lambda cls, repo, kind=kind, **kwargs: _PromptsAsEmbeddings(pipelines[kind])))
    scope: dict = {}
    with torch.no_grad():
        exec(compile(code, "README.md", "exec"), scope)
    assert scope["image"].shape == (1, 3, 512, 512) and scope["packed4x"].shape == (1, 128, 32, 32)

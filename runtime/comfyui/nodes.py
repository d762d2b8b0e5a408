"""The Flow Upscaler's ComfyUI nodes (classic node API: ``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION``).

- ``FlowUpscalerLoader``: an artifact folder or the published checkpoint, a backend -> ``FLOW_UPSCALER``.
- ``FlowUpscalerUpscale``: ``FLOW_UPSCALER``, a FLUX.2 ``LATENT``, 2x/4x/8x, a seed -> ``LATENT``.
- ``FlowUpscalerDecode``: ``FLOW_UPSCALER``, a FLUX.2 ``LATENT`` -> ``IMAGE`` (the folder's decoder).

ComfyUI's FLUX.2 ``LATENT`` is ``{"samples": [B, 128, H/16, W/16]}``, BN-normalised by its VAE: the
runtime's ``flux2_packed``. The nodes run on ComfyUI's device (``comfy.model_management``), free
the memory they need from ComfyUI's models first, report each pass and decoded tile to ComfyUI's
progress bar and stop between them when the prompt is cancelled. What the runtime refuses is
shown as its one-line message (``FlowUpscalerNodeError``), not a traceback from inside it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import comfy.model_management
import comfy.utils
import torch

from engines.errors import FlowUpscalerError
from runtime.latents import LATENT_CHANNELS, PACKED_CHANNELS
from runtime.latents import OTHER_LATENTS as OTHER_FAMILIES
from runtime.inputs import SEED_MAX
from runtime.selection import BACKENDS, PRECISIONS

from . import models
from .loaded import LOADED, FlowUpscalerModel, LoadSpec

logger = logging.getLogger(__name__)

CATEGORY = "latent/upscaling"
SCALES = {"2x": 2, "4x": 4, "8x": 8}
PRECISION_CHOICES = ("auto", *PRECISIONS)
# What a LATENT of other channel counts holds, for the message that refuses it.
OTHER_LATENTS = {**OTHER_FAMILIES, LATENT_CHANNELS: "an unpacked FLUX.2 latent (not ComfyUI's form)"}


class FlowUpscalerNodeError(FlowUpscalerError):
    """What a Flow Upscaler node refuses, as one sentence ComfyUI shows in its error dialog."""


@contextmanager
def explained() -> Iterator[None]:
    """The runtime's refusals as ``FlowUpscalerNodeError`` with its message, raised from the node
    (ComfyUI logs the traceback of what a node raises: this keeps it to the node's own frame)."""
    try:
        yield
    except FlowUpscalerNodeError:
        raise
    except FlowUpscalerError as exc:
        message = " ".join(str(exc).split())
        raise FlowUpscalerNodeError(f"Flow Upscaler: {message}") from None


def comfy_device() -> torch.device:
    """ComfyUI's torch device, where the runtime can run there (CUDA or the CPU), else the CPU."""
    device = torch.device(comfy.model_management.get_torch_device())
    if device.type not in ("cuda", "cpu"):
        logger.warning("Flow Upscaler: ComfyUI runs on %s, which the runtime does not support; using the CPU", device)
        return torch.device("cpu")
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


def free_for(model: FlowUpscalerModel, extra: int = 0) -> None:
    """Ask ComfyUI to unload its models until the upscaler's figures (plus ``extra`` bytes) are free."""
    device = torch.device(model.spec.device)
    if device.type == "cuda":
        comfy.model_management.free_memory(model.spec.memory_needed() + extra, device)


def progress_bar():
    """A runtime ``progress`` callback: ComfyUI's progress bar, and its cancel between two steps."""
    bar = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)
        comfy.model_management.throw_exception_if_processing_interrupted()

    return report


def flux2_samples(latent: object) -> torch.Tensor:
    """The ``samples`` of a FLUX.2 ``LATENT``, refused by name when it is another model's."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise FlowUpscalerNodeError(
            f"Flow Upscaler: expected a LATENT with a 'samples' tensor, got {type(samples if isinstance(latent, dict) else latent).__name__}")
    if samples.dim() != 4 or samples.shape[1] != PACKED_CHANNELS:
        channels = samples.shape[1] if samples.dim() >= 2 else None
        family = OTHER_LATENTS.get(channels)
        what = f"a {channels}-channel latent ({family})" if family and samples.dim() == 4 else (
            f"a latent of shape {list(samples.shape)}")
        raise FlowUpscalerNodeError(
            f"Flow Upscaler: got {what}; it upscales FLUX.2 latents only: [batch, {PACKED_CHANNELS}, height/16, "
            "width/16], as FLUX.2's VAE Encode or an empty FLUX.2 latent gives them")
    return samples


def batch_seeds(seed: int, batch: int) -> list[int]:
    """Item i's seed: seed + i (wrapping past 2**64 - 1), so an item's result does not depend on the batch."""
    return [(seed + i) % (SEED_MAX + 1) for i in range(batch)]


class FlowUpscalerLoader:
    DESCRIPTION = ("Loads a Flow Upscaler artifact folder (built with python -m export.build; put it in "
                   "models/flow_upscaler/<name>/) or the published checkpoint (models/latent_upscale_models/, "
                   "torch backend). It stays loaded across prompts until an input or the folder changes; "
                   "engines built elsewhere run the folder's check set on first use.")
    RETURN_TYPES = ("FLOW_UPSCALER",)
    OUTPUT_TOOLTIPS = ("The loaded upscaler, for Flow Upscaler Upscale and Flow Upscaler Decode.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (models.choices(), {"tooltip": "An artifact folder (name/) from models/flow_upscaler, or a "
                                             "Flow Upscaler .safetensors from models/latent_upscale_models."}),
                "backend": (list(BACKENDS), {"default": "auto", "tooltip": "auto: the fastest that runs here "
                                             "(TensorRT, then ONNX Runtime, then torch). A checkpoint runs on torch."}),
            },
            "optional": {
                "precision": (list(PRECISION_CHOICES), {"default": "auto", "tooltip": "The torch backend's precision "
                              "(auto: the folder's; fp32 for a checkpoint); int8: the folder's CPU graphs on the CPU."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, model, backend, **_):
        """Loads again when the folder's manifest or the checkpoint file changes (a rebuild)."""
        try:
            found = models.resolve(model)
        except models.ModelNotFound:
            return ""  # the load says what is missing
        return str(LoadSpec(found.kind, found.path, backend, None, "").stamp())

    def load(self, model: str, backend: str, precision: str = "auto", unique_id: str | None = None):
        try:
            found = models.resolve(model)
        except models.ModelNotFound as exc:
            raise FlowUpscalerNodeError(f"Flow Upscaler: {exc}") from None
        if found.kind == "checkpoint" and backend not in ("auto", "torch"):
            raise FlowUpscalerNodeError(
                f"Flow Upscaler: {model} is a checkpoint, which runs on the torch backend only (got backend "
                f"{backend}); for {backend}, build an artifact folder with python -m export.build --checkpoint "
                "<this file> and put it in models/flow_upscaler/")
        spec = LoadSpec(found.kind, found.path, backend, None if precision == "auto" else precision, str(comfy_device()))
        handle = FlowUpscalerModel(spec)
        with explained():
            LOADED.claim(str(unique_id), spec)
            free_for(handle)
            handle.upscaler()  # loads (and checks) now, so that a refusal shows on this node
        return (handle,)


class FlowUpscalerUpscale:
    DESCRIPTION = ("Upscales a FLUX.2 latent 2x, 4x or 8x in one rectified-flow step per 2x, on the loaded "
                   "Flow Upscaler's backend. Decode the result with Flow Upscaler Decode or VAE Decode.")
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The latent, 2x/4x/8x larger, in the same FLUX.2 form.",)
    FUNCTION = "upscale"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "flow_upscaler": ("FLOW_UPSCALER", {"tooltip": "From Flow Upscaler Loader."}),
                "samples": ("LATENT", {"tooltip": "A FLUX.2 latent (128 channels at 1/16 of the image size)."}),
                "scale": (list(SCALES), {"default": "2x", "tooltip": "2x is one pass; 4x and 8x chain two and three."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                                 "tooltip": "The noise seed. Batch item i uses seed + i, so each item gets the "
                                            "result it gets alone with that seed."}),
            },
        }

    def upscale(self, flow_upscaler: FlowUpscalerModel, samples: dict, scale: str, seed: int):
        latents = flux2_samples(samples)
        if scale not in SCALES:
            raise FlowUpscalerNodeError(f"Flow Upscaler: scale must be one of {', '.join(SCALES)}, got {scale!r}")
        with explained():
            upscaler = flow_upscaler.upscaler()
            free_for(flow_upscaler)
            out = upscaler.upscale(latents.to(upscaler.device), SCALES[scale], batch_seeds(seed, latents.shape[0]),
                                   latent_format="flux2_packed", progress=progress_bar())
        result = samples.copy()  # as ComfyUI's latent upscale nodes do: the other keys are kept
        result["samples"] = out.to(comfy.model_management.intermediate_device())
        return (result,)


class FlowUpscalerDecode:
    DESCRIPTION = ("Decodes a FLUX.2 latent to an image with the artifact folder's VAE decoder, in tiles "
                   "(bounded memory at any size). A checkpoint has no decoder: use VAE Decode with the FLUX.2 VAE.")
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "flow_upscaler": ("FLOW_UPSCALER", {"tooltip": "From Flow Upscaler Loader (an artifact folder "
                                                    "built with its vae_decoder)."}),
                "samples": ("LATENT", {"tooltip": "A FLUX.2 latent (128 channels at 1/16 of the image size)."}),
            },
        }

    def decode(self, flow_upscaler: FlowUpscalerModel, samples: dict):
        latents = flux2_samples(samples)
        with explained():
            if not flow_upscaler.decodes:
                what = "a checkpoint" if flow_upscaler.spec.kind == "checkpoint" else "a folder built without vae_decoder"
                raise FlowUpscalerNodeError(
                    f"Flow Upscaler: {flow_upscaler.spec.path.name} is {what}, so it has no decoder: decode with "
                    "ComfyUI's VAE Decode and the FLUX.2 VAE, or load a folder built with --components cond_encoder "
                    "unet vae_decoder")
            upscaler = flow_upscaler.upscaler()
            batch, _, height, width = latents.shape
            images_bytes, _ = upscaler.decode_memory_bytes(batch, 2 * height, 2 * width, new_latents=True)
            free_for(flow_upscaler, images_bytes)
            images = upscaler.decode(latents.to(upscaler.device), latent_format="flux2_packed", progress=progress_bar())
        # [-1, 1] -> ComfyUI's [B, H, W, 3] in 0..1, as its own VAE Decode maps and lays it out
        images = images.to(comfy.model_management.intermediate_device())
        return (images.add_(1.0).mul_(0.5).clamp_(0.0, 1.0).movedim(1, -1),)


NODE_CLASS_MAPPINGS = {
    "FlowUpscalerLoader": FlowUpscalerLoader,
    "FlowUpscalerUpscale": FlowUpscalerUpscale,
    "FlowUpscalerDecode": FlowUpscalerDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FlowUpscalerLoader": "Flow Upscaler Loader",
    "FlowUpscalerUpscale": "Flow Upscaler Upscale",
    "FlowUpscalerDecode": "Flow Upscaler Decode",
}

models.register()

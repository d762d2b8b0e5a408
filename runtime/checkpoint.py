"""An ``Upscaler`` straight from the published checkpoint: the torch backend, no artifact folder.

What a user who has only the ``.safetensors`` file runs (the ComfyUI nodes offer it beside the
built folders). The U-Net is loaded from the file (checked key by key against the model) and run
eagerly; there are no graphs, engines, check set or decoder, so sizes are bounded by memory only:
the in-memory manifest written here admits every even side from ``MIN_SIDE`` to ``MAX_SIDE`` and
batches up to ``MAX_BATCH``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engines.manifest import ComponentRecord, EngineRecord, Manifest
from engines.profiles import Profile

from .backends import TorchBackend
from .errors import BackendUnavailable
from .latents import LATENT_CHANNELS
from .upscale_pass import PASS_COMPONENTS

MIN_SIDE, MAX_SIDE, MAX_BATCH = 2, 4096, 64  # latent pixels of a pass's input; images of 16..32768 px
_INPUTS = {"cond_encoder": ["latents_small", "timestep"], "unet": ["sample", "cond", "lr1", "lr2", "lr3"]}
_OUTPUTS = {"cond_encoder": ["cond", "lr1", "lr2", "lr3"], "unet": ["velocity"]}
_MAIN = {"cond_encoder": ("latents_small", 1), "unet": ("sample", 2)}  # main input, its side per input side


def checkpoint_manifest(checkpoint: Path, sha256: str) -> Manifest:
    """The manifest of a checkpoint run without a build: its pass components, any size."""
    components = {}
    for name in PASS_COMPONENTS:
        main, factor = _MAIN[name]
        box = {main: ((1, LATENT_CHANNELS, MIN_SIDE * factor, MIN_SIDE * factor),
                      (MAX_BATCH, LATENT_CHANNELS, MAX_SIDE * factor, MAX_SIDE * factor))}
        profile = Profile(name="checkpoint", min={main: box[main][0]}, opt={main: box[main][0]}, max={main: box[main][1]})
        components[name] = ComponentRecord(
            name=name, precision="fp32", onnx_file="", onnx_sha256="", onnx_key="", inputs=_INPUTS[name],
            outputs=_OUTPUTS[name], profiles=[profile],
            engine=EngineRecord(reason="a checkpoint runs on the torch backend; build a folder for engines"))
    return Manifest(
        target={"name": "checkpoint"},
        weights={"unet": {"source": str(checkpoint), "sha256": sha256}},
        build_options={}, toolkit={},
        rebuild_command=f"python -m export.build --checkpoint {checkpoint} --target auto",
        components=components,
    )


def open_checkpoint(checkpoint: str | Path, device: torch.device, precision: str, compile_mode: str | None
                    ) -> tuple[Path, Manifest, TorchBackend]:
    """Load ``checkpoint`` (a Flow Upscaler ``.safetensors`` file) for the torch backend on ``device``."""
    try:
        from export.checkpoint import load_unet, weights_digest
        from export.models.components import Models
    except ImportError as exc:  # an app installed with the runtime's core and no `models` extra
        raise BackendUnavailable(f"a checkpoint runs on the torch backend, which needs the model code's packages "
                                 f"(pip install -e '.[models]'): {exc}") from exc
    path = Path(checkpoint)
    unet = load_unet(path, offline=True)  # CheckpointError (a FlowUpscalerError) names what is wrong
    manifest = checkpoint_manifest(path, weights_digest(unet))
    backend = TorchBackend(manifest, device, precision=precision, compile_mode=compile_mode, models=Models(unet=unet))
    return path, manifest, backend

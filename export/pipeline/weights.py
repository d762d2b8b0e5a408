"""What the build knows of the models' weights: their digests (part of every graph's key) and the
record the manifest keeps so the torch backend can load the same weights again."""

from __future__ import annotations

from export.checkpoint import weights_digest
from export.onnx.components import COMPONENTS, Models
from runtime.latents import LatentStats


def public_config(model) -> dict:
    """The model's config without diffusers' private entries (e.g. ``_use_default_values``, built
    from a set), whose order changes between processes and which say nothing about the model."""
    config = dict(getattr(model, "config", {}) or {})
    return {k: v for k, v in config.items() if not k.startswith("_")}


def weight_digests(models: Models, components: tuple[str, ...]) -> dict[str, str]:
    """The digest of each model (``unet``, ``vae``) the components are exported from."""
    return {needs: weights_digest(getattr(models, needs)) for needs in {COMPONENTS[c].needs for c in components}}


def weights_record(models: Models, digests: dict[str, str], sources: dict) -> dict:
    """What the torch backend needs to rebuild the models: where they came from, config, digest."""
    record = {}
    for needs, digest in digests.items():
        entry = dict(sources.get(needs, {}))
        entry.update(config=public_config(getattr(models, needs)), sha256=digest)
        if needs == "vae":  # what the runtime converts raw VAE latents with, without the VAE
            entry["latent_stats"] = LatentStats.record_of_vae(models.vae)
        record[needs] = entry
    return record

"""The fp32 eager models an artifact folder was built from, rebuilt from its manifest's weight record.

What the runtime's torch backend and the benchmarks' eager rows load: the weights are checked
against the digests recorded at build time, so they run exactly what the graphs were exported from.
"""

from __future__ import annotations

from engines.manifest import ManifestError

from ..checkpoint import load_unet, load_vae, random_vae, weights_digest
from .components import PARTS, Models


def models_from_weights_record(weights: dict, components: list[str], offline: bool = False) -> Models:
    """Rebuild the fp32 eager models a manifest's graphs were exported from, and prove it.

    ``offline``: local files and the Hugging Face cache only, no download. Raises ManifestError when
    the record lacks a source or the loaded weights' digest differs.
    """
    models = Models()
    for needs in sorted({PARTS[c].needs for c in components}):
        entry = weights.get(needs)
        if not entry or "source" not in entry:
            raise ManifestError(
                f"the manifest does not say where the {needs} weights came from (artifacts built through "
                "the Python API without a source); use the onnxruntime or tensorrt backend"
            )
        random, source, config = entry["source"] == "random", entry["source"], entry.get("config", {})
        if needs == "unet":
            model = load_unet(None if random else source, random_weights=random, seed=entry.get("seed", 0),
                              offline=offline, **config)
        else:
            model = random_vae(entry.get("seed", 0), **config) if random else load_vae(source, offline=offline)
        if weights_digest(model) != entry["sha256"]:
            raise ManifestError(
                f"the {needs} weights from {source!r} differ from the ones the artifacts were built from "
                f"(sha256 {entry['sha256'][:12]}...)"
            )
        setattr(models, needs, model)
    return models

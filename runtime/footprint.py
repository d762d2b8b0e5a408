"""The device memory an artifact folder needs loaded, from its manifest's figures, before loading it.

What a host that shares the GPU with other models (ComfyUI) frees first. Per component: its
weights (the engine builder's figure where an engine was built, else the ONNX graph's size on
disk) and its activation memory (the builder's figure for its largest profile, else the folder's
own estimate). Components run one after another, so the total is every component's weights plus
the largest activation memory: an estimate, not a bound the backends enforce.
"""

from __future__ import annotations

import os
from pathlib import Path

from engines.manifest import Manifest, read_manifest


def manifest_memory_bytes(folder: Path, manifest: Manifest) -> int:
    weights, activations = 0, [0]
    for record in manifest.components.values():
        facts = record.engine.facts if record.engine.built else {}
        if "weights_bytes" in facts:
            weights += int(facts["weights_bytes"])
        else:
            try:
                weights += os.stat(folder / record.onnx_file).st_size
            except OSError:
                pass  # a missing graph is the load's to report
        per_profile = facts.get("activation_bytes_per_profile") or record.memory_estimate_bytes
        activations.append(max((int(b) for b in per_profile), default=0))
    return weights + max(activations)


def memory_needed(artifact_dir: str | Path) -> int:
    """Bytes of device memory the folder's components need loaded and running (see the module's docstring)."""
    folder = Path(artifact_dir)
    return manifest_memory_bytes(folder, read_manifest(folder))  # figures only: the load checks the files

"""The export+validate stage: one component's ONNX graph, checked against the fp32 eager model.

Reused when the weights, the export settings and the source of every project module this stage
imports (the exporter, the model definitions, the latent contract, ...) are unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import onnx
import torch

from engines.manifest import content_key, sha256_file
from export.onnx.__main__ import export_and_validate
from export.onnx.components import COMPONENTS, Models
from export.onnx.exporter import OPSET, graph_filename

from .errors import BuildError
from .folder import ONNX_DIR, ArtifactFolder
from .progress import StageLog
from .sources import source_digest
from .weights import public_config


@dataclass(frozen=True)
class GraphArtifact:
    """A validated graph in the artifact folder, as the manifest records it."""

    file: str  # relative to the folder
    sha256: str
    key: str
    validation: dict


def toolkit_facts(stage_module: str) -> dict:
    """The versions and source an artifact of ``stage_module``'s stage depends on."""
    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "opset": OPSET,
        "source_sha256": source_digest(stage_module),
    }


class ExportGraph:
    """Export+validate stage. In: the models, the component, its precision and the weights'
    digest. Out: the graph (a ``GraphArtifact``). Key: those inputs, the model's config and
    ``toolkit_facts`` of this module."""

    def __init__(self, component: str, precision: str, models: Models, weights_sha256: str,
                 folder: ArtifactFolder, progress: StageLog):
        self.component, self.precision, self.models = component, precision, models
        self.weights_sha256, self.folder, self.progress = weights_sha256, folder, progress

    def key(self) -> str:
        model = getattr(self.models, COMPONENTS[self.component].needs)
        return content_key(self.component, self.precision, self.models.cut, public_config(model),
                           self.weights_sha256, toolkit_facts(__name__))

    def __call__(self) -> GraphArtifact:
        spec = COMPONENTS[self.component]
        key = self.key()
        subfolder = f"{ONNX_DIR}/{key}"  # a new graph never replaces one the current manifest names
        relative = f"{subfolder}/{graph_filename(spec, self.precision, self.models.cut)}"
        start = time.perf_counter()
        previous = self.folder.previous.get(self.component)
        if previous and previous.onnx_key == key and previous.onnx_file == relative:
            if self.folder.reusable(relative, previous.onnx_sha256):
                self.progress.finished(self.component, "onnx", start, reused=True)
                return GraphArtifact(relative, previous.onnx_sha256, key, previous.validation)
        out = self.folder.out
        report = export_and_validate(self.models, self.component, self.precision, out / subfolder)
        if report["status"] == "failed":
            raise BuildError(
                f"{self.component} ({self.precision}) failed validation against the fp32 eager model; see "
                f"{out / relative.replace('.onnx', '.validation.json')}"
            )
        validation = {k: report[k] for k in ("status", "checks", "tolerance", "reason") if k in report}
        self.progress.finished(self.component, "onnx", start, reused=False, validation=report["status"])
        return GraphArtifact(relative, sha256_file(out / relative), key, validation)

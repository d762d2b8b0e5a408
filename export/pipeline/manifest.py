"""The manifest stage: ``report.json``, then ``manifest.json`` last, which publishes the build.

Until the new manifest is in place the folder is what the old one says; afterwards the files only
the old one named are deleted. Not reused: every successful build writes both.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from engines.files import atomic_output
from engines.manifest import CheckSetRecord, ComponentRecord, Manifest
from export.onnx.components import Models

from .engine import EngineHost
from .folder import REPORT_NAME, ArtifactFolder
from .progress import StageLog
from .settings import BuildSettings
from .weights import weights_record


class WriteManifest:
    """Manifest stage. In: the component records, the gate's report, the weights' digests, the
    check set's record, the toolkit facts and the stages' log. Out: the ``Manifest``, written with
    ``report.json``."""

    def __init__(self, models: Models, settings: BuildSettings, host: EngineHost, toolkit: dict,
                 folder: ArtifactFolder, progress: StageLog):
        self.models, self.settings, self.host, self.toolkit = models, settings, host, toolkit
        self.folder, self.progress = folder, progress

    def __call__(self, records: dict[str, ComponentRecord], accuracy: dict | None, digests: dict[str, str],
                 started: float, check_set: CheckSetRecord | None = None) -> Manifest:
        settings = self.settings
        manifest = Manifest(
            target=settings.target.describe(),
            weights=weights_record(self.models, digests, settings.weights),
            build_options={
                **settings.options.to_dict(),
                "max_batch": settings.max_batch,
                "vae_cut": self.models.cut,
            },
            toolkit=self.toolkit,
            rebuild_command=settings.rebuild_command,
            components=records,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            check_set=check_set,
        )
        report = {
            "target": settings.target.describe(),
            "total_seconds": round(time.perf_counter() - started, 1),
            "engine_flavour": self.host.flavour.name,
            "tensorrt_version": self.host.trt_version,
            "engines_blocked_by": self.host.blocker,
            "stages": self.progress.stages,
            "accuracy": accuracy,
            "check_set": check_set.to_dict() if check_set is not None else None,
            "components": {
                name: {
                    "validation": r.validation,
                    "profiles": [p.to_dict() for p in r.profiles],
                    "memory_estimate_bytes": r.memory_estimate_bytes,
                    "engine": r.engine.to_dict(),
                }
                for name, r in records.items()
            },
        }
        out = self.folder.out
        with atomic_output(out / REPORT_NAME) as partial:
            partial.write_text(json.dumps(report, indent=2) + "\n")
        manifest.write(out)
        self.folder.clean_leftovers(records, check_set)  # the previous build's artifacts, and this one's staging
        return manifest

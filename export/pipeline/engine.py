"""The engine stage: one component's TensorRT engine, built from its graph for its profiles.

Reused when the graph, precision, profiles, TensorRT version, GPU, builder options and the source
of every project module this stage imports (the TensorRT build) are unchanged. Where TensorRT or
the target GPU is missing, the engine is recorded as not built, with the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from engines.manifest import EngineRecord, content_key, sha256_file
from engines.profiles import Profile
from engines.targets import Target
from engines.tensorrt_build import (
    ACTIVATION_RESIZE_FEATURE,
    BuildOptions,
    EngineBuildError,
    LocalGPU,
    build_blocker,
    build_engine,
    local_gpu,
    tensorrt_version,
)

from .errors import BuildError
from .folder import ENGINE_DIR, ArtifactFolder
from .progress import StageLog
from .sources import source_digest


@dataclass(frozen=True)
class EngineHost:
    """This machine as an engine builder: its TensorRT and GPU, and why engines for the target
    cannot be built here (None when they can)."""

    trt_version: str | None
    gpu: LocalGPU | None
    blocker: str | None

    @classmethod
    def detect(cls, target: Target) -> EngineHost:
        trt_version = tensorrt_version()
        gpu = local_gpu() if trt_version else None
        return cls(trt_version, gpu, build_blocker(target.compute_capability, trt_version, gpu))


class BuildEngine:
    """Engine stage. In: the component's graph (file and sha256), precision, profiles, the target,
    the builder options and the host. Out: the ``EngineRecord``. Key: those inputs and the source
    of this module's imports."""

    def __init__(self, component: str, precision: str, target: Target, options: BuildOptions, host: EngineHost,
                 folder: ArtifactFolder, progress: StageLog):
        self.component, self.precision, self.target, self.options = component, precision, target, options
        self.host, self.folder, self.progress = host, folder, progress

    def key(self, onnx_sha256: str, profiles: list[Profile]) -> str:
        return content_key(
            onnx_sha256, self.precision, [p.to_dict() for p in profiles], self.host.trt_version,
            "%d.%d" % self.host.gpu.compute_capability, self.options.to_dict(), ACTIVATION_RESIZE_FEATURE,
            source_digest(__name__),
        )

    def __call__(self, onnx_file: str, onnx_sha256: str, profiles: list[Profile]) -> EngineRecord:
        if self.host.blocker:
            return EngineRecord(reason=self.host.blocker)
        component, precision, trt_version, sm = self.component, self.precision, self.host.trt_version, self.target.sm
        key = self.key(onnx_sha256, profiles)
        relative = f"{ENGINE_DIR}/{component}.{precision}.{sm}.trt{trt_version}.{key}.plan"
        start = time.perf_counter()
        previous = self.folder.previous.get(component)
        if previous and previous.engine.key == key and self.folder.reusable(relative, previous.engine.sha256):
            self.progress.finished(component, "engine", start, reused=True)
            return previous.engine
        self.progress(f"  building the TensorRT engine ({len(profiles)} profiles; this can take minutes) ...")
        out = self.folder.out
        try:
            facts = build_engine(
                component,
                out / onnx_file,
                profiles,
                self.options,
                out / relative,
                out / f"timing.{sm}.trt{trt_version}.cache",
                report=lambda line: self.progress("    " + line),
            )
        except EngineBuildError as exc:
            raise BuildError(str(exc)) from exc
        self.progress.finished(component, "engine", start, reused=False)
        return EngineRecord(
            file=relative,
            sha256=sha256_file(out / relative),
            key=key,
            tensorrt_version=trt_version,
            gpu=self.host.gpu.name,
            compute_capability="%d.%d" % self.host.gpu.compute_capability,
            facts=facts,
        )

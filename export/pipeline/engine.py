"""The engine stage: one component's engine, built from its graph for its profiles.

Two flavours (engines.flavours): TensorRT 10/11 builds on the target GPU itself (through
Polygraphy); TensorRT-RTX builds ahead of time for the target's compute capability on any machine.
Reused when the graph, precision, profiles, flavour and its version, the compute capability,
builder options and the source of every project module this stage imports are unchanged. Where the
flavour cannot build here, the engine is recorded as not built, with the reason. An engine whose
own memory figures exceed the target's budget is refused before anything is published.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from engines.flavours import TENSORRT_RTX, Flavour, get_flavour
from engines.manifest import EngineRecord, content_key, sha256_file
from engines.profiles import Profile, ProfileError, check_engine_memory
from engines.targets import Target
from engines.tensorrt_build import (
    ACTIVATION_RESIZE_FEATURE,
    BuildOptions,
    EngineBuildError,
    LocalGPU,
    build_blocker,
    build_engine,
    local_gpu,
)
from engines.tensorrt_rtx_build import build_rtx_engine

from .errors import BuildError
from .folder import ENGINE_DIR, ArtifactFolder
from .progress import StageLog
from .sources import source_digest


@dataclass(frozen=True)
class EngineHost:
    """This machine as an engine builder for one flavour: its version of that flavour, its GPU,
    why engines for the target cannot be built here (None when they can), and whether the built
    engines can also run here (so the build can gate them)."""

    flavour: Flavour
    trt_version: str | None
    gpu: LocalGPU | None
    blocker: str | None

    @classmethod
    def detect(cls, target: Target, flavour: Flavour) -> EngineHost:
        trt_version = flavour.version()
        gpu = local_gpu() if trt_version else None
        if flavour is TENSORRT_RTX:
            blocker = None if trt_version else (
                f"TensorRT-RTX is not installed ({flavour.install_hint}; it builds without a GPU)")
        else:
            blocker = build_blocker(target.compute_capability, trt_version, gpu)
        return cls(flavour, trt_version, gpu, blocker)

    def runs_engines_for(self, target: Target) -> bool:
        return self.blocker is None and self.gpu is not None and self.gpu.compute_capability == target.compute_capability


class BuildEngine:
    """Engine stage. In: the component's graph (file and sha256), precision, profiles and their
    ONNX memory estimates, the target, the builder options and the host. Out: the
    ``EngineRecord``. Key: those inputs and the source of this module's imports."""

    def __init__(self, component: str, precision: str, target: Target, options: BuildOptions, host: EngineHost,
                 folder: ArtifactFolder, progress: StageLog):
        self.component, self.precision, self.target, self.options = component, precision, target, options
        self.host, self.folder, self.progress = host, folder, progress

    def key(self, onnx_sha256: str, profiles: list[Profile]) -> str:
        return content_key(
            onnx_sha256, self.precision, [p.to_dict() for p in profiles], self.host.flavour.name, self.host.trt_version,
            "%d.%d" % self.target.compute_capability, self.options.to_dict(), ACTIVATION_RESIZE_FEATURE,
            source_digest(__name__),
        )

    def __call__(self, onnx_file: str, onnx_sha256: str, profiles: list[Profile],
                 estimates: list[int] | None = None) -> EngineRecord:
        if self.host.blocker:
            return EngineRecord(reason=self.host.blocker, flavour=self.host.flavour.name)
        component, precision, version, sm = self.component, self.precision, self.host.trt_version, self.target.sm
        flavour = self.host.flavour
        key = self.key(onnx_sha256, profiles)
        relative = f"{ENGINE_DIR}/{component}.{precision}.{sm}.{flavour.name}{version}.{key}.plan"
        start = time.perf_counter()
        previous = self.folder.previous.get(component)
        if previous and previous.engine.key == key and self.folder.reusable(relative, previous.engine.sha256):
            self.progress.finished(component, "engine", start, reused=True)
            return previous.engine
        out = self.folder.out
        report = lambda line: self.progress("    " + line)  # noqa: E731
        try:
            if flavour is TENSORRT_RTX:
                self.progress(f"  building the {flavour.title} {version} engine for compute capability "
                              f"{'%d.%d' % self.target.compute_capability} ({len(profiles)} profiles) ...")
                facts = build_rtx_engine(component, out / onnx_file, profiles, self.target.compute_capability,
                                         self.options, out / relative, report=report)
            else:
                self.progress(f"  building the TensorRT engine ({len(profiles)} profiles; this can take minutes) ...")
                facts = build_engine(component, out / onnx_file, profiles, self.options, out / relative,
                                     out / f"timing.{sm}.trt{version}.cache", report=report)
        except EngineBuildError as exc:
            raise BuildError(str(exc)) from exc
        self._check_memory(profiles, facts, estimates)
        self.progress.finished(component, "engine", start, reused=False, **self._summary(facts))
        gpu = self.target.gpu if flavour is TENSORRT_RTX else self.host.gpu.name
        return EngineRecord(
            file=relative,
            sha256=sha256_file(out / relative),
            key=key,
            tensorrt_version=version,
            gpu=gpu,
            compute_capability="%d.%d" % self.target.compute_capability,
            facts=facts,
            flavour=flavour.name,
        )

    def _check_memory(self, profiles: list[Profile], facts: dict, estimates: list[int] | None) -> None:
        activations = facts.get("activation_bytes_per_profile")
        if not activations:
            return
        weights = facts.get("weights_bytes", facts.get("engine_bytes", 0))
        try:
            check_engine_memory(self.component, profiles, activations, weights, self.target.memory_budget_bytes,
                                estimates)
        except ProfileError as exc:
            raise BuildError(str(exc)) from exc

    @staticmethod
    def _summary(facts: dict) -> dict:
        """What the progress line and report say of a fresh engine: size and memory per profile."""
        summary = {"engine_mib": round(facts.get("engine_bytes", 0) / 2**20, 1)}
        if "activation_bytes_per_profile" in facts:
            summary["activation_gib"] = [round(b / 2**30, 3) for b in facts["activation_bytes_per_profile"]]
        return summary


def engine_flavour(name: str | None, target: Target) -> Flavour:
    """The flavour asked for, else the target's default; refused where it cannot serve the target."""
    flavour = get_flavour(name or target.engine_flavours[0])
    target.check_flavour(flavour.name)
    return flavour

"""The build's driver: the stages in order, into one artifact folder, as a transaction."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from calib.quantize import QUANTIZED_PRECISIONS
from engines.manifest import ComponentRecord, EngineRecord, Manifest
from engines.profiles import Profile
from export.onnx.components import COMPONENTS, Models
from runtime.upscale_pass import PASS_COMPONENTS

from .checkset import MakeCheckSet
from .cpu_graphs import QuantizeCpuGraphs
from .engine import BuildEngine, EngineHost, engine_flavour
from .errors import BuildError
from .folder import ArtifactFolder, check_own_folder
from .gate import GatePass, check_calibration_fits_engines
from .graph import ExportGraph, GraphArtifact, toolkit_facts
from .lock import BuildLock
from .manifest import WriteManifest
from .profiles import DeriveProfiles, check_range
from .progress import StageLog
from .quantize import QuantizeGraphs
from .settings import BuildSettings
from .weights import weight_digests


def check_settings(settings: BuildSettings) -> None:
    """Refuse settings no stage can satisfy, before any work."""
    check_range(settings.target)
    for component in settings.components:
        settings.target.check_precision(settings.precision_of(component))
    engine_flavour(settings.engine_flavour, settings.target)
    if settings.precision in QUANTIZED_PRECISIONS and not set(PASS_COMPONENTS) <= set(settings.components):
        raise BuildError(f"{settings.precision} builds quantize cond_encoder and unet together (the accuracy gate "
                         "runs the whole pass): add both to --components")
    if settings.cpu_int8 and not set(PASS_COMPONENTS) <= set(settings.components):
        raise BuildError("CPU int8 graphs quantize cond_encoder and unet together (the accuracy gate runs the whole "
                         "pass): add both to --components")


def build_artifacts(models: Models, settings: BuildSettings, out: Path,
                    log: Callable[[str], object] = print, wait: bool = True) -> Manifest:
    """Run every stage into ``out``; the manifest is written last, only if all stages succeeded.

    One build per folder at a time (``BuildLock``): another build's hold on ``out`` is waited for,
    or with ``wait=False`` refused (``FolderBusyError``). A failed build that made ``out`` removes it.
    A non-empty folder this toolkit did not build is refused before anything is written.
    """
    check_settings(settings)
    check_own_folder(out)
    host = EngineHost.detect(settings.target, engine_flavour(settings.engine_flavour, settings.target))
    if settings.require_engines and host.blocker:
        raise BuildError(f"--require-engines: engines cannot be built here: {host.blocker}")
    if host.runs_engines_for(settings.target):
        check_calibration_fits_engines(settings)
    digests = weight_digests(models, settings.components)
    toolkit = toolkit_facts(__name__)  # the whole build's source, for the manifest
    with BuildLock(out, wait=wait, log=log):  # held until the manifest is written and the old files gone
        return _build_locked(models, settings, out, log, host, digests, toolkit)


def _build_locked(models: Models, settings: BuildSettings, out: Path, log: Callable[[str], object],
                  host: EngineHost, digests: dict[str, str], toolkit: dict) -> Manifest:
    folder, progress = ArtifactFolder(out), StageLog(log)  # the manifest read under the lock
    folder.clean_leftovers()  # of a build that was killed
    folder.begin()  # what the folder holds now that no manifest names stays, whatever happens next
    started = time.perf_counter()
    try:
        quantized = None
        if settings.precision in QUANTIZED_PRECISIONS:
            quantized = QuantizeGraphs(models, settings.precision, settings.calibration_set(), settings.keep,
                                       settings.seed, digests["unet"], folder, progress)()
        records = {}
        for name in settings.components:
            precision = settings.precision_of(name)
            progress(f"{name} ({precision})")
            graph = quantized.graphs.get(name) if quantized else None
            graph = graph or ExportGraph(name, precision, models, digests[COMPONENTS[name].needs], folder, progress)()
            profiles, estimates = DeriveProfiles(name, models, settings, progress)(out / graph.file)
            engine = BuildEngine(name, precision, settings.target, settings.options, host, folder, progress)(
                graph.file, graph.sha256, profiles, estimates)
            records[name] = _record(name, precision, graph, profiles, estimates, engine)
        accuracy = GatePass(models, settings, host, folder, progress)(records, quantized.accuracy if quantized else None)
        if settings.cpu_int8:
            cpu_graphs = QuantizeCpuGraphs(models, settings, digests, folder, progress)()
            for name, cpu_graph in cpu_graphs.items():
                records[name].cpu_graph = cpu_graph
        check_set = MakeCheckSet(models, settings, digests, folder, progress)(records)
    except BaseException:  # Ctrl-C included: the folder stays as its manifest says
        folder.clean_leftovers()
        folder.end()
        raise
    write = WriteManifest(models, settings, host, toolkit, folder, progress)
    manifest = write(records, accuracy, digests, started, check_set)
    folder.end()  # a failure inside write leaves the record: the next build finishes the clean-up
    return manifest


def _record(component: str, precision: str, graph: GraphArtifact, profiles: list[Profile], estimates: list[int],
            engine: EngineRecord) -> ComponentRecord:
    spec = COMPONENTS[component]
    return ComponentRecord(
        name=component,
        precision=precision,
        onnx_file=graph.file,
        onnx_sha256=graph.sha256,
        onnx_key=graph.key,
        inputs=list(spec.inputs),
        outputs=list(spec.outputs),
        profiles=profiles,
        engine=engine,
        validation=graph.validation,
        memory_estimate_bytes=estimates,
    )

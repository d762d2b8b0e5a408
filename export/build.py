"""``python -m export.build``: ONNX export, validation, TensorRT engines and a manifest, for one GPU.

Stages per component: export + validate the ONNX graph (reused when the weights, the toolkit's
source and the export settings are unchanged), derive the optimisation profiles from the target's
resolution range and memory budget, and build the engine where TensorRT and the target GPU are
present (reused when the graph, profiles, TensorRT version and GPU are unchanged). Without them
the command still finishes the ONNX stages and writes a manifest with the engines marked as not
built, so the folder can be copied to the target machine and completed there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import onnx
import torch

from engines.cli import SEED_RANGE, float_in_range, int_in_range, run_cli
from engines.files import atomic_output
from engines.manifest import (
    ComponentRecord,
    EngineRecord,
    Manifest,
    ManifestError,
    content_key,
    read_manifest,
    sha256_file,
)
from engines.memory import GraphMemoryModel, MemoryEstimateError, onnxruntime_missing
from engines.profiles import (
    MAX_BATCH,
    VAE_TILE_CAP,
    Profile,
    ProfileError,
    admitting_profile,
    pass_profiles,
    tile_profile,
)
from engines.targets import PRESETS, TARGET_CHOICES, Target, TargetError, get_target
from engines.tensorrt_build import (
    ACTIVATION_RESIZE_FEATURE,
    BuildOptions,
    EngineBuildError,
    build_blocker,
    build_engine,
    local_gpu,
    tensorrt_version,
)

from calib.accuracy import AccuracyGateError, graphs_run, measure
from calib.data import (
    DEFAULT_SIDE,
    CalibrationError,
    CalibrationSet,
    add_calibration_arguments,
    calibration_from_args,
    load_calibration_set,
)
from calib.quantize import DEFAULT_KEEP, KEEP_GROUPS, QUANTIZED_PRECISIONS, QuantizationError, keep_groups, quantize_components

from .checkpoint import CheckpointError, add_weight_arguments, load_unet, load_vae, random_vae, weights_digest
from .onnx.__main__ import export_and_validate
from .onnx.components import COMPONENTS, Models
from .onnx.exporter import OPSET, graph_filename

BUILD_COMPONENTS = ("cond_encoder", "unet", "vae_decoder")
PASS_COMPONENTS = ("cond_encoder", "unet")
CPU_GATE_PRECISIONS = ("fp32", "fp16")  # what ONNX Runtime's CPU provider runs
CALIBRATION_SIZE = 4  # samples: the gate runs each through the fp32 eager model and the graphs
ONNX_DIR = "onnx"
ENGINE_DIR = "engines"
REPORT_NAME = "report.json"
_BUILD_SUFFIXES = (".onnx", ".validation.json", ".plan", ".partial", ".onnx.data")
GATED_GRAPHS = "onnx graphs on onnxruntime (cpu)"
GATED_ENGINES = "tensorrt engines (the runtime's tensorrt backend)"
PIXELS_PER_LATENT = 8
MAX_SIDE_PX = 65536  # image side: far beyond any GPU's memory, small enough to keep the maths exact
MAX_BATCH_LIMIT = 64  # profiles are searched batch by batch down from this


class BuildError(RuntimeError):
    """A stage failed; the message says which and what to do."""


@dataclass
class BuildSettings:
    target: Target
    precision: str
    vae_precision: str
    components: tuple[str, ...] = BUILD_COMPONENTS
    max_batch: int = MAX_BATCH
    options: BuildOptions = field(default_factory=BuildOptions)
    require_engines: bool = False
    rebuild_command: str = "python -m export.build"
    weights: dict = field(default_factory=dict)
    calibration: CalibrationSet | None = None  # None: the seeded fallback, made when first needed
    keep: tuple[str, ...] = DEFAULT_KEEP
    seed: int = 0  # of the accuracy gate's pass noise

    def calibration_set(self) -> CalibrationSet:
        if self.calibration is None:
            self.calibration = load_calibration_set(size=CALIBRATION_SIZE)
        return self.calibration

    def precision_of(self, component: str) -> str:
        return self.vae_precision if component == "vae_decoder" else self.precision


def _source_digest() -> str:
    """Hash of the toolkit's export and engine code: a code change invalidates cached graphs."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*root.joinpath("export").rglob("*.py"), *root.joinpath("engines").rglob("*.py")]):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _toolkit_facts() -> dict:
    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "opset": OPSET,
        "source_sha256": _source_digest(),
    }


def _latent_ranges(target: Target) -> dict[str, tuple[int, int, int]]:
    """(smallest side, largest side, grid) of each component's main input, in latent pixels.

    The first pass takes ``min_input_px`` images; the last one outputs ``max_output_px``.
    """
    lo_small = target.min_input_px // PIXELS_PER_LATENT
    hi_sample = target.max_output_px // PIXELS_PER_LATENT
    return {
        "cond_encoder": (lo_small, hi_sample // 2, COMPONENTS["cond_encoder"].grid),
        "unet": (2 * lo_small, hi_sample, COMPONENTS["unet"].grid),
        "vae_decoder": (lo_small, hi_sample, COMPONENTS["vae_decoder"].grid),
    }


def check_range(target: Target) -> None:
    """Sizes on every component's grid: inputs a multiple of 16 px, outputs of 32 px (latents
    of 2 and 4), and at least one 2x pass between them."""
    lo, hi = target.min_input_px, target.max_output_px
    in_step = PIXELS_PER_LATENT * COMPONENTS["cond_encoder"].grid
    out_step = PIXELS_PER_LATENT * COMPONENTS["unet"].grid
    if lo <= 0 or lo % in_step or hi % out_step or hi < 2 * lo:
        raise ProfileError(
            f"resolution range {lo}..{hi} px is not usable: the smallest input side must be a positive "
            f"multiple of {in_step} px, the largest output side a multiple of {out_step} px and at least "
            "twice the input"
        )


def derive_profiles(
    component: str, models: Models, memory: GraphMemoryModel, settings: BuildSettings
) -> tuple[list[Profile], list[int]]:
    """The component's profiles, and the memory estimate at each profile's maximum."""
    spec = COMPONENTS[component]
    lo, hi, grid = _latent_ranges(settings.target)[component]

    def rule(batch: int, h: int, w: int):
        return spec.input_shapes(models, batch, h, w)

    def estimate(shapes) -> int:
        return memory.estimate(dict(shapes)).total

    budget = settings.target.memory_budget_bytes
    if component == "vae_decoder":
        cap = min(VAE_TILE_CAP, hi)
        profiles = [tile_profile(rule, lo, grid, budget, estimate, cap, settings.max_batch, component)]
    else:
        profiles = pass_profiles(rule, lo, hi, grid, budget, estimate, settings.max_batch, component)
    return profiles, [estimate(p.max) for p in profiles]


def _public_config(model) -> dict:
    # diffusers adds private entries (e.g. ``_use_default_values``, built from a set) whose
    # order changes between processes; they say nothing about the model.
    config = dict(getattr(model, "config", {}) or {})
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _previous_records(out: Path) -> dict[str, ComponentRecord]:
    try:
        return read_manifest(out).components
    except ManifestError:
        return {}


def _reusable(out: Path, relative: str | None, sha256: str | None) -> bool:
    return relative is not None and (out / relative).is_file() and sha256_file(out / relative) == sha256


class _Builder:
    """Runs the stages for one artifact folder and keeps the report."""

    def __init__(self, models: Models, settings: BuildSettings, out: Path, log):
        self.models, self.settings, self.out, self.log = models, settings, out, log
        self.previous = _previous_records(out)
        self.toolkit = _toolkit_facts()
        self.trt_version = tensorrt_version()
        self.gpu = local_gpu() if self.trt_version else None
        self.blocker = build_blocker(settings.target.compute_capability, self.trt_version, self.gpu)
        self.stages: list[dict] = []
        self.quantized: dict[str, tuple[str, str, str, dict]] = {}
        self.accuracy: dict | None = None
        self.digests = {
            needs: weights_digest(getattr(models, needs))
            for needs in {COMPONENTS[c].needs for c in settings.components}
        }

    def weights_record(self) -> dict:
        """What the torch backend needs to rebuild the models: settings' source info, config, digest."""
        record = {}
        for needs, digest in self.digests.items():
            entry = dict(self.settings.weights.get(needs, {}))
            entry.update(config=_public_config(getattr(self.models, needs)), sha256=digest)
            record[needs] = entry
        return record

    def _stage(self, component: str, stage: str, start: float, reused: bool, **facts) -> None:
        seconds = round(time.perf_counter() - start, 2)
        self.stages.append(dict(component=component, stage=stage, seconds=seconds, reused=reused, **facts))
        self.log(f"  {stage}: {'reused (unchanged inputs)' if reused else f'done in {seconds:.1f} s'}")

    def quantize_stage(self) -> None:
        """INT8/FP8 graphs of both pass components, gated together on the calibration set."""
        precision, calibration = self.settings.precision, self.settings.calibration_set()
        model = self.models.unet
        key = content_key("quantized", precision, self.models.cut, _public_config(model), self.digests["unet"],
                          self.toolkit, calibration.digest(), sorted(self.settings.keep), self.settings.seed)
        start = time.perf_counter()
        self.log(f"cond_encoder + unet ({precision}): calibrating on {len(calibration.samples)} sample(s), "
                 f"{calibration.source}")
        folder = f"{ONNX_DIR}/{key}"
        files = {c: f"{folder}/{graph_filename(COMPONENTS[c], precision, self.models.cut)}" for c in PASS_COMPONENTS}
        previous = [self.previous.get(c) for c in PASS_COMPONENTS]
        if all(p and p.onnx_key == key and p.onnx_file == files[c] and _reusable(self.out, files[c], p.onnx_sha256)
               for c, p in zip(PASS_COMPONENTS, previous)):
            self.quantized = {c: (files[c], p.onnx_sha256, key, p.validation) for c, p in zip(PASS_COMPONENTS, previous)}
            self.accuracy = previous[1].validation.get("accuracy")
            self._stage("cond_encoder+unet", "quantize", start, reused=True)
            return
        try:
            results, report = quantize_components(self.models, precision, calibration, self.out / folder,
                                                  self.settings.keep, self.settings.seed, log=self.log)
        except AccuracyGateError as exc:
            raise BuildError(f"the {precision} graphs failed the accuracy gate, nothing was written: {exc} "
                             "Calibrate on real latents (--calib), keep more layers in float (--keep), or "
                             "build fp16.") from exc
        except QuantizationError as exc:
            raise BuildError(str(exc)) from exc
        self.accuracy = {"gated": GATED_GRAPHS, "calibration": calibration.describe(), **report.to_dict()}
        validation = {"status": "passed", "gate": "pass accuracy against fp32 eager", "accuracy": self.accuracy}
        self.quantized = {}
        for component, result in results.items():
            entry = dict(validation, quantization=result.to_dict())
            self.quantized[component] = (files[component], sha256_file(self.out / files[component]), key, entry)
        self._stage("cond_encoder+unet", "quantize", start, reused=False, accuracy=report.worst)

    def gate_stage(self, records: dict[str, ComponentRecord]) -> None:
        """Gate what will be published: the engines where they were built, else the float graphs
        (quantized graphs were gated before they were written). Records which in ``accuracy.gated``."""
        if not set(PASS_COMPONENTS) <= set(records):
            return
        if all(records[c].engine.built for c in PASS_COMPONENTS):
            self._gate_engines(records)
            return
        if self.accuracy is not None:
            return
        precision = self.settings.precision
        if precision not in CPU_GATE_PRECISIONS:
            self.accuracy = {"status": "not_run", "reason": f"ONNX Runtime's CPU provider cannot run {precision} graphs"}
            return
        start = time.perf_counter()
        calibration = self.settings.calibration_set()
        run = graphs_run({c: self.out / records[c].onnx_file for c in PASS_COMPONENTS})
        report = measure(run, self.models.unet, calibration, precision, decoder=self._gate_decoder(), seed=self.settings.seed)
        self.log(f"accuracy of one pass ({precision} graphs vs fp32 eager): {report.summary()}")
        self.accuracy = {"gated": GATED_GRAPHS, "calibration": calibration.describe(), **report.to_dict()}
        self._stage("cond_encoder+unet", "accuracy", start, reused=False, accuracy=report.worst)

    def _gate_decoder(self):
        return COMPONENTS["vae_decoder"].module(self.models) if self.models.vae is not None else None

    def check_calibration_fits_engines(self) -> None:
        """Engines are gated at the calibration samples' sizes, so those must lie inside the range the
        engines will be built for: checked before any engine is built."""
        if self.blocker or not set(PASS_COMPONENTS) <= set(self.settings.components):
            return
        lo, hi, _ = _latent_ranges(self.settings.target)["cond_encoder"]
        for sample in self.settings.calibration_set().samples:
            h, w = sample.shape[2:]
            if not (lo <= min(h, w) and max(h, w) <= hi):
                raise BuildError(
                    f"a calibration sample of {h}x{w} latent pixels is outside the engines' input range "
                    f"{lo}..{hi} ({lo * PIXELS_PER_LATENT}..{hi * PIXELS_PER_LATENT} px): the engines are gated on "
                    "these samples. Use latents inside the range (--calib) or --calib-side"
                )

    def _gate_engines(self, records: dict[str, ComponentRecord]) -> None:
        """Run the calibration pass through the engines (the runtime's TensorRT backend); on any
        failure delete what this build wrote that the previous manifest does not name."""
        from runtime.backends import BackendUnavailable
        from runtime.tensorrt_backend import TensorRTBackend

        precision, calibration = self.settings.precision, self.settings.calibration_set()
        start = time.perf_counter()
        engines = {c: (self.out / records[c].engine.file, records[c].profiles) for c in PASS_COMPONENTS}
        try:
            backend = TensorRTBackend(engines, torch.device("cuda", 0))
            try:
                report = measure(backend.run, self.models.unet, calibration, precision, decoder=self._gate_decoder(),
                                 seed=self.settings.seed, device=backend.device)
            finally:
                backend.close()
        except (BackendUnavailable, RuntimeError, ValueError, TypeError) as exc:
            removed = _discard_new(self.out, self.previous, records)
            raise BuildError(f"the {precision} TensorRT engines could not be gated ({exc}); {removed}") from exc
        self.log(f"accuracy of one pass ({precision} TensorRT engines vs fp32 eager): {report.summary()}")
        graphs = self.accuracy if self.accuracy and "passed" in self.accuracy else None
        self.accuracy = {"gated": GATED_ENGINES, "calibration": calibration.describe(), **report.to_dict()}
        if graphs is not None:
            self.accuracy["graphs"] = graphs
        self._stage("cond_encoder+unet", "engine accuracy", start, reused=False, accuracy=report.worst)
        if not report.passed:
            removed = _discard_new(self.out, self.previous, records)
            raise BuildError(
                f"the {precision} TensorRT engines failed the accuracy gate: {report.summary()}. {removed} "
                "Build another precision, or keep more layers in float (--keep)."
            )

    def onnx_stage(self, component: str) -> tuple[str, str, str, dict]:
        if component in self.quantized:
            return self.quantized[component]
        spec = COMPONENTS[component]
        precision = self.settings.precision_of(component)
        model = getattr(self.models, spec.needs)
        key = content_key(component, precision, self.models.cut, _public_config(model), self.digests[spec.needs], self.toolkit)
        folder = f"{ONNX_DIR}/{key}"  # a new graph never replaces one the current manifest names
        relative = f"{folder}/{graph_filename(spec, precision, self.models.cut)}"
        start = time.perf_counter()
        previous = self.previous.get(component)
        if previous and previous.onnx_key == key and previous.onnx_file == relative:
            if _reusable(self.out, relative, previous.onnx_sha256):
                self._stage(component, "onnx", start, reused=True)
                return relative, previous.onnx_sha256, key, previous.validation
        report = export_and_validate(self.models, component, precision, self.out / folder)
        if report["status"] == "failed":
            raise BuildError(
                f"{component} ({precision}) failed validation against the fp32 eager model; see "
                f"{self.out / relative.replace('.onnx', '.validation.json')}"
            )
        validation = {k: report[k] for k in ("status", "checks", "tolerance", "reason") if k in report}
        self._stage(component, "onnx", start, reused=False, validation=report["status"])
        return relative, sha256_file(self.out / relative), key, validation

    def engine_stage(self, component: str, onnx_file: str, onnx_sha: str, profiles: list[Profile]) -> EngineRecord:
        if self.blocker:
            return EngineRecord(reason=self.blocker)
        target, precision = self.settings.target, self.settings.precision_of(component)
        capability = "%d.%d" % self.gpu.compute_capability
        key = content_key(
            onnx_sha, precision, [p.to_dict() for p in profiles], self.trt_version, capability,
            self.settings.options.to_dict(), ACTIVATION_RESIZE_FEATURE,
        )
        relative = f"{ENGINE_DIR}/{component}.{precision}.{target.sm}.trt{self.trt_version}.{key}.plan"
        start = time.perf_counter()
        previous = self.previous.get(component)
        if previous and previous.engine.key == key and _reusable(self.out, relative, previous.engine.sha256):
            self._stage(component, "engine", start, reused=True)
            return previous.engine
        self.log(f"  building the TensorRT engine ({len(profiles)} profiles; this can take minutes) ...")
        try:
            facts = build_engine(
                component,
                self.out / onnx_file,
                profiles,
                self.settings.options,
                self.out / relative,
                self.out / f"timing.{target.sm}.trt{self.trt_version}.cache",
                report=lambda line: self.log("    " + line),
            )
        except EngineBuildError as exc:
            raise BuildError(str(exc)) from exc
        self._stage(component, "engine", start, reused=False)
        return EngineRecord(
            file=relative,
            sha256=sha256_file(self.out / relative),
            key=key,
            tensorrt_version=self.trt_version,
            gpu=self.gpu.name,
            compute_capability=capability,
            facts=facts,
        )

    def component(self, component: str) -> ComponentRecord:
        spec = COMPONENTS[component]
        precision = self.settings.precision_of(component)
        self.log(f"{component} ({precision})")
        onnx_file, onnx_sha, onnx_key, validation = self.onnx_stage(component)
        start = time.perf_counter()
        profiles, estimates = derive_profiles(component, self.models, GraphMemoryModel(self.out / onnx_file), self.settings)
        self._stage(component, "profiles", start, reused=False, count=len(profiles))
        for profile, estimate in zip(profiles, estimates):
            self.log(f"    {format_profile(profile, spec.inputs[0])}, estimate {estimate / 2**30:.2f} GiB")
        engine = self.engine_stage(component, onnx_file, onnx_sha, profiles)
        return ComponentRecord(
            name=component,
            precision=precision,
            onnx_file=onnx_file,
            onnx_sha256=onnx_sha,
            onnx_key=onnx_key,
            inputs=list(spec.inputs),
            outputs=list(spec.outputs),
            profiles=profiles,
            engine=engine,
            validation=validation,
            memory_estimate_bytes=estimates,
        )


def format_profile(profile: Profile, main_input: str) -> str:
    def side(shape):
        return f"{shape[2]}x{shape[3]}"

    lo, opt, hi = profile.min[main_input], profile.opt[main_input], profile.max[main_input]
    return f"{profile.name}: {main_input} {side(lo)} .. {side(hi)} (opt {side(opt)}), batch 1..{hi[0]}"


def _delete_artifacts(out: Path, records: dict[str, ComponentRecord], keep: set[str]) -> list[str]:
    """Delete the graphs (with their validation files) and engines ``records`` name, except ``keep``."""
    deleted = []
    for record in records.values():
        for relative in (record.onnx_file, record.engine.file):
            if relative and relative not in keep and (out / relative).exists():
                (out / relative).unlink()
                deleted.append(relative)
                if relative.endswith(".onnx"):
                    (out / relative.replace(".onnx", ".validation.json")).unlink(missing_ok=True)
    return deleted


def _named(records: dict[str, ComponentRecord]) -> set[str]:
    return {f for r in records.values() for f in (r.onnx_file, r.engine.file) if f}


def _remove_empty_folders(root: Path) -> None:
    for folder in sorted((p for p in root.glob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def _clean_leftovers(out: Path, current: dict[str, ComponentRecord]) -> None:
    """Delete what a failed or killed build left in ``onnx/`` and ``engines/``: staging folders,
    partial files, and graphs, validation reports and engines the current manifest does not name.
    Only this toolkit's kinds of files are touched."""
    named = _named(current)
    keep = named | {f.replace(".onnx", ".validation.json") for f in named if f.endswith(".onnx")}
    for sub in (ONNX_DIR, ENGINE_DIR):
        root = out / sub
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*"), reverse=True):  # children before their folders
            relative = path.relative_to(out).as_posix()
            if path.is_dir() and path.name.startswith(".staging"):
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_file() and relative not in keep and path.name.endswith(_BUILD_SUFFIXES):
                path.unlink(missing_ok=True)
        _remove_empty_folders(root)


def _discard_new(out: Path, old: dict[str, ComponentRecord], new: dict[str, ComponentRecord]) -> str:
    """After a failed build: delete what it wrote that the previous manifest does not name.
    Returns a sentence saying so, for the error message."""
    deleted = _delete_artifacts(out, new, _named(old))
    kept = "the folder keeps its previous manifest" if old else "no manifest was written"
    return f"Deleted {', '.join(deleted)}; {kept}." if deleted else f"Nothing new was kept; {kept}."


def build_artifacts(models: Models, settings: BuildSettings, out: Path, log=print) -> Manifest:
    """Run every stage into ``out``; the manifest is written last, only if all stages succeeded."""
    check_range(settings.target)
    for component in settings.components:
        settings.target.check_precision(settings.precision_of(component))
    if settings.precision in QUANTIZED_PRECISIONS and not set(PASS_COMPONENTS) <= set(settings.components):
        raise BuildError(f"{settings.precision} builds quantize cond_encoder and unet together (the accuracy gate "
                         "runs the whole pass): add both to --components")
    builder = _Builder(models, settings, out, log)
    if settings.require_engines and builder.blocker:
        raise BuildError(f"--require-engines: engines cannot be built here: {builder.blocker}")
    builder.check_calibration_fits_engines()
    out.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(out, builder.previous)  # of a build that was killed
    started = time.perf_counter()
    try:
        if settings.precision in QUANTIZED_PRECISIONS:
            builder.quantize_stage()
        records = {name: builder.component(name) for name in settings.components}
        builder.gate_stage(records)
    except BaseException:  # Ctrl-C included: the folder stays as its manifest says
        _clean_leftovers(out, builder.previous)
        raise
    manifest = Manifest(
        target=settings.target.describe(),
        weights=builder.weights_record(),
        build_options={
            **settings.options.to_dict(),
            "max_batch": settings.max_batch,
            "vae_cut": models.cut,
        },
        toolkit=builder.toolkit,
        rebuild_command=settings.rebuild_command,
        components=records,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    report = {
        "target": settings.target.describe(),
        "total_seconds": round(time.perf_counter() - started, 1),
        "tensorrt_version": builder.trt_version,
        "engines_blocked_by": builder.blocker,
        "stages": builder.stages,
        "accuracy": builder.accuracy,
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
    with atomic_output(out / REPORT_NAME) as partial:
        partial.write_text(json.dumps(report, indent=2) + "\n")
    manifest.write(out)
    _clean_leftovers(out, records)  # the previous build's artifacts, and this one's staging
    return manifest


def check_output_folder(out: Path) -> None:
    """Refuse an artifact folder that cannot be written, before minutes of work are spent."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} is a file, not a folder; name a folder for the artifacts")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise BuildError(f"--out {out} cannot be written ({exc.strerror or exc}); name a writable folder") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.build",
        description=(
            "Build a Flow Upscaler artifact folder for one GPU: ONNX graphs validated against the fp32 "
            "eager model, TensorRT engines with per-octave optimisation profiles (when TensorRT and the "
            "target GPU are present), manifest.json and report.json. Unchanged inputs reuse earlier "
            "artifacts. Exit codes: 0 done (engines may be marked not built), 1 a stage failed, 2 bad usage."
        ),
    )
    parser.add_argument(
        "--target",
        required=True,
        choices=TARGET_CHOICES,
        help="GPU preset (%s) or auto (the local GPU)" % ", ".join(PRESETS),
    )
    add_weight_arguments(parser, with_vae=True)
    parser.add_argument(
        "--precision",
        choices=("fp16", "bf16", *QUANTIZED_PRECISIONS),
        help="cond_encoder and unet precision (default: the target's, fp16). int8 and fp8 (compute capability "
        ">= 8.9) quantize on the calibration set and must pass the accuracy gate, or nothing is written",
    )
    parser.add_argument(
        "--vae-precision",
        choices=("fp32", "fp16", "bf16"),
        help="VAE decoder precision (default: bf16 where supported, else fp32; fp16 can overflow)",
    )
    parser.add_argument("--out", type=Path, help="artifact folder (default: build/<target>)")
    parser.add_argument(
        "--components", nargs="+", choices=BUILD_COMPONENTS, default=list(BUILD_COMPONENTS), help="what to build"
    )
    parser.add_argument("--min-px", type=int_in_range(16, MAX_SIDE_PX),
                        help=f"smallest input image side in pixels, a multiple of 16 from 16 to {MAX_SIDE_PX} (default: 512)")
    parser.add_argument("--max-px", type=int_in_range(32, MAX_SIDE_PX),
                        help=f"largest output image side in pixels, a multiple of 32 from 32 to {MAX_SIDE_PX} "
                             "(default: 8192)")
    parser.add_argument("--max-batch", type=int_in_range(1, MAX_BATCH_LIMIT), default=MAX_BATCH,
                        help=f"batch limit of every profile, 1..{MAX_BATCH_LIMIT} (default: %(default)s)")
    parser.add_argument("--opt-level", type=int, default=3, choices=range(6), help="TensorRT builder optimisation level")
    parser.add_argument("--workspace-gib", type=float_in_range(0, 1024),
                        help="TensorRT workspace memory limit in GiB, more than 0 up to 1024 (default: TensorRT's)")
    parser.add_argument("--tf32", action="store_true",
                        help="let TensorRT run fp32 layers (an fp32 VAE, fp8 graphs' float parts) in TF32: faster, "
                             "about fp16's precision. Default: true fp32, recorded in the manifest")
    parser.add_argument(
        "--require-engines", action="store_true", help="fail unless TensorRT engines can be built on this machine"
    )
    parser.add_argument("--seed", type=int_in_range(*SEED_RANGE), default=0,
                        help=f"seed of --random-weights and of the gate's pass noise, 0..{SEED_RANGE[1]}")
    parser.add_argument("--keep", type=keep_groups, default=list(DEFAULT_KEEP),
                        help=f"int8/fp8: node groups kept in float, comma-separated {','.join(KEEP_GROUPS)}, or none "
                             "(default: all)")
    add_calibration_arguments(parser, default_size=CALIBRATION_SIZE)
    return parser


def _rebuild_command(args: argparse.Namespace, target: Target, out: Path) -> str:
    words = ["python", "-m", "export.build", "--target", target.name if target.name in PRESETS else "auto"]
    if args.random_weights:
        words += ["--random-weights", "--seed", str(args.seed)]
    elif args.checkpoint:
        words += ["--checkpoint", args.checkpoint]
    if args.vae and not args.random_weights:
        words += ["--vae", args.vae]
    words += ["--out", str(out), "--components", *args.components]
    for flag, value in (("--precision", args.precision), ("--vae-precision", args.vae_precision),
                        ("--min-px", args.min_px), ("--max-px", args.max_px),
                        ("--workspace-gib", args.workspace_gib)):
        if value is not None:
            words += [flag, str(value)]
    if args.max_batch != MAX_BATCH:
        words += ["--max-batch", str(args.max_batch)]
    if args.calib:  # the same calibration, so the quantized graphs and their gate are reused
        words += ["--calib", *map(str, args.calib)]
    for flag, value, default in (("--calib-size", args.calib_size, CALIBRATION_SIZE), ("--calib-seed", args.calib_seed, 0),
                                 ("--calib-side", args.calib_side, None)):
        if value != default:
            words += [flag, str(value)]
    if sorted(args.keep) != sorted(DEFAULT_KEEP):
        words += ["--keep", ",".join(args.keep) or "none"]
    if args.opt_level != 3:
        words += ["--opt-level", str(args.opt_level)]
    if args.tf32:
        words.append("--tf32")
    return shlex.join(words)


def _load_models(args: argparse.Namespace, components: tuple[str, ...]) -> tuple[Models, dict]:
    """The models, and where their weights came from (for the manifest and the torch backend)."""
    models, sources = Models(), {}
    random = {"source": "random", "seed": args.seed}
    if {"cond_encoder", "unet"} & set(components):
        models.unet = load_unet(args.checkpoint, random_weights=args.random_weights, seed=args.seed)
        sources["unet"] = random if args.random_weights else {"source": args.checkpoint}
    if "vae_decoder" in components:
        models.vae = load_vae(args.vae, random_weights=args.random_weights, seed=args.seed)
        sources["vae"] = random if args.random_weights else {"source": args.vae}
    return models, sources


def models_from_weights_record(weights: dict, components: list[str]) -> Models:
    """Rebuild the fp32 eager models a manifest's graphs were exported from, and prove it.

    Raises ValueError when the record lacks a source or the loaded weights' digest differs.
    """
    models = Models()
    for needs in sorted({COMPONENTS[c].needs for c in components}):
        entry = weights.get(needs)
        if not entry or "source" not in entry:
            raise ValueError(
                f"the manifest does not say where the {needs} weights came from (artifacts built through "
                "the Python API without a source); use the onnxruntime or tensorrt backend"
            )
        random, source, config = entry["source"] == "random", entry["source"], entry.get("config", {})
        if needs == "unet":
            model = load_unet(None if random else source, random_weights=random, seed=entry.get("seed", 0), **config)
        else:
            model = random_vae(entry.get("seed", 0), **config) if random else load_vae(source)
        if weights_digest(model) != entry["sha256"]:
            raise ValueError(
                f"the {needs} weights from {source!r} differ from the ones the artifacts were built from "
                f"(sha256 {entry['sha256'][:12]}...)"
            )
        setattr(models, needs, model)
    return models


def _summary(manifest: Manifest, out: Path) -> str:
    lines = [f"wrote {out / 'manifest.json'}"]
    unbuilt = [n for n, r in manifest.components.items() if not r.engine.built]
    if unbuilt:
        reason = manifest.components[unbuilt[0]].engine.reason
        lines += [
            f"engines not built ({reason}).",
            f"To finish, copy {out} to a machine with a {manifest.target['gpu']} and TensorRT and run there:",
            f"  {manifest.rebuild_command}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        target = get_target(args.target).with_range(args.min_px, args.max_px)
        check_range(target)
    except (TargetError, ProfileError) as exc:
        parser.error(str(exc))
    precision = args.precision or target.default_precision
    vae_precision = args.vae_precision or target.vae_precision
    try:
        target.check_precision(precision)
        target.check_precision(vae_precision)
    except TargetError as exc:
        parser.error(str(exc))
    missing = onnxruntime_missing()
    if missing:  # validation, quantization and the memory estimate all run on it
        print(f"error: {missing}", file=sys.stderr)
        return 1
    out = args.out or Path("build") / target.name
    components = tuple(dict.fromkeys(args.components))
    settings = BuildSettings(
        target=target,
        precision=precision,
        vae_precision=vae_precision,
        components=components,
        max_batch=args.max_batch,
        options=BuildOptions(
            optimization_level=args.opt_level,
            workspace_bytes=int(args.workspace_gib * 2**30) if args.workspace_gib else None,
            tf32=args.tf32,
        ),
        require_engines=args.require_engines,
        rebuild_command=_rebuild_command(args, target, out),
        keep=tuple(args.keep),
        seed=args.seed,
    )
    try:
        check_output_folder(out)
        blocker = build_blocker(target.compute_capability, tensorrt_version(), local_gpu())
        if args.require_engines and blocker:
            raise BuildError(f"--require-engines: engines cannot be built here: {blocker}")
        print(f"target {target.name}: {target.gpu}, compute capability "
              f"{target.compute_capability[0]}.{target.compute_capability[1]}, budget "
              f"{target.memory_budget_bytes / 2**30:.1f} GiB; out {out}", flush=True)
        if not blocker and args.calib_side is None:
            # Engines are gated inside their own range (ONNX Runtime takes any size): the fallback
            # samples at the smallest input, or the largest if the default side is beyond it.
            lo, hi, _ = _latent_ranges(target)["cond_encoder"]
            args.calib_side = min(max(DEFAULT_SIDE, lo), hi)
        settings.calibration = calibration_from_args(args)
        models, settings.weights = _load_models(args, components)
        manifest = build_artifacts(models, settings, out, log=lambda line: print(line, flush=True))
    except (CheckpointError, BuildError, ProfileError, TargetError, MemoryEstimateError, CalibrationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(_summary(manifest, out))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

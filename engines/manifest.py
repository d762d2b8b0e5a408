"""``manifest.json``: what an artifact folder holds, what it was built from and for which GPU.

The runtime trusts an artifact folder only through this file: every file it names is checked
against its sha256, and engines against the TensorRT version and compute capability they were
built with, so a stale or foreign engine is refused with a message instead of failing inside
TensorRT.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import ClassVar

from .errors import FlowUpscalerError
from .files import atomic_output
from .flavours import FLAVOURS
from .profiles import Profile

SCHEMA = "flow-upscaler-artifacts"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestError(FlowUpscalerError, RuntimeError):
    """An artifact folder that cannot be used as it is; the message says how to rebuild."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_key(*parts: object) -> str:
    """A short hash of JSON-serialisable parts: the cache key of a derived artifact."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class EngineRecord:
    """A built engine, or the reason it was not built (``file`` is None then)."""

    file: str | None = None
    sha256: str | None = None
    key: str | None = None
    tensorrt_version: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    reason: str | None = None
    facts: dict = field(default_factory=dict)
    flavour: str = "tensorrt"  # engines.flavours: which TensorRT built it (and alone can run it)

    @property
    def built(self) -> bool:
        return self.file is not None

    def to_dict(self) -> dict:
        if not self.built:
            return {"built": False, "reason": self.reason}
        return {
            "built": True,
            "flavour": self.flavour,
            "file": self.file,
            "sha256": self.sha256,
            "key": self.key,
            "tensorrt_version": self.tensorrt_version,
            "gpu": self.gpu,
            "compute_capability": self.compute_capability,
            **self.facts,
        }

    @classmethod
    def from_dict(cls, data: dict) -> EngineRecord:
        if not data.get("built"):
            return cls(reason=data.get("reason"))
        known = {"built", "flavour", "file", "sha256", "key", "tensorrt_version", "gpu", "compute_capability"}
        return cls(
            file=data["file"],
            sha256=data["sha256"],
            key=data.get("key"),
            tensorrt_version=data["tensorrt_version"],
            gpu=data.get("gpu"),
            compute_capability=data["compute_capability"],
            facts={k: v for k, v in data.items() if k not in known},
            flavour=data.get("flavour", "tensorrt"),  # manifests before TensorRT-RTX
        )


CPU_INT8 = "cpu-int8"  # the CPU graphs' encoding (calib.quantize.ENCODINGS)


@dataclass
class CpuGraphRecord:
    """A second graph of a pass component, made for ONNX Runtime's CPU provider (``precision``: the
    encoding, e.g. cpu-int8: int8 with uint8 activations and an fp32 float part), gated with the
    whole pass at build time; or why it was not made (``file`` is None then). ``key``: what it was
    made from, kept for a failure too, so that an unchanged rebuild does not try again."""

    file: str | None = None
    sha256: str | None = None
    key: str | None = None
    precision: str | None = None
    reason: str | None = None
    validation: dict = field(default_factory=dict)

    @property
    def built(self) -> bool:
        return self.file is not None

    def to_dict(self) -> dict:
        if not self.built:
            return {"built": False, "key": self.key, "precision": self.precision, "reason": self.reason}
        return {"built": True, "precision": self.precision, "file": self.file, "sha256": self.sha256, "key": self.key,
                "validation": self.validation}

    @classmethod
    def from_dict(cls, data: dict) -> CpuGraphRecord:
        if not data.get("built"):
            return cls(key=data.get("key"), precision=data.get("precision"), reason=data.get("reason"))
        return cls(file=data["file"], sha256=data["sha256"], key=data.get("key"), precision=data["precision"],
                   validation=data.get("validation", {}))


@dataclass
class ComponentRecord:
    name: str
    precision: str
    onnx_file: str
    onnx_sha256: str
    onnx_key: str
    inputs: list[str]
    outputs: list[str]
    profiles: list[Profile]
    engine: EngineRecord
    validation: dict = field(default_factory=dict)
    memory_estimate_bytes: list[int] = field(default_factory=list)
    cpu_graph: CpuGraphRecord | None = None  # pass components of builds that made one (export.build --cpu-int8)

    def to_dict(self) -> dict:
        return {
            "precision": self.precision,
            "onnx": {"file": self.onnx_file, "sha256": self.onnx_sha256, "key": self.onnx_key},
            "inputs": self.inputs,
            "outputs": self.outputs,
            "profiles": [p.to_dict() for p in self.profiles],
            "memory_estimate_bytes": self.memory_estimate_bytes,
            "engine": self.engine.to_dict(),
            "validation": self.validation,
            **({"cpu_graph": self.cpu_graph.to_dict()} if self.cpu_graph is not None else {}),
        }

    @classmethod
    def from_dict(cls, name: str, data: dict) -> ComponentRecord:
        return cls(
            name=name,
            precision=data["precision"],
            onnx_file=data["onnx"]["file"],
            onnx_sha256=data["onnx"]["sha256"],
            onnx_key=data["onnx"]["key"],
            inputs=list(data["inputs"]),
            outputs=list(data["outputs"]),
            profiles=[Profile.from_dict(p) for p in data["profiles"]],
            engine=EngineRecord.from_dict(data["engine"]),
            validation=data.get("validation", {}),
            memory_estimate_bytes=list(data.get("memory_estimate_bytes", [])),
            cpu_graph=CpuGraphRecord.from_dict(data["cpu_graph"]) if data.get("cpu_graph") is not None else None,
        )


@dataclass
class CheckSetRecord:
    """The check set (``export.pipeline.checkset``): inputs and fp32 eager outputs, stored at build
    time so that engines that never ran can be checked where they run (``runtime.check``).

    ``components``: per component, its precision, output names, ``cases`` (each stored shape: its
    name in the file, every input's shape, the profile ends it is, the profile it runs on, and
    ``reduced`` where it stands in for a profile's largest shape over the budget), ``not_stored``
    (profiles whose largest shape has no case, with why) and per output the limits
    ``{"rel_l2": ..., "max_abs": ...}``. ``whole_pass``: one 2x pass (its ``latents_small``
    shape, precision, seed and limits), empty without both pass components. The limits are
    absolute numbers: the runtime compares, it derives nothing. ``VERSION``: the layout written
    now (``version`` in ``facts``); a runtime reads no other.
    """

    VERSION: ClassVar[int] = 2  # 2: every profile's smallest and largest shapes; 1: the first profile's smallest

    file: str
    sha256: str
    key: str
    components: dict[str, dict] = field(default_factory=dict)
    whole_pass: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)

    @property
    def version(self) -> object:
        """The layout the build wrote (None if it wrote none)."""
        return self.facts.get("version")

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "key": self.key, "components": self.components,
                "pass": self.whole_pass, **self.facts}

    @classmethod
    def from_dict(cls, data: dict) -> CheckSetRecord:
        known = {"file", "sha256", "key", "components", "pass"}
        return cls(file=data["file"], sha256=data["sha256"], key=data["key"],
                   components=dict(data.get("components", {})), whole_pass=dict(data.get("pass", {})),
                   facts={k: v for k, v in data.items() if k not in known})


@dataclass
class Manifest:
    target: dict
    weights: dict
    build_options: dict
    toolkit: dict
    rebuild_command: str
    components: dict[str, ComponentRecord]
    created: str = ""
    check_set: CheckSetRecord | None = None  # absent in folders built before check sets

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created": self.created,
            "rebuild_command": self.rebuild_command,
            "target": self.target,
            "weights": self.weights,
            "toolkit": self.toolkit,
            "build_options": self.build_options,
            "components": {name: c.to_dict() for name, c in self.components.items()},
            **({"check_set": self.check_set.to_dict()} if self.check_set is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        return cls(
            target=data["target"],
            weights=data["weights"],
            build_options=data["build_options"],
            toolkit=data["toolkit"],
            rebuild_command=data["rebuild_command"],
            components={n: ComponentRecord.from_dict(n, c) for n, c in data["components"].items()},
            created=data.get("created", ""),
            check_set=CheckSetRecord.from_dict(data["check_set"]) if data.get("check_set") is not None else None,
        )

    def write(self, folder: Path) -> Path:
        path = folder / MANIFEST_NAME
        with atomic_output(path) as partial:
            partial.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _shape_problem(data: object) -> str | None:
    """The first place where parsed manifest JSON differs from the shape ``Manifest.to_dict`` writes
    (``None`` when it matches), so a hand-edited or truncated file is refused with where it is wrong
    instead of failing deep inside the runtime."""

    def kind(value: object) -> str:
        return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(value), "a number"
        )

    def expect(value: object, types: type | tuple[type, ...], where: str, what: str) -> str | None:
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            return f"{where} must be {what}, got {kind(value)}"
        return None if isinstance(value, types) else f"{where} must be {what}, got {kind(value)}"

    def fields(obj: dict, where: str, spec: dict[str, tuple[type | tuple[type, ...], str]]) -> str | None:
        for key, (types, what) in spec.items():
            if key not in obj:
                return f"is missing the field {where}{key}"
            if problem := expect(obj[key], types, f"{where}{key}", what):
                return problem
        return None

    if not isinstance(data, dict):
        return f"holds {kind(data)}, not a JSON object"
    if problem := _path_problem(data):
        return problem
    top = {"rebuild_command": (str, "a string"), "target": (dict, "an object"), "weights": (dict, "an object"),
           "build_options": (dict, "an object"), "toolkit": (dict, "an object"), "components": (dict, "an object")}
    if problem := fields(data, "", top):
        return problem
    if not data["components"]:
        return "names no components"
    if data.get("check_set") is not None:
        check_set = data["check_set"]
        if problem := expect(check_set, dict, "check_set", "an object"):
            return problem
        spec = {"file": (str, "a string"), "sha256": (str, "a string"), "key": (str, "a string"),
                "components": (dict, "an object"), "pass": (dict, "an object")}
        if problem := fields(check_set, "check_set.", spec):
            return problem
    for name, component in data["components"].items():
        where = f"components.{name}."
        if problem := expect(component, dict, where[:-1], "an object"):
            return problem
        spec = {"precision": (str, "a string"), "onnx": (dict, "an object"), "inputs": (list, "a list of names"),
                "outputs": (list, "a list of names"), "profiles": (list, "a list of profiles"),
                "engine": (dict, "an object")}
        if problem := fields(component, where, spec):
            return problem
        onnx = {"file": (str, "a string"), "sha256": (str, "a string"), "key": (str, "a string")}
        if problem := fields(component["onnx"], f"{where}onnx.", onnx):
            return problem
        for key in ("inputs", "outputs"):
            if not component[key] or not all(isinstance(n, str) for n in component[key]):
                return f"{where}{key} must be a non-empty list of names"
        if not component["profiles"]:
            return f"{where}profiles is empty"
        for i, profile in enumerate(component["profiles"]):
            at = f"{where}profiles[{i}]"
            if problem := expect(profile, dict, at, "an object"):
                return problem
            if problem := fields(profile, f"{at}.", {"name": (str, "a string"), "inputs": (dict, "an object")}):
                return problem
            if set(profile["inputs"]) != set(component["inputs"]):
                return (f"{at}.inputs names {sorted(profile['inputs'])}, but the component's inputs are "
                        f"{sorted(component['inputs'])}")
            for input_name, box in profile["inputs"].items():
                if problem := expect(box, dict, f"{at}.inputs.{input_name}", "an object"):
                    return problem
                ranks = set()
                for key in ("min", "opt", "max"):
                    shape = box.get(key)
                    if shape is None:
                        return f"is missing the field {at}.inputs.{input_name}.{key}"
                    if not isinstance(shape, list) or not shape or not all(
                        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
                    ):
                        return f"{at}.inputs.{input_name}.{key} must be a shape (a list of sizes), got {shape!r:.60}"
                    ranks.add(len(shape))
                if len(ranks) != 1:
                    return f"{at}.inputs.{input_name} has min, opt and max shapes of different ranks"
        engine = component["engine"]
        if problem := expect(engine.get("built", False), bool, f"{where}engine.built", "true or false"):
            return problem
        if engine.get("built"):
            for key in ("file", "sha256", "tensorrt_version", "compute_capability"):
                if key not in engine:
                    return f"is missing the field {where}engine.{key}"
            if problem := fields(engine, f"{where}engine.", {"file": (str, "a string"), "sha256": (str, "a string")}):
                return problem
        if component.get("cpu_graph") is not None:
            cpu_graph = component["cpu_graph"]
            if problem := expect(cpu_graph, dict, f"{where}cpu_graph", "an object"):
                return problem
            if problem := expect(cpu_graph.get("built", False), bool, f"{where}cpu_graph.built", "true or false"):
                return problem
            if cpu_graph.get("built"):
                spec = {"file": (str, "a string"), "sha256": (str, "a string"), "precision": (str, "a string"),
                        "validation": (dict, "an object")}
            else:
                spec = {"reason": (str, "a string")}
            if problem := fields(cpu_graph, f"{where}cpu_graph.", spec):
                return problem
    return None


def _path_problem(data: dict) -> str | None:
    """A file the manifest names outside its folder (``../x.onnx``, an absolute path): the runtime
    opens and hashes only what the folder holds."""
    check_set = data.get("check_set")
    named = [("check_set.file", check_set.get("file"))] if isinstance(check_set, dict) else []
    components = data.get("components")
    for name, component in (components.items() if isinstance(components, dict) else ()):
        for key in ("onnx", "engine", "cpu_graph"):
            record = component.get(key) if isinstance(component, dict) else None
            if isinstance(record, dict):
                named.append((f"components.{name}.{key}.file", record.get("file")))
    for where, relative in named:
        if not isinstance(relative, str):
            continue  # the shape check names it
        parts = PurePosixPath(relative).parts
        if not relative or "\\" in relative or PurePosixPath(relative).is_absolute() or ".." in parts \
                or (parts and ":" in parts[0]):
            return (f"names {where} {relative!r:.80}, which is not a path inside the folder (a relative path "
                    "with no '..', as the build writes)")
    return None


def read_manifest(folder: Path) -> Manifest:
    """Parse ``folder/manifest.json`` without checking the files it names.

    Anything but the shape this toolkit writes (another schema, a list, a component or profile
    missing a field, a field of the wrong type) is a ``ManifestError`` that names the rebuild
    command; nothing else escapes.
    """
    path = Path(folder) / MANIFEST_NAME
    default_rebuild = f"python -m export.build --target <gpu> --out {folder}"
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}; build it with `{default_rebuild}`")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ManifestError(f"{path} is not readable JSON ({exc}); rebuild the folder with `{default_rebuild}`") from exc
    rebuild = default_rebuild
    if isinstance(data, dict) and isinstance(data.get("rebuild_command"), str) and data["rebuild_command"].strip():
        rebuild = data["rebuild_command"]
    if not isinstance(data, dict):
        raise ManifestError(f"{path} {_shape_problem(data)}; rebuild the folder with: {rebuild}")
    if data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(
            f"{path} is schema {data.get('schema')!r} version {data.get('schema_version')!r}, this toolkit reads "
            f"{SCHEMA!r} version {SCHEMA_VERSION}; rebuild with: {rebuild}"
        )
    problem = _shape_problem(data)
    if problem is not None:
        if not problem.startswith(("is missing", "holds", "names")):
            problem = f"is malformed: {problem}"
        raise ManifestError(f"{path} {problem}; rebuild with: {rebuild}")
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # a shape the check above missed
        raise ManifestError(f"{path} is malformed ({type(exc).__name__}: {exc}); rebuild with: {rebuild}") from exc


def _check_file(folder: Path, relative: str, expected: str, what: str, rebuild: str) -> None:
    path = folder / relative
    if not path.is_file():
        raise ManifestError(f"{what} {relative} named in the manifest is missing from {folder}; rebuild with: {rebuild}")
    actual = sha256_file(path)
    if actual != expected:
        raise ManifestError(
            f"{what} {relative} does not match the manifest (sha256 {actual[:12]}..., expected {expected[:12]}...): "
            f"it was changed or replaced after the build; rebuild with: {rebuild}"
        )


def cpu_graphs_unusable(manifest: Manifest, components: tuple[str, ...]) -> str | None:
    """None when the folder has CPU graphs (``CpuGraphRecord``, ``CPU_INT8``) of every one of
    ``components``, else why not. Reads the manifest only."""
    records = [manifest.components[n].cpu_graph if n in manifest.components else None for n in components]
    if any(r is None for r in records):
        return (f"the folder has no CPU graphs of {' and '.join(components)} (rebuild it with export.build, which "
                "makes them by default when both are built, or --cpu-int8)")
    if unmade := [r for r in records if not r.built]:
        return f"the folder's CPU graphs were not made: {unmade[0].reason}"
    if other := [r.precision for r in records if r.precision != CPU_INT8]:
        return f"the folder's CPU graphs are {other[0]}, which this toolkit does not run (it runs {CPU_INT8}); rebuild it"
    return None


def cpu_graphs(folder: str | Path, manifest: Manifest, components: tuple[str, ...]) -> dict[str, Path]:
    """The CPU graphs of ``components``, checked against their sha256; a ``ManifestError`` saying
    why when they were not made or one does not match."""
    if why := cpu_graphs_unusable(manifest, components):
        raise ManifestError(why)
    folder = Path(folder)
    graphs = {}
    for name in components:
        record = manifest.components[name].cpu_graph
        _check_file(folder, record.file, record.sha256, "CPU graph", manifest.rebuild_command)
        graphs[name] = folder / record.file
    return graphs


def load_manifest(
    folder: str | Path,
    *,
    components: list[str] | None = None,
    engines: bool = False,
    flavour: str | None = None,
    tensorrt_version: str | None = None,
    compute_capability: tuple[int, int] | None = None,
) -> Manifest:
    """Read and verify an artifact folder for use.

    Always checks the ONNX files' hashes. With ``engines=True`` every requested component must
    have a built engine whose file hash, flavour (TensorRT or TensorRT-RTX), version and compute
    capability match the given ones (the running TensorRT and GPU).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    rebuild = manifest.rebuild_command
    names = components if components is not None else list(manifest.components)
    for name in names:
        record = manifest.components.get(name)
        if record is None:
            raise ManifestError(
                f"{folder} has no {name} component (it has {', '.join(manifest.components) or 'none'}); "
                f"rebuild with: {rebuild} --components {' '.join(sorted({*manifest.components, name}))}"
            )
        _check_file(folder, record.onnx_file, record.onnx_sha256, "ONNX graph", rebuild)
        if not engines:
            continue
        engine = record.engine
        if not engine.built:
            raise ManifestError(f"the {name} engine was not built ({engine.reason}); on the target GPU run: {rebuild}")
        differences = []
        built_with = FLAVOURS[engine.flavour].title if engine.flavour in FLAVOURS else engine.flavour
        if flavour is not None and engine.flavour != flavour:
            here = FLAVOURS[flavour].title if flavour in FLAVOURS else flavour
            differences.append(f"{built_with} engines, asked to run on {here}")
        elif tensorrt_version is not None and engine.tensorrt_version != tensorrt_version:
            differences.append(f"{built_with} {engine.tensorrt_version} at build, {tensorrt_version} here")
        if compute_capability is not None:
            here = "%d.%d" % compute_capability
            if engine.compute_capability != here:
                differences.append(
                    f"compute capability {engine.compute_capability} ({engine.gpu}) at build, {here} here"
                )
        if differences:
            raise ManifestError(
                f"the {name} engine in {folder} was built for another setup: {'; '.join(differences)}. "
                f"Rebuild for this GPU and version with: {rebuild} (--target auto on this machine)"
            )
        _check_file(folder, engine.file, engine.sha256, "engine", rebuild)
    return manifest

"""The Triton model repository that serves ``flow_upscaler``: what ``python -m runtime.serve``
runs on the bundled server, and what ``--write-repository`` hands to a stock Triton server.

Layout: ``<repository>/flow_upscaler/config.pbtxt`` (tensors, dynamic batching, instance group,
the folder and backend as parameters) and ``<repository>/flow_upscaler/1/model.py``, a shim that
makes this package importable in Triton's Python backend and delegates to
``runtime.serving.triton_model``. The artifact folder is named by absolute path, or copied into
``flow_upscaler/1/artifacts`` so the repository can be mounted elsewhere (a container).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from engines.errors import FlowUpscalerError
from engines.manifest import load_manifest

from ..latents import LATENT_CHANNELS
from ..errors import InvalidArgumentError
from ..inputs import MAIN_INPUTS
from ..upscale_pass import PASS_COMPONENTS
from .requests import DECODE, IMAGE, LATENTS, SCALE, SEED, UPSCALED

MODEL_NAME = "flow_upscaler"
MODEL_VERSION = "1"
COPIED_ARTIFACTS = "artifacts"  # inside the version folder; the model resolves a relative path there
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the runtime and engines packages
CONFIG_HEADER = "# Written by `python -m runtime.serve`"  # config.pbtxt's first line: a model folder of ours


class RepositoryError(FlowUpscalerError, OSError):
    """The model repository cannot be written where asked."""


@dataclass(frozen=True)
class ServedModel:
    """What the served model is: the folder, how it runs, and how Triton schedules it."""

    artifacts: Path
    backend: str = "auto"
    noise: str = "auto"
    gpu: bool = False  # instance group KIND_GPU (one Upscaler per instance on its GPU), else KIND_CPU
    instances: int = 1  # per GPU with gpu, else in all
    max_batch: int = 1  # Triton's max_batch_size: items per batch, summed over the requests batched
    max_queue_delay_us: int = 0  # how long the dynamic batcher waits to fill a batch
    python_path: list[str] = field(default_factory=list)  # import paths the Python backend adds first
    # the Python environment that wrote the repository: where it exists, the model runs only in it
    python_prefix: str = field(default_factory=lambda: sys.prefix)

    @classmethod
    def for_folder(
        cls,
        artifacts: Path,
        backend: str = "auto",
        device: str = "auto",
        noise: str = "auto",
        instances: int = 1,
        max_batch: int | None = None,
        max_queue_delay_us: int = 0,
    ) -> ServedModel:
        """The model serving ``artifacts`` from this machine's install, checked against the folder:
        ``max_batch`` defaults to (and may not exceed) its largest batch; ``device`` auto is cuda
        when this machine has one."""
        limit = folder_max_batch(artifacts)
        if max_batch is not None and not 1 <= max_batch <= limit:
            raise InvalidArgumentError(
                f"--max-batch {max_batch} is outside what {artifacts} was built for (batch 1..{limit}); "
                f"pass --max-batch 1..{limit} or rebuild the folder with a larger --max-batch"
            )
        if device not in ("auto", "cpu", "cuda"):
            raise InvalidArgumentError(f"device must be auto, cpu or cuda (Triton places GPU instances), got {device!r}")
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(
            artifacts=Path(artifacts).resolve(), backend=backend, noise=noise, gpu=device == "cuda", instances=instances,
            max_batch=max_batch or limit, max_queue_delay_us=max_queue_delay_us, python_path=this_python_path(),
        )


def folder_max_batch(artifacts: Path) -> int:
    """The largest batch the folder's pass components take (checks the folder on the way)."""
    manifest = load_manifest(artifacts)
    missing = [c for c in PASS_COMPONENTS if c not in manifest.components]
    if missing:
        raise InvalidArgumentError(f"{artifacts} lacks {', '.join(missing)}; rebuild with: {manifest.rebuild_command}")
    return min(max(p.max[MAIN_INPUTS[c]][0] for p in manifest.components[c].profiles) for c in PASS_COMPONENTS)


def largest_request_bytes(artifacts: Path, max_batch: int) -> int:
    """Bytes of the largest latents a request the folder admits carries (binary tensors): the
    server's HTTP frontend must take a body this large."""
    profiles = load_manifest(artifacts).components[PASS_COMPONENTS[0]].profiles
    height = max(p.max[MAIN_INPUTS[PASS_COMPONENTS[0]]][2] for p in profiles)
    width = max(p.max[MAIN_INPUTS[PASS_COMPONENTS[0]]][3] for p in profiles)
    return max_batch * LATENT_CHANNELS * height * width * 4


def this_python_path() -> list[str]:
    """Where this interpreter finds this package and its dependencies (a virtual environment's
    site-packages included): what the Python backend's embedded interpreter needs on this machine.
    Folders that do not exist where the repository is served are skipped by the model."""
    paths = [str(PACKAGE_ROOT)]
    for entry in sys.path:
        if entry and os.path.isdir(entry) and entry not in paths:
            paths.append(os.path.abspath(entry))
    return paths


def config_text(model: ServedModel, artifacts: str) -> str:
    """config.pbtxt: the tensors of the served model, its batching and instances, its parameters."""
    kind = "KIND_GPU" if model.gpu else "KIND_CPU"
    parameters = {
        "artifacts": artifacts,
        "backend": model.backend,
        "noise": model.noise,
        "python_path": json.dumps(model.python_path),
        "python_prefix": model.python_prefix,
    }
    parameter_lines = "\n".join(
        f"  {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(v)} }} }}," for k, v in parameters.items()
    ).rstrip(",")
    return f"""{CONFIG_HEADER}: Flow Upscaler one-step latent upscaling (2x, 4x, 8x).
name: "{MODEL_NAME}"
backend: "python"
max_batch_size: {model.max_batch}
input [
  {{ name: "{LATENTS}" data_type: TYPE_FP32 dims: [ {LATENT_CHANNELS}, -1, -1 ] }},
  {{ name: "{SCALE}" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "{SEED}" data_type: TYPE_INT64 dims: [ 1 ] }},
  {{ name: "{DECODE}" data_type: TYPE_BOOL dims: [ 1 ] optional: true }}
]
output [
  {{ name: "{UPSCALED}" data_type: TYPE_FP32 dims: [ {LATENT_CHANNELS}, -1, -1 ] }},
  {{ name: "{IMAGE}" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {model.max_queue_delay_us} }}
instance_group [ {{ count: {model.instances} kind: {kind} }} ]
parameters [
{parameter_lines}
]
"""


MODEL_PY = '''"""Triton Python-backend model flow_upscaler, written by `python -m runtime.serve`.

The code is runtime.serving.triton_model of the flow-upscaler-deploy package: install it (with
its cpu or gpu extra) in the Python that runs Triton's Python backend, or serve on the machine
that wrote this repository (config.pbtxt's python_path names that machine's import paths).
Triton's Python backend runs the first python3 on the server's PATH, whatever started it.
"""

import json
import os
import re
import sys


def _check_environment(written_for):
    """Refuse to load, naming the Python the backend runs, where wrong outputs would follow."""
    try:
        import numpy  # the backend's stub uses this numpy for every tensor

        found = f"{sys.prefix} (Python {sys.version.split()[0]}, numpy {numpy.__version__} from {numpy.__file__})"
    except ImportError as exc:
        numpy, found = None, f"{sys.prefix} (Python {sys.version.split()[0]}, no numpy: {exc})"
    if written_for and os.path.isdir(written_for) and os.path.realpath(written_for) != os.path.realpath(sys.prefix):
        raise RuntimeError(
            f"flow_upscaler was written for the Python environment {written_for}, but Triton's Python backend runs "
            f"{found}: the backend starts the first python3 on the server's PATH; start tritonserver with "
            f"{os.path.join(written_for, 'bin')} first on PATH, or serve with that environment's python -m runtime.serve"
        )
    stub = os.path.realpath("/proc/self/exe")
    if numpy is not None and int(numpy.__version__.split(".")[0]) >= 2 and "pytriton" in stub:
        raise RuntimeError(
            f"the Python backend stub {stub} was built for numpy 1 and returns empty outputs with numpy 2; it runs "
            f"{found}: put a Python environment with numpy<2 (this package's) first on the server's PATH"
        )


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        _check_environment(parameters.get("python_prefix", ""))
        paths = json.loads(parameters["python_path"])
        sys.path[:0] = [p for p in paths if os.path.isdir(p) and p not in sys.path]
        try:
            from runtime.serving.triton_model import FlowUpscalerModel
        except ImportError as exc:
            raise ImportError(
                f"flow_upscaler needs the flow-upscaler-deploy package and its runtime dependencies in the "
                f"Python of Triton's Python backend ({sys.version.split()[0]}): {exc}"
            ) from exc
        self.model = FlowUpscalerModel(args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
'''


def write_repository(repository: Path, model: ServedModel, copy_artifacts: bool = False) -> Path:
    """Write ``<repository>/flow_upscaler`` whole or not at all (a previous one is replaced only
    once the new one is complete, and only if this command wrote it); other models and files in
    ``repository`` are left alone. Returns the model's folder."""
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise RepositoryError(f"--write-repository {repository} is a file; give a folder (new or a Triton model repository)")
    artifacts = Path(model.artifacts).resolve()
    if repository.resolve() == artifacts or artifacts in repository.resolve().parents:
        raise RepositoryError(f"--write-repository {repository} is inside the artifact folder {artifacts}; give a folder outside it")
    target = repository / MODEL_NAME
    if not copy_artifacts and (artifacts == target.resolve() or target.resolve() in artifacts.parents):
        raise RepositoryError(
            f"the artifact folder {artifacts} is inside {target}, which this write replaces; pass "
            "--copy-artifacts (the folder is copied first) or write the repository elsewhere"
        )
    _require_ascii(repository, model, copy_artifacts)
    repository.mkdir(parents=True, exist_ok=True)
    _recover(repository, target)
    _require_ours(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.staging-{os.getpid()}-", dir=repository))
    try:
        version = staging / MODEL_VERSION
        version.mkdir()
        if copy_artifacts:
            shutil.copytree(artifacts, version / COPIED_ARTIFACTS)
        named = COPIED_ARTIFACTS if copy_artifacts else str(artifacts)
        (staging / "config.pbtxt").write_text(config_text(model, named))
        (version / "model.py").write_text(MODEL_PY)
        staging.chmod(0o755)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.old-{os.getpid()}-", dir=repository))
            target.rename(old / MODEL_NAME)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# What a model folder written here holds (Python and Triton may add __pycache__ beside model.py).
_WRITTEN = {"config.pbtxt": None, MODEL_VERSION: {"model.py", COPIED_ARTIFACTS, "__pycache__"}}


def _require_ours(target: Path) -> None:
    """Refuse to replace ``target`` unless this command wrote it: its config.pbtxt starts with our
    header, its model.py is our shim, and it holds nothing else (a user's file there would be deleted)."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise RepositoryError(f"{target} exists and is no folder this command wrote; move it away or write the repository elsewhere")
    foreign = []
    for entry in sorted(target.iterdir()):
        if entry.name not in _WRITTEN:
            foreign.append(entry.name)
        elif _WRITTEN[entry.name] is not None:
            foreign += [f"{entry.name}/{e.name}" for e in sorted(entry.iterdir()) if e.name not in _WRITTEN[entry.name]]
    config, model_py = target / "config.pbtxt", target / MODEL_VERSION / "model.py"
    ours = (config.is_file() and _first_line(config).startswith(CONFIG_HEADER)
            and model_py.is_file() and _first_line(model_py) == MODEL_PY.splitlines()[0])
    if ours and not foreign:
        return
    held = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    what = f"it holds {held}, which this command did not write" if ours else (
        f"it is no model folder this command wrote (it holds {held or 'nothing'})")
    raise RepositoryError(f"will not replace {target}: {what}; move it away or write the repository elsewhere")


def _first_line(path: Path) -> str:
    try:
        with path.open(encoding="utf-8", errors="replace") as file:
            return file.readline().rstrip("\n")
    except OSError:
        return ""


def _require_ascii(repository: Path, model: ServedModel, copy_artifacts: bool) -> None:
    """Triton's Python backend runs its model with an ASCII file-system encoding, whatever the
    locale: a path with other characters is not found there (measured with Triton 2.51)."""
    paths = {"the repository": [str(repository.resolve())], "the import path": model.python_path}
    if not copy_artifacts:
        paths["the artifact folder"] = [str(model.artifacts)]
    for what, values in paths.items():
        for value in values:
            if not value.isascii():
                raise RepositoryError(
                    f"{what} {value} has non-ASCII characters, which Triton's Python backend cannot open; "
                    "use a path of ASCII characters" + (" (or --copy-artifacts)" if what == "the artifact folder" else "")
                )


_LEFTOVER = re.compile(rf"\.{MODEL_NAME}\.(staging|old)-(\d+)-\w+")


def _recover(repository: Path, target: Path) -> None:
    """Leftovers of a write that was killed (named by this module, their writer's pid dead): put a
    model that was set aside back, delete the rest (Triton would try to load them as models).
    Anything else, a user's ``.flow_upscaler.backup`` say, is left alone."""
    for leftover in sorted(repository.glob(f".{MODEL_NAME}.*")):
        match = _LEFTOVER.fullmatch(leftover.name)
        if match is None or not leftover.is_dir() or _alive(int(match.group(2))):
            continue
        set_aside = leftover / MODEL_NAME
        if match.group(1) == "old" and not target.exists() and set_aside.is_dir():
            set_aside.rename(target)
        shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a write in progress in another process)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""Where the loader finds its models, through ComfyUI's ``folder_paths`` (so ``extra_model_paths.yaml`` works).

- Artifact folders of ``python -m export.build``: any folder holding a ``manifest.json`` under a
  ``flow_upscaler`` models path (``models/flow_upscaler/<name>/``), listed as ``<name>/``.
- The published checkpoint: a Flow Upscaler ``.safetensors`` file under ``latent_upscale_models``
  (where the community node pack keeps it), listed by its file name; files of other latent
  upscalers there are left out (told apart by their tensor names, read from the header only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import folder_paths

from engines.errors import FlowUpscalerError
from engines.manifest import MANIFEST_NAME

FOLDERS = "flow_upscaler"
CHECKPOINTS = "latent_upscale_models"
FOLDER_MARK = "/"  # a choice naming an artifact folder ends with it
MAX_DEPTH = 3  # folder levels searched below a models path
_FLOW_UPSCALER_KEY = "low_res_encoder."  # a tensor-name prefix only the Flow Upscaler's checkpoint has


def register() -> None:
    """Add the default ``models/flow_upscaler`` path (kept after any that extra_model_paths.yaml gave)
    and, on ComfyUI versions that lack it, ``models/latent_upscale_models``."""
    for name in (FOLDERS, CHECKPOINTS):
        if name == FOLDERS or name not in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))


def _paths(name: str) -> list[str]:
    try:
        return folder_paths.get_folder_paths(name)
    except KeyError:
        return []


def artifact_folders() -> list[str]:
    """``<relative path>/`` of every artifact folder under the flow_upscaler models paths."""
    found = set()
    for root in _paths(FOLDERS):
        for current, subdirs, files in os.walk(root, followlinks=True):
            depth = Path(current).relative_to(root).parts
            if MANIFEST_NAME in files and depth:
                found.add("/".join(depth) + FOLDER_MARK)
                subdirs.clear()  # an artifact folder's onnx/, engines/ hold no other folder
            elif len(depth) >= MAX_DEPTH:
                subdirs.clear()
    return sorted(found)


_checked: dict[tuple[str, int, int], bool] = {}


def _is_flow_upscaler(path: str) -> bool:
    from safetensors import safe_open

    try:
        stat = os.stat(path)
    except OSError:
        return False
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _checked:
        try:
            with safe_open(path, framework="pt") as handle:  # reads the header only
                _checked[key] = any(k.startswith(_FLOW_UPSCALER_KEY) for k in handle.keys())
        except Exception:  # not readable as safetensors: not offered  # noqa: BLE001
            _checked[key] = False
    return _checked[key]


def checkpoints() -> list[str]:
    """File names (relative to latent_upscale_models) of the Flow Upscaler checkpoints there."""
    try:
        names = folder_paths.get_filename_list(CHECKPOINTS)
    except KeyError:
        return []
    return [n for n in names if n.endswith(".safetensors")
            and (path := folder_paths.get_full_path(CHECKPOINTS, n)) is not None and _is_flow_upscaler(path)]


def choices() -> list[str]:
    return artifact_folders() + checkpoints()


@dataclass(frozen=True)
class Model:
    kind: str  # "folder" or "checkpoint"
    path: Path


class ModelNotFound(FlowUpscalerError, LookupError):
    pass


def resolve(choice: str) -> Model:
    """The folder or checkpoint a choice names; ``ModelNotFound`` saying where it was looked for."""
    if choice.endswith(FOLDER_MARK):
        # as folder_paths.get_full_path does: a name cannot climb out of the models path ("../x/")
        relative = os.path.relpath(os.path.join("/", choice[: -len(FOLDER_MARK)]), "/")
        roots = _paths(FOLDERS)
        for root in roots:
            folder = Path(root, relative)
            if relative != "." and (folder / MANIFEST_NAME).is_file():
                return Model("folder", folder)
        raise ModelNotFound(f"no artifact folder {relative!r} (with a {MANIFEST_NAME}) in {', '.join(roots) or 'no flow_upscaler path'}")
    path = folder_paths.get_full_path(CHECKPOINTS, choice)
    if path is None or not choice.endswith(".safetensors"):
        raise ModelNotFound(f"no checkpoint {choice!r} in {', '.join(_paths(CHECKPOINTS)) or 'no latent_upscale_models path'} "
                            f"(choose an artifact folder ending in '/' or a .safetensors file)")
    return Model("checkpoint", Path(path))

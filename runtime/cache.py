"""The user cache folder: what the runtime learns on this machine (check verdicts, TensorRT-RTX's
runtime cache), kept per user and never inside an artifact folder, which the runtime only reads
(DESIGN.md "Trust for engines built where they cannot run").

Location: ``$FLOW_UPSCALER_CACHE`` if set, else ``$XDG_CACHE_HOME/flow-upscaler``, else
``~/.cache/flow-upscaler``. Nothing is created until something is written there.
"""

from __future__ import annotations

import os
from pathlib import Path

from engines.errors import FlowUpscalerError

CACHE_ENV = "FLOW_UPSCALER_CACHE"
APP_FOLDER = "flow-upscaler"


class CacheLocationError(FlowUpscalerError, ValueError):
    """A cache folder that must not be used (inside an artifact folder); says how to move it."""


def cache_root() -> Path:
    """The user cache folder (see the module docstring), as an absolute path."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: a relative value is invalid and ignored
        return Path(xdg) / APP_FOLDER
    return Path.home() / ".cache" / APP_FOLDER


def cache_dir(name: str, artifact_folder: Path | None = None) -> Path:
    """``cache_root() / name``, refused when it lies inside ``artifact_folder`` (which is never written)."""
    folder = cache_root() / name
    if artifact_folder is not None:
        inside, artifacts = folder.resolve(), Path(artifact_folder).resolve()
        if inside == artifacts or artifacts in inside.parents:
            raise CacheLocationError(
                f"the cache folder {folder} is inside the artifact folder {artifact_folder}, which the runtime never "
                f"writes; set {CACHE_ENV} to a folder outside it"
            )
    return folder

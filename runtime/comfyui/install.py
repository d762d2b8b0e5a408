"""``python -m runtime.comfyui install COMFYUI_DIR``: the small folder under ``custom_nodes/`` that
loads the nodes from the installed package, and ``--uninstall`` to remove it.

The folder holds an ``__init__.py`` that imports ``runtime.comfyui.nodes`` (so the nodes are the
installed package's: updating the checkout updates them) and a record of what was written, with
each file's sha256. Re-running rewrites the same files; a folder without that record, or whose
files were changed since, is not touched; ``--uninstall`` removes only the recorded files still as
written (and the ``__pycache__`` Python made of them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

from engines.cli import run_cli
from engines.errors import FlowUpscalerError
from engines.files import atomic_output

NODE_FOLDER = "flow_upscaler_deploy"
RECORD = "flow_upscaler_install.json"
WRITTEN_BY = "python -m runtime.comfyui install"
CHECKOUT = Path(__file__).resolve().parents[2]
# what the loader's hint tells to install: this checkout (an editable install), else the package
REQUIREMENT = f"-e '{CHECKOUT}[cpu]'" if (CHECKOUT / "pyproject.toml").is_file() else "flow-upscaler-deploy[cpu]"

_LOADER = '''"""Flow Upscaler nodes, loaded from the installed flow-upscaler-deploy package (runtime.comfyui.nodes).

Written by `{written_by}`; remove it with `python -m runtime.comfyui install --uninstall <ComfyUI folder>`.
"""

import logging
import sys

try:
    from runtime.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ModuleNotFoundError as exc:
    if exc.name not in ("runtime", "runtime.comfyui", "engines"):
        raise  # a package the toolkit needs is missing: ComfyUI shows which
    # the toolkit is not installed in the Python that runs ComfyUI
    logging.error(
        "Flow Upscaler nodes not loaded: the toolkit is not installed in the Python that runs ComfyUI; "
        "install it with: %s -m pip install %s", sys.executable, {extras!r})
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {{}}, {{}}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''


class InstallError(FlowUpscalerError, ValueError):
    """A ComfyUI folder that cannot take the nodes folder, or a folder this installer did not write."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def comfyui_tree(path: Path) -> Path:
    """``path`` if it is a ComfyUI folder (``main.py``, ``nodes.py``, ``custom_nodes/``), else InstallError."""
    missing = [name for name in ("main.py", "nodes.py", "custom_nodes") if not (path / name).exists()]
    if not path.is_dir() or missing:
        raise InstallError(
            f"{path} is not a ComfyUI folder (it lacks {', '.join(missing) if path.is_dir() else 'everything: no such folder'}); "
            "give the folder that holds ComfyUI's main.py and custom_nodes/")
    return path


def _record(folder: Path) -> dict | None:
    """The install record of ``folder``; None where there is none; InstallError where it is not ours."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InstallError(f"{folder / RECORD} cannot be read ({exc}); remove {folder} yourself if it is not needed") from None
    if not isinstance(record, dict) or record.get("written_by") != WRITTEN_BY or not isinstance(record.get("files"), dict):
        raise InstallError(f"{folder / RECORD} was not written by {WRITTEN_BY}; {folder} is left as it is")
    return record


def _changed(folder: Path, record: dict) -> list[str]:
    """The recorded files that are no longer as written (missing ones are not changed)."""
    changed = []
    for name, digest in record["files"].items():
        path = folder / name
        if path.exists() and (not path.is_file() or _sha256(path.read_bytes()) != digest):
            changed.append(name)
    return changed


def install(comfyui: Path, report=print) -> Path:
    folder = comfyui_tree(comfyui) / "custom_nodes" / NODE_FOLDER
    loader = _LOADER.format(written_by=WRITTEN_BY, extras=REQUIREMENT).encode()
    if folder.exists():
        record = _record(folder) if folder.is_dir() else None
        if record is None:
            raise InstallError(f"{folder} exists and was not written by {WRITTEN_BY}: it is left as it is; "
                               "move it away to install here")
        if changed := _changed(folder, record):
            raise InstallError(f"{', '.join(changed)} in {folder} changed since it was installed: left as it is; "
                               "remove the folder or undo the change to install again")
    record = {"written_by": WRITTEN_BY, "toolkit": str(CHECKOUT), "python": sys.executable,
              "files": {"__init__.py": _sha256(loader)}}
    folder.mkdir(parents=True, exist_ok=True)
    # the record first: a run stopped after it leaves a folder the next run recognises as its own
    with atomic_output(folder / RECORD) as partial:
        partial.write_text(json.dumps(record, indent=2) + "\n")
    with atomic_output(folder / "__init__.py") as partial:
        partial.write_bytes(loader)
    report(f"wrote {folder / '__init__.py'} (loads the nodes from {CHECKOUT}) and {folder / RECORD}")
    report("restart ComfyUI to load the nodes; they need this toolkit installed in ComfyUI's Python "
           f"(pip install {REQUIREMENT}, or [gpu,rtx] on an RTX GPU)")
    return folder


def uninstall(comfyui: Path, report=print) -> None:
    folder = comfyui_tree(comfyui) / "custom_nodes" / NODE_FOLDER
    if not folder.exists():
        report(f"nothing to remove: {folder} does not exist")
        return
    record = _record(folder) if folder.is_dir() else None
    if record is None:
        raise InstallError(f"{folder} was not written by {WRITTEN_BY}: it is left as it is")
    changed = set(_changed(folder, record))
    removed = []
    for name in record["files"]:
        if name not in changed and (folder / name).is_file():
            (folder / name).unlink()
            removed.append(name)
    cache = folder / "__pycache__"
    if cache.is_dir() and all(p.name.startswith("__init__.") for p in cache.iterdir()):
        shutil.rmtree(cache)
    (folder / RECORD).unlink(missing_ok=True)
    left = sorted(p.name for p in folder.iterdir())
    if left:
        report(f"removed {', '.join(removed) or 'nothing'} from {folder}; left {', '.join(left)} (not as installed) "
               "and the folder")
    else:
        folder.rmdir()
        report(f"removed {folder}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.comfyui",
        description="Install the Flow Upscaler nodes into a ComfyUI folder. Run it with the Python that runs "
                    "ComfyUI, after pip install -e '<this checkout>[cpu]' (or [gpu,rtx]) in that Python.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser(
        "install", help="write (or with --uninstall remove) custom_nodes/" + NODE_FOLDER,
        description=f"Write COMFYUI_DIR/custom_nodes/{NODE_FOLDER}/, a small folder that loads the nodes "
                    "FlowUpscalerLoader, FlowUpscalerUpscale and FlowUpscalerDecode from the installed package. "
                    "Harmless to re-run; a folder of that name it did not write is never touched. Put artifact "
                    "folders of python -m export.build in COMFYUI_DIR/models/flow_upscaler/<name>/ and the "
                    "published checkpoint in COMFYUI_DIR/models/latent_upscale_models/, then restart ComfyUI.")
    command.add_argument("comfyui_dir", metavar="COMFYUI_DIR", type=Path,
                         help="the ComfyUI folder (holding main.py and custom_nodes/)")
    command.add_argument("--uninstall", action="store_true",
                         help="remove what an earlier install wrote (only files still as written)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    (uninstall if args.uninstall else install)(args.comfyui_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

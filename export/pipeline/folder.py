"""The artifact folder as a transaction: what the manifest in it names may be reused, and until a
new manifest is in place nothing it names is touched. Leftovers of a failed or killed build are
deleted here."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from engines.manifest import CheckSetRecord, ComponentRecord, ManifestError, read_manifest, sha256_file

from .errors import BuildError

ONNX_DIR = "onnx"
ENGINE_DIR = "engines"
CHECK_DIR = "checks"  # the check set (export.pipeline.checkset)
REPORT_NAME = "report.json"
_BUILD_SUFFIXES = (".onnx", ".validation.json", ".plan", ".partial", ".onnx.data", ".safetensors")


def check_output_folder(out: Path) -> None:
    """Refuse an artifact folder that cannot be written, before minutes of work are spent.

    Creates nothing: a folder that does not exist yet is made by the build itself (``BuildLock``),
    which removes it again if the build fails. Until then its nearest existing parent is checked.
    """
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} is a file, not a folder; name a folder for the artifacts")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise BuildError(f"--out {out}: {existing} is a file, not a folder; name a folder for the artifacts")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        where = "" if existing == out else f" (its parent {existing})"
        raise BuildError(f"--out {out}{where} cannot be written ({exc.strerror or exc}); name a writable folder") from exc


class ArtifactFolder:
    """The output folder and the component records of the manifest already in it."""

    def __init__(self, out: Path):
        self.out = out
        self.previous, self.previous_check_set = _previous_records(out)

    def reusable(self, relative: str | None, sha256: str | None) -> bool:
        """Whether the file the previous manifest names is still there with its hash."""
        return relative is not None and (self.out / relative).is_file() and sha256_file(self.out / relative) == sha256

    def clean_leftovers(self, current: dict[str, ComponentRecord] | None = None,
                        check_set: CheckSetRecord | None = None) -> None:
        """Delete what a failed or killed build left in ``onnx/``, ``engines/`` and ``checks/``:
        staging folders, partial files, and graphs, validation reports, engines and check sets that
        ``current`` and ``check_set`` (by default the previous manifest's) do not name. Only this
        toolkit's kinds of files are touched."""
        named = _named(self.previous if current is None else current)
        check_set = self.previous_check_set if current is None else check_set
        named |= {check_set.file} if check_set is not None else set()
        keep = named | {f.replace(".onnx", ".validation.json") for f in named if f.endswith(".onnx")}
        for sub in (ONNX_DIR, ENGINE_DIR, CHECK_DIR):
            root = self.out / sub
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*"), reverse=True):  # children before their folders
                relative = path.relative_to(self.out).as_posix()
                if path.is_dir() and path.name.startswith(".staging"):
                    shutil.rmtree(path, ignore_errors=True)
                elif path.is_file() and relative not in keep and path.name.endswith(_BUILD_SUFFIXES):
                    path.unlink(missing_ok=True)
            _remove_empty_folders(root)

    def discard_new(self, new: dict[str, ComponentRecord]) -> str:
        """After a failed build: delete what it wrote that the previous manifest does not name.
        Returns a sentence saying so, for the error message."""
        deleted = self._delete_artifacts(new, _named(self.previous))
        kept = "the folder keeps its previous manifest" if self.previous else "no manifest was written"
        return f"Deleted {', '.join(deleted)}; {kept}." if deleted else f"Nothing new was kept; {kept}."

    def _delete_artifacts(self, records: dict[str, ComponentRecord], keep: set[str]) -> list[str]:
        """Delete the graphs (with their validation files) and engines ``records`` name, except ``keep``."""
        deleted = []
        for record in records.values():
            for relative in _files(record):
                if relative and relative not in keep and (self.out / relative).exists():
                    (self.out / relative).unlink()
                    deleted.append(relative)
                    if relative.endswith(".onnx"):
                        (self.out / relative.replace(".onnx", ".validation.json")).unlink(missing_ok=True)
        return deleted


def _previous_records(out: Path) -> tuple[dict[str, ComponentRecord], CheckSetRecord | None]:
    try:
        manifest = read_manifest(out)
    except ManifestError:
        return {}, None
    return manifest.components, manifest.check_set


def _files(record: ComponentRecord) -> tuple[str | None, ...]:
    return record.onnx_file, record.engine.file, record.cpu_graph.file if record.cpu_graph else None


def _named(records: dict[str, ComponentRecord]) -> set[str]:
    return {f for r in records.values() for f in _files(r) if f}


def _remove_empty_folders(root: Path) -> None:
    for folder in sorted((p for p in root.glob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()

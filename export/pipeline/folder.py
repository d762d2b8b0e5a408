"""The artifact folder as a transaction: what the manifest in it names may be reused, and until a
new manifest is in place nothing it names is touched. Leftovers of a failed or killed build are
deleted here.

Only the build's own files are ever deleted. A folder is the build's when it is new or empty, or
holds this toolkit's manifest (its ``schema`` field) or a build's lock or record file; any other
non-empty folder is refused before anything is written (``check_output_folder``). Inside its own
folder a build deletes only what its manifest names and what its record says it wrote: under the
lock, before any stage, it records which files the folder already held that no manifest names (a
user's own, kept for good), in ``.build.record.json``, deleted when the build ends. What a killed
build left is what is there beyond that record and the manifest; the next build deletes it."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from engines.files import atomic_output
from engines.manifest import (MANIFEST_NAME, SCHEMA, CheckSetRecord, ComponentRecord, ManifestError, read_manifest,
                              sha256_file)

from .errors import BuildError
from .lock import LOCK_NAME

ONNX_DIR = "onnx"
ENGINE_DIR = "engines"
CHECK_DIR = "checks"  # the check set (export.pipeline.checkset)
REPORT_NAME = "report.json"
RECORD_NAME = ".build.record.json"
RECORD_SCHEMA = "flow-upscaler-build-record"
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
    check_own_folder(out)


def check_own_folder(out: Path) -> None:
    """Refuse a non-empty folder this toolkit did not build, before anything in it is touched: the
    build deletes and overwrites files by this toolkit's names (onnx/, engines/, checks/,
    manifest.json, report.json), which in someone else's folder are someone else's files."""
    if not out.is_dir() or _is_ours(out):
        return
    raise BuildError(f"--out {out} holds files this toolkit did not write (no {MANIFEST_NAME} of a Flow Upscaler "
                     "build in it); name a new or empty folder, or an artifact folder export.build made")


def _is_ours(out: Path) -> bool:
    if not any(out.iterdir()) or (out / LOCK_NAME).is_file() or _read_record(out) is not None:
        return True
    try:
        data = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("schema") == SCHEMA


class ArtifactFolder:
    """The output folder, the component records of the manifest already in it, and the files a
    build found there that no manifest names (its record: never deleted)."""

    def __init__(self, out: Path):
        self.out = out
        self.previous, self.previous_check_set = _previous_records(out)
        self.kept = _read_record(out)  # a killed build's record, until ``begin`` writes this build's

    def reusable(self, relative: str | None, sha256: str | None) -> bool:
        """Whether the file the previous manifest names is still there with its hash."""
        return relative is not None and (self.out / relative).is_file() and sha256_file(self.out / relative) == sha256

    def begin(self) -> None:
        """Record the files the folder holds that the manifest does not name, before any stage writes."""
        named = self._named_with_validation(self.previous, self.previous_check_set)
        self.kept = {f for f in self._files() if f not in named}
        with atomic_output(self.out / RECORD_NAME) as partial:
            partial.write_text(json.dumps({"schema": RECORD_SCHEMA, "kept": sorted(self.kept)}, indent=1) + "\n")

    def end(self) -> None:
        """The build is over (published or cleaned up): its record goes."""
        (self.out / RECORD_NAME).unlink(missing_ok=True)

    def clean_leftovers(self, current: dict[str, ComponentRecord] | None = None,
                        check_set: CheckSetRecord | None = None) -> None:
        """Delete what a build wrote in ``onnx/``, ``engines/`` and ``checks/`` that ``current`` and
        ``check_set`` (by default the previous manifest's) do not name: staging folders, partial
        files, graphs, validation reports, engines and check sets, the previous manifest's files
        among them. Files the record kept are never touched, nor any file while there is no record
        (no build wrote here since the last one ended); only this toolkit's kinds of files are."""
        if self.kept is None:
            return
        if current is None:
            current, check_set = self.previous, self.previous_check_set
        keep = self._named_with_validation(current, check_set) | self.kept
        for sub in (ONNX_DIR, ENGINE_DIR, CHECK_DIR):
            root = self.out / sub
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*"), reverse=True):  # children before their folders
                relative = path.relative_to(self.out).as_posix()
                if path.is_dir() and path.name.startswith(".staging"):
                    if not any(f.startswith(f"{relative}/") for f in self.kept):
                        shutil.rmtree(path, ignore_errors=True)
                elif path.is_file() and relative not in keep and path.name.endswith(_BUILD_SUFFIXES):
                    path.unlink(missing_ok=True)
            _remove_empty_folders(root)

    def discard_new(self, new: dict[str, ComponentRecord]) -> str:
        """After a failed build: delete what it wrote that the previous manifest does not name.
        Returns a sentence saying so, for the error message."""
        deleted = self._delete_artifacts(new, _named(self.previous) | (self.kept or set()))
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
                    validation = relative.replace(".onnx", ".validation.json")
                    if relative.endswith(".onnx") and validation not in keep:
                        (self.out / validation).unlink(missing_ok=True)
        return deleted

    def _files(self) -> list[str]:
        return [p.relative_to(self.out).as_posix() for sub in (ONNX_DIR, ENGINE_DIR, CHECK_DIR)
                for p in sorted((self.out / sub).rglob("*")) if p.is_file()]

    @staticmethod
    def _named_with_validation(records: dict[str, ComponentRecord], check_set: CheckSetRecord | None) -> set[str]:
        named = _named(records) | ({check_set.file} if check_set is not None else set())
        return named | {f.replace(".onnx", ".validation.json") for f in named if f.endswith(".onnx")}


def _read_record(out: Path) -> set[str] | None:
    """The files a build's record kept, or None without a record of this toolkit's."""
    try:
        data = json.loads((out / RECORD_NAME).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("schema") != RECORD_SCHEMA or not isinstance(data.get("kept"), list):
        return None
    return {f for f in data["kept"] if isinstance(f, str)}


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

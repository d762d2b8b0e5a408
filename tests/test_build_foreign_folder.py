"""``python -m export.build --out D`` never deletes or overwrites what is not its own.

A non-empty folder the toolkit did not build (no manifest.json of its schema, no build's lock or
record) is refused in one line before anything in it is touched. Inside its own folder a build
deletes only what its manifest names and what it wrote itself: a user's files there, even named
like the build's (onnx/x.onnx, engines/y.plan, checks/z.safetensors), stay byte for byte.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engines.manifest import load_manifest
from export.pipeline.errors import BuildError
from export.pipeline.folder import RECORD_NAME, check_output_folder

ROOT = Path(__file__).resolve().parents[1]
# The user's own files, named like the build's.
USER_FILES = {
    "onnx/x.onnx": b"\x08\x07a user's graph",
    "engines/y.plan": b"a user's engine \x00\xff",
    "checks/z.safetensors": b"a user's tensors",
}
# The CLI's main on the small models (the full-size ones take minutes to export), with one small
# calibration sample and no CPU graphs: the gate and that stage are not what this checks.
SMALL_BUILD = """
import sys
from export import build
from export.checkpoint import load_unet
from export.onnx.components import Models
from engines.cli import run_cli
from tests.conftest import SMALL_UNET

models = Models(unet=load_unet(random_weights=True, seed=0, **SMALL_UNET))
build._load_models = lambda args, components: (models, {"unet": {"source": "random", "seed": 0}})
sys.exit(run_cli(build.main, sys.argv[1:]))
"""
SMALL = ["--target", "rtx4090", "--random-weights", "--min-px", "64", "--max-px", "512", "--components",
         "cond_encoder", "unet", "--calib-size", "1", "--calib-side", "8", "--no-cpu-int8"]


def _write(folder: Path, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)


def _contents(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder``: a file's bytes, None for a folder."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def test_the_cli_refuses_a_users_folder_in_one_line_and_touches_nothing(tmp_path):
    folder = tmp_path / "mine"
    _write(folder, {**USER_FILES, "manifest.json": json.dumps({"name": "my app", "files": ["onnx/x.onnx"]}).encode(),
                    "report.json": b'{"quarter": 3}\n'})
    before = _contents(folder)
    done = subprocess.run([sys.executable, "-m", "export.build", "--target", "rtx4090", "--random-weights",
                           "--out", str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr == (f"error: --out {folder} holds files this toolkit did not write (no manifest.json of a Flow "
                           "Upscaler build in it); name a new or empty folder, or an artifact folder export.build "
                           "made\n")
    assert done.stdout == ""  # refused before the build started
    assert _contents(folder) == before  # every file byte for byte, nothing added (no lock file either)


@pytest.mark.parametrize("files", [{"manifest.json": b'{"schema": "someone-else", "components": {}}'},
                                   {"notes.txt": b"mine"}, {"onnx/x.onnx": b"mine"}])
def test_a_folder_with_anything_but_the_toolkits_files_is_refused(tmp_path, files):
    _write(tmp_path / "mine", files)
    with pytest.raises(BuildError, match="holds files this toolkit did not write"):
        check_output_folder(tmp_path / "mine")


def test_a_new_or_empty_folder_is_taken(tmp_path):
    check_output_folder(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_rebuild_of_its_own_folder_deletes_only_the_old_manifests_files(small_artifacts, tmp_path):
    folder = tmp_path / "art"
    shutil.copytree(small_artifacts, folder)
    old = load_manifest(folder)
    vae_graph = old.components["vae_decoder"].onnx_file  # not in the new build: named only by the old manifest
    _write(folder, {**USER_FILES, "notes.txt": b"the user's notes"})
    done = subprocess.run([sys.executable, "-c", SMALL_BUILD, *SMALL, "--out", str(folder)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for relative, data in {**USER_FILES, "notes.txt": b"the user's notes"}.items():
        assert (folder / relative).read_bytes() == data, relative
    manifest = load_manifest(folder)  # every file it names is there with its hash
    assert set(manifest.components) == {"cond_encoder", "unet"}
    assert not (folder / vae_graph).exists()
    assert not (folder / RECORD_NAME).exists() and not list(folder.rglob("*.partial"))

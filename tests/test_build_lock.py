"""One build per artifact folder at a time (issue 23): real concurrent ``python -m export.build``
commands (the CLI's ``main`` in subprocesses, on the small models) into one folder, fresh or
working, and the folder loaded after them and while they run.

The second build is started when the first has written a graph its manifest does not name yet
(log line ``unet (fp16)``: cond_encoder's graph is done). It is started ahead with its models
loaded and waits on its stdin, so it reaches the folder within a second of that line. Without the
lock its clean-up of leftovers deletes the first build's graph: one of them fails, or the first
writes a manifest naming a deleted file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from engines.manifest import load_manifest
from engines.targets import PRESETS
from export.build import main
from export.pipeline import graph
from export.pipeline.driver import build_artifacts
from export.pipeline.errors import BuildError
from export.pipeline.folder import check_output_folder
from export.pipeline.lock import LOCK_NAME, BuildLock, FolderBusyError
from export.pipeline.settings import BuildSettings
from runtime import Upscaler
from runtime.backends import onnxruntime as onnxruntime_backend

from .cpu_units import WITHOUT_BF16, pretend_cpu

ROOT = Path(__file__).resolve().parents[1]
SMALL_BUILD = """
import sys
from export import build
from export.checkpoint import load_unet, random_vae
from export.onnx.components import Models
from engines.cli import run_cli
from tests.conftest import SMALL_UNET, SMALL_VAE
from tests.export_memo import install

install()
argv = sys.argv[1:]
seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 0
models = Models(unet=load_unet(random_weights=True, seed=seed, **SMALL_UNET), vae=random_vae(seed, **SMALL_VAE))
random = {"source": "random", "seed": seed}
build._load_models = lambda args, components: (models, {"unet": random, "vae": random})
print("loaded", flush=True)
sys.stdin.readline()  # go
sys.exit(run_cli(build.main, argv))
"""
# One small calibration sample: the accuracy gate each build runs is not what these tests check
# (with the default four 32x32 samples it took most of each build's time); nor are the CPU graphs
# (tests/test_cpu_graphs.py), a stage as long again.
SMALL = ["--target", "rtx4090", "--random-weights", "--min-px", "64", "--max-px", "512", "--vae-precision", "fp32",
         "--components", "cond_encoder", "unet", "--calib-size", "1", "--calib-side", "8", "--no-cpu-int8"]
FIRST_UNWRITTEN = "unet (fp16)"  # cond_encoder's graph is written, not yet named by a manifest


class Build:
    """``python -m export.build`` (small models) in a subprocess, its output collected line by line."""

    def __init__(self, folder: Path, *extra: str):
        self.extra, self.finished_at = extra, 0.0
        self.process = subprocess.Popen(
            [sys.executable, "-c", SMALL_BUILD, *SMALL, "--out", str(folder), *extra], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()
        with self._seen:
            self.finished_at = time.monotonic()
            self.lines.append("<exit>")
            self._seen.notify_all()

    def wait_for(self, start: str, timeout_s: float = 180) -> None:
        with self._seen:
            found = self._seen.wait_for(lambda: any(l.startswith(start) or l == "<exit>" for l in self.lines), timeout_s)
        assert found and any(l.startswith(start) for l in self.lines), f"no {start!r}: {self.lines}"

    def go(self) -> None:
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def finish(self, timeout_s: float = 300) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def _run_concurrently(folder: Path, first: tuple[str, ...], *others: tuple[str, ...]) -> list[Build]:
    """The first build, and the others let go when the first has an unnamed graph in the folder."""
    builds = [Build(folder, *extra) for extra in (first, *others)]
    try:
        for build in builds:
            build.wait_for("loaded")
        builds[0].go()
        builds[0].wait_for(FIRST_UNWRITTEN)
        for build in builds[1:]:
            build.go()
        for build in builds:
            build.finish()
    finally:
        for build in builds:
            if build.process.poll() is None:
                build.process.kill()
                build.process.wait()
    return builds


def _unnamed_files(folder: Path) -> list[str]:
    """Files the manifest does not name (graphs' validation reports aside)."""
    manifest = load_manifest(folder)
    named = {f for r in manifest.components.values()
             for f in (r.onnx_file, r.engine.file, r.cpu_graph.file if r.cpu_graph else None) if f}
    named |= {manifest.check_set.file} if manifest.check_set is not None else set()
    named |= {f.replace(".onnx", ".validation.json") for f in named}
    files = [p for p in folder.rglob("*") if p.is_file() and p.name not in ("manifest.json", "report.json")]
    return sorted(p.relative_to(folder).as_posix() for p in files if p.relative_to(folder).as_posix() not in named)


def _upscale(folder: Path) -> torch.Tensor:
    x = torch.randn(1, 32, 8, 12, generator=torch.Generator().manual_seed(4))
    with Upscaler.load(folder, backend="onnxruntime", device="cpu") as upscaler:
        return upscaler.upscale(x, scale=2, seed=3)


def _check_whole(folder: Path, builds: list[Build]) -> None:
    """Every build succeeded, the later ones after waiting for the first, and the folder is the
    whole result of the one that finished last."""
    for build in builds:
        assert build.process.returncode == 0, build.output
    for build in builds[1:]:
        assert f"waiting for the build in progress in {folder} to finish (pid " in build.output, build.output
        assert build.output.count("onnx: reused (unchanged inputs)") == 2, build.output  # the first one's graphs
    manifest = load_manifest(folder)  # every file it names is there with its hash
    assert set(manifest.components) == {"cond_encoder", "unet"}
    last = max(builds, key=lambda build: build.finished_at)
    assert manifest.build_options["max_batch"] == (2 if "--max-batch" in last.extra else 4), last.extra
    assert _unnamed_files(folder) == [] and not (folder / LOCK_NAME).exists()
    _upscale(folder)


def test_three_builds_into_a_fresh_folder_all_succeed_and_leave_it_whole(tmp_path):
    """The same command twice, and once with another --max-batch: the later two wait, then reuse."""
    folder = tmp_path / "fresh"
    builds = _run_concurrently(folder, (), (), ("--max-batch", "2"))
    assert f"(pid {builds[0].process.pid} on " in builds[1].output  # the holder is named
    _check_whole(folder, builds)


def test_two_builds_over_a_working_folder_and_the_runtime_loading_it_meanwhile(small_artifacts, tmp_path):
    folder = tmp_path / "working"
    shutil.copytree(small_artifacts, folder)
    failures: list[str] = []
    loads = 0
    stop = threading.Event()

    def load_repeatedly() -> None:  # what a server (re)starting during the builds does
        nonlocal loads
        while not stop.wait(0.3):
            try:
                with Upscaler.load(folder, backend="onnxruntime", device="cpu"):
                    loads += 1
            except Exception as exc:  # noqa: BLE001 - every failure is the finding
                failures.append(f"{type(exc).__name__}: {exc}")

    loader = threading.Thread(target=load_repeatedly, daemon=True)
    loader.start()
    try:
        builds = _run_concurrently(folder, ("--seed", "1"), ("--seed", "1", "--max-batch", "2"))
    finally:
        stop.set()
        loader.join(timeout=60)
    _check_whole(folder, builds)
    assert loads > 0 and failures == [], failures[:3]


def test_no_wait_refuses_in_one_line_while_another_build_holds_the_folder(tmp_path):
    folder = tmp_path / "held"
    folder.mkdir()
    (folder / "keep.txt").write_text("a user's file")
    with BuildLock(folder, log=lambda line: None):
        holder = (folder / LOCK_NAME).read_text()
        assert holder.startswith(f"pid {os.getpid()} on ") and "started" in holder
        done = subprocess.run([sys.executable, "-c", SMALL_BUILD, *SMALL, "--out", str(folder), "--no-wait"],
                              cwd=ROOT, input="\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stderr == (f"error: {folder} is being built by another build ({holder.strip()}); wait for it to "
                           "finish, or run without --no-wait to wait for it\n")
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]  # nothing written, the lock file gone


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    folder = tmp_path / "killed"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from export.pipeline.lock import BuildLock\n"
         "with BuildLock(Path(sys.argv[1])):\n    time.sleep(600)", str(folder)],
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 60
        while not (folder / LOCK_NAME).is_file() or not (folder / LOCK_NAME).read_text():
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.05)
        with pytest.raises(FolderBusyError, match=f"pid {holder.pid} "):
            with BuildLock(folder, wait=False):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert (folder / LOCK_NAME).exists()  # killed: its file stays, its lock does not
    with BuildLock(folder, wait=False, log=lambda line: None):
        assert (folder / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")
    assert not (folder / LOCK_NAME).exists()


def test_a_waiting_build_takes_over_when_the_holder_removes_the_folder_it_made(tmp_path):
    """The holder made the folder and failed: it removes the folder, lock file included, before
    letting go; the waiter must not go on holding a lock on that deleted file."""
    folder = tmp_path / "made" / "out"
    first = BuildLock(folder, log=lambda line: None).__enter__()
    assert first.made == [tmp_path / "made", folder]
    taken = threading.Event()
    logged: list[str] = []

    def second() -> None:
        with BuildLock(folder, log=logged.append):
            taken.set()
            assert (folder / LOCK_NAME).is_file()
            with pytest.raises(FolderBusyError):  # it holds the folder's current lock file
                with BuildLock(folder, wait=False):
                    pass

    thread = threading.Thread(target=second)
    thread.start()
    deadline = time.monotonic() + 30
    while not logged:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not taken.is_set() and logged[0].startswith(f"waiting for the build in progress in {folder} to finish (pid ")
    first.release(failed=True)
    thread.join(timeout=30)
    assert taken.is_set() and not thread.is_alive()


def test_check_output_folder_creates_nothing(tmp_path):
    check_output_folder(tmp_path / "new" / "deeper")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(BuildError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "file" / "below")


# -- a failed build leaves no new folder ---------------------------------------------------------

def _calibration_cases(tmp_path: Path) -> dict[str, list[str]]:
    from safetensors.torch import save_file

    files = tmp_path / "calib_files"
    files.mkdir()
    cases = {"missing file": [str(files / "absent.safetensors")]}
    (files / "empty").mkdir()
    cases["empty folder"] = [str(files / "empty")]
    for name, tensor in {
        "not a latent": torch.zeros(3, 4),
        "16 channels": torch.zeros(1, 16, 8, 8),
        "NaN": torch.full((1, 32, 8, 8), float("nan")),
        "odd size": torch.zeros(1, 32, 9, 8),
    }.items():
        path = files / f"{name.replace(' ', '_')}.safetensors"
        save_file({"latents": tensor}, str(path))
        cases[name] = [str(path)]
    return cases


def test_builds_refused_for_their_calibration_leave_no_new_folder(tmp_path, capsys):
    for name, calib in _calibration_cases(tmp_path).items():
        out = tmp_path / "new" / name.replace(" ", "_")
        code = main(["--target", "rtx4090", "--random-weights", "--precision", "int8", "--out", str(out),
                     "--calib", *calib])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert not (tmp_path / "new").exists(), name


def test_a_build_that_fails_inside_the_pipeline_removes_the_folder_it_made(small_models, tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise BuildError("exporter failed")

    monkeypatch.setattr(graph, "export_and_validate", failing)
    settings = BuildSettings(target=PRESETS["rtx4090"].with_range(64, 512), precision="fp16", vae_precision="fp32")
    with pytest.raises(BuildError, match="exporter failed"):
        build_artifacts(small_models, settings, tmp_path / "a" / "b", log=lambda line: None)
    assert list(tmp_path.iterdir()) == []  # both folders it made are gone
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(BuildError, match="exporter failed"):
        build_artifacts(small_models, settings, existing, log=lambda line: None)
    assert existing.is_dir() and list(existing.iterdir()) == []  # not made by the build: kept


# -- a load that straddles the end of a build -----------------------------------------------------

def _finish_a_build(folder: Path) -> None:
    """What the end of a build does to ``folder``: its graphs under new names, the new manifest
    renamed into place, then the files only the old manifest named deleted."""
    manifest = json.loads((folder / "manifest.json").read_text())
    old = []
    for record in manifest["components"].values():
        graph = record["onnx"]
        source = folder / graph["file"]
        graph["file"] = graph["file"].replace("onnx/", "onnx/next-", 1)
        (folder / graph["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / graph["file"])
        old.append(source)
    (folder / "manifest.json.partial").write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(folder / "manifest.json.partial", folder / "manifest.json")
    for path in old:
        path.unlink()


@pytest.mark.parametrize("backend", ["onnxruntime", "auto"])
def test_a_load_that_read_the_old_manifest_when_a_build_finished_loads_the_new_one(
        small_artifacts, tmp_path, monkeypatch, backend):
    folder = tmp_path / "artifacts"
    shutil.copytree(small_artifacts, folder)
    real = onnxruntime_backend.OnnxRuntimeBackend
    opened: list[dict] = []

    class BuildFinishesNow(real):  # the graphs' paths are read from the old manifest; then the build ends
        def __init__(self, graphs, *args, **kwargs):
            if not opened:
                _finish_a_build(folder)
            opened.append(graphs)
            super().__init__(graphs, *args, **kwargs)

    monkeypatch.setattr(onnxruntime_backend, "OnnxRuntimeBackend", BuildFinishesNow)
    pretend_cpu(monkeypatch, WITHOUT_BF16)  # auto on the CPU's fp32 path: ONNX Runtime first
    with Upscaler.load(folder, backend=backend, device="cpu") as upscaler:
        assert upscaler.backend_name == "onnxruntime-cpu" and "onnxruntime" not in upscaler.skipped_backends
        assert all("onnx/next-" in record.onnx_file for record in upscaler.manifest.components.values())
        assert upscaler.upscale(torch.randn(1, 32, 8, 8), seed=1).shape == (1, 32, 16, 16)
    assert len(opened) == 2 and "onnx/next-" not in str(opened[0]["unet"]) and "onnx/next-" in str(opened[1]["unet"])

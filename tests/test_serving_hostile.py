"""Hostile checks of serving: what a careless user, an impatient operator or a process manager does.

Each test starts at most one server (``python -m runtime.serve`` on loopback ports, the small
folder), bounds every wait and stops whatever it started, Triton's model processes included.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="serving needs the serve extra: pip install -e '.[serve]'")
httpclient = pytest.importorskip("tritonclient.http", reason="the serving tests' client is tritonclient (serve extra)")

from engines.errors import FlowUpscalerError
from runtime.serving.repository import (
    MODEL_NAME,
    ServedModel,
    this_python_path,
    write_repository,
)
from runtime.serving.server import Ports
from tests.test_serving_service import service_environment

ROOT = Path(__file__).resolve().parents[1]
READY_S = 120
STUB = b"triton_python_backend_stub"


def _ports() -> Ports:
    return Ports.free()


def _serve(folder: Path, ports: Ports, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "runtime.serve", str(folder), "--host", "127.0.0.1", "--backend", "onnxruntime",
               "--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics), *extra]
    return subprocess.Popen(command, cwd=ROOT, env=service_environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


class _Output:
    """The command's output, read on a thread; ``wait_for`` a line with bounded time."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, needle: str, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: any(needle in line for line in self.lines), timeout_s)

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "\n".join(self.lines)


def _processes(name: bytes) -> dict[int, list[bytes]]:
    """Command lines of the processes whose program ends with ``name``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arguments and arguments[0].endswith(name):
            found[int(entry.name)] = arguments
    return found


def _triton_of(ports: Ports) -> tuple[int, list[bytes]] | None:
    for pid, arguments in _processes(b"tritonserver").items():
        if str(ports.http).encode() in arguments:
            return pid, arguments
    return None


def _stubs_of(triton_pid: int) -> dict[int, list[bytes]]:
    """The Python backend's model processes of one tritonserver (the stub names its parent's pid)."""
    return {pid: args for pid, args in _processes(STUB).items() if str(triton_pid).encode() in args[1:]}


def _kill_stubs(stubs: dict[int, list[bytes]]) -> None:
    """Clean up after a leak: the stubs (ours, by pid) and the shared memory regions they name."""
    for pid, arguments in stubs.items():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for argument in arguments:
            if argument.startswith(b"triton_python_backend_shm_region_"):
                Path("/dev/shm", argument.decode()).unlink(missing_ok=True)


def _end(process: subprocess.Popen, triton: tuple[int, list[bytes]] | None) -> None:
    """Whatever a test started is gone afterwards: the command, its server, the server's stubs."""
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)
    if triton is not None:
        try:
            os.kill(triton[0], signal.SIGKILL)
        except ProcessLookupError:
            pass
        _kill_stubs(_stubs_of(triton[0]))


def _inputs(batch: int = 1, side: int = 8) -> list:
    arrays = [("latents", np.zeros((batch, 32, side, side), np.float32), "FP32"),
              ("scale", np.full((batch, 1), 2, np.int32), "INT32"), ("seed", np.zeros((batch, 1), np.int64), "INT64")]
    inputs = []
    for name, array, dtype in arrays:
        tensor = httpclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


# -- the repository writer must never delete the artifact folder it is asked to serve -----------


@pytest.mark.parametrize("inside", ["flow_upscaler/1/artifacts", "flow_upscaler"])
def test_rewriting_a_repository_never_deletes_the_artifact_folder(small_artifacts, tmp_path, inside):
    """A folder copied by an earlier --copy-artifacts (models/flow_upscaler/1/artifacts), or a folder
    that happens to be called flow_upscaler inside DIR, is served with --write-repository DIR: the old
    model folder is replaced, and with it the artifact folder the new config.pbtxt names. Either
    refuse (the folder would be replaced) or keep it; never exit 0 pointing at a deleted folder."""
    repository = tmp_path / "models"
    artifacts = repository / inside
    shutil.copytree(small_artifacts, artifacts)
    model = ServedModel(artifacts=artifacts, max_batch=4, python_path=this_python_path())
    try:
        written = write_repository(repository, model)
    except FlowUpscalerError:
        written = None
    assert (artifacts / "manifest.json").is_file(), f"the artifact folder {artifacts} was deleted by the write"
    if written is not None:
        config = (written / "config.pbtxt").read_text()
        named = config.split('key: "artifacts" value: { string_value: "', 1)[1].split('"', 1)[0]
        assert (written / "1" / named / "manifest.json").is_file(), f"config.pbtxt names {named}, which is gone"


# -- shutdown: a second signal, and a signal while the model loads -------------------------------


def test_a_second_signal_during_shutdown_is_no_crash_and_cleans_up(small_artifacts):
    """Ctrl-C pressed again while the server drains (an open client connection keeps Triton in its
    exit timeout): no traceback, the server killed, its workspace removed."""
    ports = _ports()
    process = _serve(small_artifacts, ports)
    output = _Output(process)
    triton = None
    try:
        assert output.wait_for("ready in", READY_S), output.lines
        triton = _triton_of(ports)
        assert triton is not None
        backends = Path(triton[1][triton[1].index(b"--backend-directory") + 1].decode())
        workspace = backends.parent
        assert workspace.name.startswith("flow-upscaler-triton-") and workspace.is_dir()
        client = httpclient.InferenceServerClient(f"127.0.0.1:{ports.http}")  # kept open: Triton waits for it
        client.infer(MODEL_NAME, _inputs())
        process.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        client.close()
        text = output.text()
        assert "Traceback" not in text, text
        assert process.returncode in (0, 1, 130), (process.returncode, text)
        deadline = time.monotonic() + 30
        while _triton_of(ports) is not None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _triton_of(ports) is None, "tritonserver left running"
        assert not workspace.exists(), f"the server's workspace {workspace} was left behind"
    finally:
        _end(process, triton)
        if triton is not None:
            shutil.rmtree(Path(triton[1][triton[1].index(b"--backend-directory") + 1].decode()).parent,
                          ignore_errors=True)


def _first_stub(process: subprocess.Popen, output: _Output, ports: Ports) -> tuple[tuple[int, list[bytes]], int, float]:
    """The server, and the first model process it starts (Triton's model-level stub) with when it appeared."""
    assert output.wait_for(f"loading: {MODEL_NAME}", READY_S), output.lines
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        triton = _triton_of(ports)
        stubs = _stubs_of(triton[0]) if triton is not None else {}
        if stubs:
            return triton, min(stubs), time.monotonic()
        assert process.poll() is None, output.lines
        time.sleep(0.005)
    raise AssertionError(f"no model process started: {output.lines}")


def test_sigterm_while_the_model_loads_leaves_no_model_process(small_artifacts):
    """SIGTERM (systemd, Kubernetes, --ready-timeout expiring) while the folder loads: Triton has no
    signal handler yet and dies at once (exit code -15). If the Python backend's first stub is
    finishing then, it is orphaned and never exits (it also holds the command's output pipe, so the
    stop takes 5 s). The same happens to instance stubs (~1 GB each here; the GPU and its engines
    on a GPU server) when the exit timeout expires with requests in flight. stop() must take the
    server's whole process group down.

    The window is the end of the first stub's life, so this measures that life once (a normal
    start and stop, which must leave nothing either), then signals just before it ends."""
    lifetimes, leaks = [], []
    for attempt, before_end in enumerate([None, 0.08, 0.12]):
        ports = _ports()
        process = _serve(small_artifacts, ports)
        output = _Output(process)
        triton = None
        try:
            triton, first, seen = _first_stub(process, output, ports)
            if before_end is None:
                while Path(f"/proc/{first}").exists() and time.monotonic() - seen < 30:
                    time.sleep(0.005)
                lifetimes.append(time.monotonic() - seen)
                assert output.wait_for("ready in", READY_S), output.lines
            else:
                time.sleep(max(0.0, lifetimes[0] - before_end - (time.monotonic() - seen)))
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
            deadline = time.monotonic() + 8
            while (stubs := _stubs_of(triton[0])) and time.monotonic() < deadline:
                time.sleep(0.25)
            if stubs:
                leaks.append(f"attempt {attempt}: stubs {sorted(stubs)} outlived the command: {output.text()}")
                break
        finally:
            _end(process, triton)
    assert not leaks, leaks[0]


# -- paths ----------------------------------------------------------------------------------------


def test_a_folder_with_a_non_ascii_path_is_served_or_refused_clearly(small_artifacts, tmp_path):
    """Triton's Python backend stub runs an embedded interpreter whose file system encoding is ASCII
    (whatever LANG, LC_ALL or PYTHONUTF8 say), so the model cannot open '/data/modèle/...' and
    would fail to load with '... has no manifest.json', which the folder has. Serve it or refuse
    it before Triton starts, saying the path must be ASCII."""
    folder = tmp_path / "modèle" / "art"
    shutil.copytree(small_artifacts, folder)
    ports = _ports()
    process = _serve(folder, ports, "--ready-timeout", "120")
    output = _Output(process)
    triton = None
    try:
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline and process.poll() is None and not output.wait_for("ready in", 0.5):
            triton = triton or _triton_of(ports)
        triton = triton or _triton_of(ports)
        if output.wait_for("ready in", 0):
            client = httpclient.InferenceServerClient(f"127.0.0.1:{ports.http}")
            assert client.infer(MODEL_NAME, _inputs()).as_numpy("upscaled").shape == (1, 32, 16, 16)
            client.close()
            return
        process.wait(timeout=60)
        text = output.text()
        assert process.returncode == 1, text
        assert "no manifest.json" not in text, f"a folder that has manifest.json is refused as lacking it:\n{text}"
        assert "ascii" in text.lower(), text
        assert not list(Path(tempfile.gettempdir()).glob(f"flow-upscaler-*-{process.pid}-*")), "a refusal left temp folders"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        _end(process, triton)

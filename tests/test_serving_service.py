"""Serving started as a service starts it: this environment's python by path, no VIRTUAL_ENV, its
folder off PATH, and another Python first on PATH whose numpy cannot be imported (a stand-in for a
base interpreter with numpy 2, which the bundled Python backend stub was not built for).

Triton's Python backend stub takes its Python from the first ``python3`` on PATH, so a server that
inherited this PATH would run the model on the wrong Python. The other serving test modules start
their commands with ``service_env`` from here, so the whole suite runs the way services do.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import venv
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="serving needs the serve extra: pip install -e '.[serve]'")

from engines.errors import FlowUpscalerError
from runtime.serving.ready import ReadyCheck
from runtime.serving.repository import ServedModel, this_python_path, write_repository
from runtime.serving.server import Ports, ServeError, TritonServer, python_folder

ROOT = Path(__file__).resolve().parents[1]
READY_S = 120
FOREIGN_NUMPY = "numpy of the foreign python3 on PATH: the Python backend ran the wrong Python"


def _foreign_python(root: Path, borrow: bool = False) -> Path:
    """A virtual environment (no pip: a fraction of a second) whose numpy raises on import, or with
    ``borrow`` one that imports this environment's packages (a .pth file) under its own prefix."""
    venv.create(root, symlinks=True, with_pip=False)
    site = root / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    if borrow:  # addsitedir: the borrowed folders' own .pth files (an editable install's finder) count too
        borrowed = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
        (site / "borrowed.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in borrowed))
    else:
        (site / "numpy").mkdir(parents=True)
        (site / "numpy" / "__init__.py").write_text(f"raise ImportError({FOREIGN_NUMPY!r})\n")
    return root / "bin"


def _own_folders() -> set[str]:
    """This interpreter's folders that a shell with the environment activated has on PATH."""
    return {os.path.dirname(sys.executable), os.path.join(sys.prefix, "bin"), os.path.join(sys.exec_prefix, "bin")}


@functools.cache
def service_environment() -> dict[str, str]:
    """The environment of a service: a foreign python3 first on PATH, this environment's bin off
    it, no VIRTUAL_ENV (made once per session)."""
    root = Path(tempfile.mkdtemp(prefix="serving-test-foreign-python-"))
    atexit.register(shutil.rmtree, root, True)
    foreign = _foreign_python(root)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "CONDA_PREFIX")}
    rest = [p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p and p not in _own_folders()]
    env["PATH"] = os.pathsep.join([str(foreign), *rest])
    return env


@pytest.fixture()
def service_env() -> dict[str, str]:
    return service_environment()


def command(*args: str) -> list[str]:
    """``python -m`` with this environment's interpreter named by path, as a unit file names it."""
    return [sys.executable, "-m", *args]


def test_the_service_environment_has_a_foreign_python3_first(service_env):
    """The premise of the serving tests: what PATH calls python3 there is not this environment."""
    found = subprocess.run(["python3", "-c", "import sys; print(sys.prefix)"], env=service_env, capture_output=True,
                           text=True, timeout=60, check=True).stdout.strip()
    assert os.path.realpath(found) != os.path.realpath(sys.prefix)
    broken = subprocess.run(["python3", "-c", "import numpy"], env=service_env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert FOREIGN_NUMPY in broken.stderr


def test_the_server_gets_this_python_first_on_path(tmp_path):
    """What the server is started with: a folder whose python3 is this interpreter, this environment."""
    folder = python_folder(tmp_path)
    found = subprocess.run([str(folder / "python3"), "-c", "import sys, numpy; print(sys.prefix, numpy.__version__)"],
                           env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60, check=True)
    prefix, version = found.stdout.split()
    assert os.path.realpath(prefix) == os.path.realpath(sys.prefix) and version == np.__version__


class _StockServer(TritonServer):
    """The bundled tritonserver started as a user starts a stock one: the foreign python3 first on PATH."""

    def __init__(self, *args, foreign: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.foreign = foreign

    def environment(self, workspace: Path) -> dict[str, str]:
        env = super().environment(workspace)
        env["PATH"] = os.pathsep.join([self.foreign, env["PATH"]])
        return env


def test_a_written_repository_on_a_foreign_python_fails_to_load_naming_it(small_artifacts, tmp_path):
    """--write-repository served by a Triton whose first python3 is another environment (one that
    can import numpy, so the stub itself starts): the model refuses to load and names both
    environments (not: ready, then wrong outputs, as with a base Python's numpy 2)."""
    foreign = _foreign_python(tmp_path / "foreign", borrow=True)
    model = ServedModel(artifacts=small_artifacts, max_batch=4, backend="onnxruntime", python_path=this_python_path())
    repository = write_repository(tmp_path / "models", model).parent
    server = _StockServer(repository, ports=Ports.free(), foreign=str(foreign))
    try:
        server.start()
        with pytest.raises(ServeError) as refused:
            server.wait_ready(READY_S)
    finally:
        server.stop()
    message = str(refused.value)
    foreign_env = str(foreign.parent)
    assert f"written for the Python environment {sys.prefix}" in message and foreign_env in message, message
    assert "first python3 on the server's PATH" in message, message


SITECUSTOMIZE = '''
"""Test only: in Triton's Python backend stub (which runs isolated: PYTHONPATH does not reach it,
this environment's site-packages does), every served result comes back off by 0.5, patched in when
the model imports runtime.serving.requests."""
import os
import sys

if os.path.basename(os.path.realpath("/proc/self/exe")) == "triton_python_backend_stub":

    class _Wrong:
        def find_spec(self, name, path=None, target=None):
            if name != "runtime.serving.requests":
                return None
            sys.meta_path.remove(self)
            import importlib.util

            spec = importlib.util.find_spec(name)
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                run = module._run
                module._run = lambda upscaler, members: [
                    type(r)(r.upscaled + 0.5, r.image) for r in run(upscaler, members)
                ]

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Wrong())
'''


def test_the_ready_check_stops_a_server_that_answers_wrongly(small_artifacts, tmp_path, service_env):
    """A real server whose model loads and reports ready but answers wrongly: the command runs in an
    environment whose sitecustomize shifts every result in the model's processes (its stub runs this
    environment, the command's). The command stops it and exits 1 saying what came back, never ready."""
    bin_folder = _foreign_python(tmp_path / "wrong", borrow=True)
    site = next((tmp_path / "wrong" / "lib").glob("python*/site-packages"))
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    ports = Ports.free()
    process = subprocess.Popen(
        [str(bin_folder / "python"), "-m", "runtime.serve", str(small_artifacts), "--backend", "onnxruntime",
         *_port_flags(ports)],
        cwd=ROOT, env=service_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = until_ready_or_exit(process, READY_S)
    output = "\n".join(lines)
    assert process.returncode == 1, output
    error = lines[-1]
    assert error.startswith("error: stopped the started server: the ready check failed: a 2x request"), output
    assert "values that differ from Upscaler's by up to 0.5" in error, error
    assert "Traceback" not in output


def until_ready_or_exit(process: subprocess.Popen, timeout_s: float) -> list[str]:
    """The command's output until it exits; fails (and stops it) if it prints ready or runs past ``timeout_s``."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    try:
        while process.poll() is None and time.monotonic() < deadline and not any("ready in" in x for x in lines):
            time.sleep(0.2)
        assert not any("ready in" in x for x in lines), f"the command called the server ready: {lines}"
        assert process.poll() is not None, f"the command still runs after {timeout_s} s: {lines}"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    reader.join(timeout=10)
    return lines


def _port_flags(ports: Ports) -> list[str]:
    return ["--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)]


def test_the_ready_check_names_what_came_back(small_artifacts):
    """Without a server: nothing listening, and a check whose expectation cannot be met."""
    check = ReadyCheck.shapes_only(8)
    with pytest.raises(FlowUpscalerError, match=r"got no answer \(.*refused"):
        check.run(f"127.0.0.1:{Ports.free().http}", 5)
    assert check.expected_shape == (1, 32, 16, 16) and "of the right form" in check.describe()

"""A real Triton Inference Server on this machine: the ``tritonserver`` that the nvidia-pytriton
wheel bundles (Triton 2.51 with the Python backend only), run as a child process on a model
repository.

A runner in Polygraphy's sense: the constructor captures the configuration, ``start`` launches,
``wait_ready`` returns once the server and its models are ready (or raises with the reason the
model did not load), ``stop`` sends SIGTERM (Triton finishes in-flight requests) and kills what is
left after a grace period. Triton's own log goes to a file and, with ``echo``, to a callback.

Length: over 350 lines because starting, watching and stopping one tritonserver process (ports
and hosts, its stack limit, scratch folders, its process group) is one resource's lifetime;
restarting it is ``supervisor``'s.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import ipaddress
import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engines.errors import FlowUpscalerError

from .repository import MODEL_NAME

logger = logging.getLogger(__name__)

SERVE_EXTRA = "install the serving extra: pip install -e '.[serve]' (nvidia-pytriton bundles the server)"
# Triton's grace period on SIGTERM: it waits for open HTTP connections (clients' keep-alive ones
# too), then in-flight requests, then unloads; past it, it exits 1 at once.
EXIT_TIMEOUT_S = 10
_PR_SET_PDEATHSIG = 1
# Triton 2.51's HTTP frontend overflows a thread's stack on a request body of about half the stack
# and dies (SIGSEGV), binary tensors or JSON alike (measured: an 8 MiB stack, the usual default,
# passes 4 MB and crashes on 5 MB; 64 MiB passes 24 MB and crashed on 30 MB once, 36 MB always).
# Its threads get the stack limit the server starts with, so it starts with at least this much
# (address space, not memory: Triton runs ~60 threads). gRPC has no such limit.
STACK_FLOOR_BYTES = 64 * 2**20


class ServeError(FlowUpscalerError, RuntimeError):
    """The server cannot start here, or its model did not load."""


SCRATCH_PREFIX = "flow-upscaler-"


def scratch_dir(kind: str) -> Path:
    """A temporary folder that names this process, so that if it is killed (no cleanup runs) the
    next run deletes the folder."""
    _sweep_orphaned_scratch()
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{kind}-{os.getpid()}-"))


def _sweep_orphaned_scratch() -> None:
    for path in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*-*"):
        parts = path.name[len(SCRATCH_PREFIX):].split("-")
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls, host: str = "127.0.0.1") -> Ports:
        """Three distinct ports nothing listens on now (for tests and benchmarks)."""
        found: list[int] = []
        while len(found) < 3:
            port = free_port(host)
            if port not in found:
                found.append(port)
        return cls(*found)

    def named(self) -> dict[str, int]:
        return {"--http-port": self.http, "--grpc-port": self.grpc, "--metrics-port": self.metrics}


LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Hosts:
    """The address each endpoint listens on. Triton 2.51's HTTP server (inference and metrics) aborts
    on one crafted JSON request (a declared shape of terabytes, allocated while parsing), which its
    gRPC server refuses with INVALID_ARGUMENT; so a public host gets gRPC only, HTTP stays on this
    machine, unless ``public_http`` says otherwise."""

    http: str = LOOPBACK
    grpc: str = LOOPBACK
    metrics: str = LOOPBACK

    @classmethod
    def for_host(cls, host: str, public_http: bool = False) -> Hosts:
        if public_http or is_loopback(host):
            return cls(host, host, host)
        return cls(LOOPBACK, host, LOOPBACK)

    def named(self) -> dict[str, str]:
        return {"--http-address": self.http, "--grpc-address": self.grpc, "--metrics-address": self.metrics}


def check_ports_free(hosts: Hosts, ports: Ports) -> None:
    """Refuse an unknown host or ports another process holds, by name, before the server is started."""
    values = list(ports.named().values())
    if len(set(values)) != len(values):
        raise ServeError(f"the HTTP, gRPC and metrics ports must differ, got {ports.named()}")
    for host, (flag, port) in zip(hosts.named().values(), ports.named().items()):
        _check_port_free(host, flag, port)


def _check_port_free(host: str, flag: str, port: int) -> None:
    try:
        family, _, _, _, address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ServeError(f"--host {host} is not an address of this machine ({exc.strerror}); "
                         "give 0.0.0.0 (all), 127.0.0.1 (this machine only) or one of its addresses") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address[0], port, *address[2:]))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServeError(f"{flag} {port} on {host} is in use; pick another with {flag}") from None
            raise ServeError(f"cannot listen on {host} port {port} ({exc.strerror}); check --host and {flag}") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class BundledTriton:
    """Where the nvidia-pytriton wheel keeps the server, its libraries and the Python backend."""

    server: Path
    libraries: Path
    python_backend: Path
    stub: Path

    @classmethod
    def find(cls) -> BundledTriton:
        try:
            from pytriton.utils.distribution import (
                get_libs_path,
                get_root_module_path,
                get_stub_path,
            )
        except ModuleNotFoundError as exc:
            if exc.name is None or not exc.name.startswith("pytriton"):
                raise
            raise ServeError(f"the Triton server is not installed; {SERVE_EXTRA}") from None
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        root = get_root_module_path() / "tritonserver"
        # the wheel's libraries sit beside the package (nvidia_pytriton.libs); pytriton takes a package
        # outside this environment's site folders (one this environment imports by a .pth) for an
        # editable install and names its source tree's folder instead
        libraries = next((p for p in (root.parents[1] / "nvidia_pytriton.libs", Path(get_libs_path())) if p.is_dir()),
                         Path(get_libs_path()))
        found = cls(root / "bin" / "tritonserver", libraries, root / "backends" / "python", Path(get_stub_path(version)))
        if not found.stub.is_file():
            raise ServeError(
                f"the bundled Triton has no Python backend for Python {version} (it has "
                f"{', '.join(sorted(p.name for p in found.stub.parents[1].iterdir()))}); run with one of those"
            )
        for path in (found.server, found.libraries, found.python_backend):
            if not path.exists():
                raise ServeError(f"the nvidia-pytriton install is incomplete ({path} is missing); reinstall it: {SERVE_EXTRA}")
        return found

    def backend_directory(self, under: Path) -> Path:
        """A backends folder whose Python backend has this interpreter's stub (the wheel ships one
        per Python version), as pytriton itself prepares it; links, not copies."""
        python = under / "backends" / "python"
        python.mkdir(parents=True)
        for item in self.python_backend.iterdir():
            if item.name != "__pycache__":
                (python / item.name).symlink_to(item)
        (python / "triton_python_backend_stub").symlink_to(self.stub)
        return python.parent

    def environment(self, python_folder: Path) -> dict[str, str]:
        """The server's libraries, this interpreter's libpython for the Python backend's stub
        (without it the stub may load the system's libpython instead), and ``python_folder`` first
        on PATH: the stub's embedded Python takes its environment (``sys.prefix``, so numpy and
        every package it imports) from the first ``python3`` on PATH, not from this process."""
        if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
            raise ServeError(
                f"this Python ({sys.executable}) has no shared libpython, which Triton's Python backend "
                "loads; use a Python built with --enable-shared (distribution, pyenv with "
                "PYTHON_CONFIGURE_OPTS=--enable-shared, or conda)"
            )
        env = dict(os.environ)
        folders = [str(self.libraries), sysconfig.get_config_var("LIBDIR")]
        if env.get("LD_LIBRARY_PATH"):
            folders.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(folders)
        env["PATH"] = os.pathsep.join([str(python_folder), *[p for p in env.get("PATH", "").split(os.pathsep) if p]])
        return env


def python_folder(workspace: Path) -> Path:
    """A folder whose ``python3`` is this interpreter in this environment, for the front of the
    server's PATH (as pytriton does it): a virtual environment's ``bin`` (its ``pyvenv.cfg`` makes
    the prefix), else this installation's ``bin`` if its ``python3`` is this interpreter, else a
    link to this interpreter in ``workspace``. Without it a service (no activated environment)
    gets whatever ``python3`` PATH has: another Python's numpy (2.x, which the bundled stub was
    not built for: every output comes back empty) or no packages at all."""
    if sys.prefix != sys.base_prefix:
        folder = Path(sys.prefix) / "bin"
        if not (folder / "python3").is_file():
            raise ServeError(
                f"the virtual environment {sys.prefix} has no bin/python3, which Triton's Python backend "
                "starts; recreate it with python3 -m venv"
            )
        return folder
    installed = Path(sys.exec_prefix) / "bin" / "python3"
    if installed.is_file() and os.path.realpath(installed) == os.path.realpath(sys.executable):
        return installed.parent
    folder = workspace / "python"
    folder.mkdir()
    (folder / "python3").symlink_to(os.path.realpath(sys.executable))
    return folder


def http_stack_bytes(max_request_bytes: int = 0) -> int:
    """The stack limit for Triton under which its HTTP frontend takes bodies of ``max_request_bytes``
    (three times that, and 16 MiB for the JSON header and the frontend's own frames), at least
    ``STACK_FLOOR_BYTES``, in whole MiB."""
    need = 3 * max_request_bytes + 16 * 2**20
    return max(STACK_FLOOR_BYTES, -(-need // 2**20) * 2**20)


def http_body_limit(stack_bytes: int) -> int:
    """The largest HTTP request body Triton takes under ``stack_bytes`` (the inverse of ``http_stack_bytes``)."""
    return (stack_bytes - 16 * 2**20) // 3


def _stack_limit(stack_bytes: int) -> tuple[int, int]:
    """RLIMIT_STACK for the server: ``stack_bytes`` or this process's limit if larger, within the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    wanted = stack_bytes if soft == resource.RLIM_INFINITY else max(soft, stack_bytes)
    if hard != resource.RLIM_INFINITY and wanted > hard:
        logger.warning("Triton's stack limit stays at the hard limit %d bytes (%d wanted): HTTP bodies over about "
                       "half of it crash Triton; raise it with ulimit -Hs", hard, wanted)
        wanted = hard
    return wanted, hard


def _child_setup(stack: tuple[int, int]) -> Callable[[], None]:
    """A function for the child, between fork and exec: the stack limit (``http_stack_bytes``), and
    SIGTERM from Linux when the launching process dies (even by SIGKILL), so no server outlives it.
    ``prctl`` is looked up here, in the parent: the child then makes two system calls and loads nothing."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the server is stopped by stop() only
        prctl = None

    def setup() -> None:
        resource.setrlimit(resource.RLIMIT_STACK, stack)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return setup


class TritonServer:
    """The bundled ``tritonserver`` on one model repository, on ``host`` and ``ports``; a host other
    than loopback gets gRPC only unless ``public_http`` (see ``Hosts``). ``start`` may be called
    again after the server stopped (``stop``): a new process on the same ports."""

    def __init__(
        self,
        repository: Path,
        host: str = "127.0.0.1",
        ports: Ports = Ports(),
        echo: Callable[[str], None] | None = None,
        log_verbose: int = 0,
        exit_timeout_s: int = EXIT_TIMEOUT_S,
        stack_bytes: int = STACK_FLOOR_BYTES,
        public_http: bool = False,
    ):
        """``stack_bytes``: the server's stack limit, which bounds the HTTP bodies it survives
        (``http_stack_bytes`` of the largest request)."""
        self.repository, self.host, self.ports, self.echo = Path(repository), host, ports, echo
        self.hosts = Hosts.for_host(host, public_http)
        self.log_verbose, self.exit_timeout_s, self.stack_bytes = log_verbose, exit_timeout_s, stack_bytes
        self.process: subprocess.Popen | None = None
        self._workspace: Path | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=400)
        self._reader: threading.Thread | None = None

    @property
    def address(self) -> str:
        """host:port of the HTTP endpoint, as tritonclient takes it."""
        host = LOOPBACK if self.hosts.http in ("0.0.0.0", "") else self.hosts.http
        return f"{host}:{self.ports.http}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def listening(self) -> dict[str, str]:
        """Where each endpoint listens, host:port by protocol name."""
        return {name: f"{host}:{port}" for name, host, port in zip(
            ("HTTP", "gRPC", "metrics"), self.hosts.named().values(), self.ports.named().values())}

    def command(self, backends: Path) -> list[str]:
        return [
            str(BundledTriton.find().server),
            "--model-repository", str(self.repository),
            "--backend-directory", str(backends),
            *[v for flag, host in self.hosts.named().items() for v in (flag, host)],
            *[str(v) for flag, port in self.ports.named().items() for v in (flag, port)],
            "--exit-timeout-secs", str(self.exit_timeout_s),
            "--log-verbose", str(self.log_verbose),
        ]

    def environment(self, workspace: Path) -> dict[str, str]:
        """The server's environment (see ``BundledTriton.environment``)."""
        return BundledTriton.find().environment(python_folder(workspace))

    def start(self) -> None:
        check_ports_free(self.hosts, self.ports)
        bundle = BundledTriton.find()
        self._workspace = scratch_dir("triton")
        self._tail.clear()
        try:
            env = self.environment(self._workspace)
            command = self.command(bundle.backend_directory(self._workspace))
        except BaseException:
            shutil.rmtree(self._workspace, ignore_errors=True)
            self._workspace = None
            raise
        logger.info("starting %s", " ".join(command))
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", preexec_fn=_child_setup(_stack_limit(self.stack_bytes)),  # noqa: PLW1509 - two syscalls
            start_new_session=True,  # its model processes share its group: stop() reaps what it leaves
        )
        self._reader = threading.Thread(target=self._read_log, name="triton-log", daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        for line in self.process.stdout:
            self._tail.append(line.rstrip("\n"))
            if self.echo is not None:
                self.echo(line.rstrip("\n"))

    def log_tail(self) -> list[str]:
        return list(self._tail)

    def wait_log(self, timeout_s: float = 1) -> None:
        """Once Triton exited: wait until its last log lines are read (a crash's come last)."""
        if self._reader is not None:
            self._reader.join(timeout=timeout_s)

    def is_ready(self) -> bool:
        """Server ready (Triton's strict readiness: every model loaded)."""
        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from ``start`` to ready; raises ``ServeError`` with the model's load error if the
        server exits, or after ``timeout_s`` from now."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.wait_log()
                raise ServeError(f"the Triton server stopped before it was ready: {self.failure()}")
            if self.is_ready():
                return time.monotonic() - self.started
            time.sleep(0.2)
        raise ServeError(f"the Triton server was not ready after {timeout_s:.0f} s (model load or warm-up too slow?); "
                         f"raise --ready-timeout. Last log lines: {' | '.join(self.log_tail()[-5:])}")

    def failure(self) -> str:
        """Why Triton stopped, from its exit and its log: a crash by its signal and the lines before
        the stack trace, else the model's load error if any, else its last error lines."""
        code = self.process.returncode if self.process is not None else None
        if code is not None and code < 0:
            return f"it crashed ({_signal_name(-code)}): {' | '.join(self.crash_lines()) or 'no log lines'}"
        marker = f"failed to load '{MODEL_NAME}' version "
        for line in reversed(self._tail):
            if marker in line:
                reason = line.split(marker, 1)[1].split(": ", 1)[-1]
                return reason.split("\\n\\nAt:")[0].replace("\\n", " ").strip('" ')
        lines = [line for line in self._tail if not _NOISE.search(line)]
        errors = [line for line in lines if line.startswith(("error:", "E"))]
        return " | ".join((errors or lines)[-3:]) or f"exit code {code}"

    def crash_lines(self, count: int = 3) -> list[str]:
        """The log lines before a crash's stack trace (what Triton said it died of), or the last ones."""
        lines = list(self._tail)
        for index in range(len(lines) - 1, -1, -1):
            if lines[index].startswith("Signal ("):
                lines = lines[: index + 1]
                break
        return [line for line in lines if line.strip() and not _FRAME.match(line) and not _NOISE.search(line)][-count:]

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if Triton is still there 10 s after its exit timeout; then kills what
        it left behind and removes the workspace. Returns Triton's exit code (1 when its exit
        timeout expired; negative for a signal)."""
        timeout_s = self.exit_timeout_s + 10
        code = None
        try:
            if self.process is not None:
                if self.process.poll() is None:
                    self.process.send_signal(signal.SIGTERM)
                    try:
                        self.process.wait(timeout=timeout_s)
                    except subprocess.TimeoutExpired:
                        logger.warning("Triton did not stop within %.0f s of SIGTERM; killing it", timeout_s)
                        self.kill()
                        self.process.wait()
                code = self.process.returncode
                _reap_group(self.process.pid)
                if self._reader is not None:
                    self._reader.join(timeout=5)
        finally:
            if self._workspace is not None:
                shutil.rmtree(self._workspace, ignore_errors=True)
                self._workspace = None
        return code

    def kill(self) -> None:
        """SIGKILL the server now (``stop`` still reaps its model processes and workspace)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Lines of Triton's log that say nothing about why it stopped: a stack frame of its crash handler,
# and what a machine without a GPU or DCGM logs at every start.
_FRAME = re.compile(r"^\s*\d+# ")
_NOISE = re.compile(r"NVML|DCGM|CudaDriverHelper|Non-graceful termination")


def _signal_name(number: int) -> str:
    try:
        return f"{signal.Signals(number).name}, signal {number}"
    except ValueError:
        return f"signal {number}"


def _reap_group(group: int) -> None:
    """Kill the processes left in the server's process group after it exited (the Python backend's
    model processes of a server that was killed or timed out: they would hold memory, a GPU, and
    their shared memory regions, forever) and unlink those regions. Processes still finishing a
    normal exit get two seconds first."""
    deadline = time.monotonic() + 2
    while _group_members(group) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, arguments in _group_members(group).items():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        logger.warning("killed a model process Triton left behind (pid %d)", pid)
        for argument in arguments:
            if argument.startswith(b"triton_python_backend_shm_region"):
                Path("/dev/shm", argument.decode(errors="replace")).unlink(missing_ok=True)


def _group_members(group: int) -> dict[int, list[bytes]]:
    """pid -> command line of the processes in process group ``group`` (Linux /proc)."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[2]) == group:  # fields after the name: state, ppid, pgrp
                members[int(entry.name)] = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
    return members

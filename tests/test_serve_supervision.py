"""``python -m runtime.serve`` keeps the bundled Triton up and keeps its fragile HTTP server private.

Triton 2.51 aborts (std::bad_alloc, SIGABRT) on one ~250-byte HTTP/JSON request declaring a
latents tensor of [1, 128, 100000, 100000]: its JSON parser allocates the declared size. The
command restarts it, gives up after --max-crashes within --crash-window, and with a --host other
than loopback lets only gRPC (which refuses that request) listen there. The real bundled Triton
runs here, started as a service starts it (``service_environment``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="serving needs the serve extra: pip install -e '.[serve]'")
httpclient = pytest.importorskip("tritonclient.http", reason="the serving tests' client is tritonclient (serve extra)")
grpc = pytest.importorskip("grpc", reason="the serving tests' client is tritonclient[grpc] (serve extra)")

from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402 - after the skips

from runtime.serve import main
from runtime.serving.repository import MODEL_NAME
from runtime.serving.server import LOOPBACK, Ports, TritonServer
from runtime.serving.supervisor import CrashWindow, RestartPolicy
from tests.test_serving_hostile import _end, _inputs, _Output, _stubs_of, _triton_of
from tests.test_serving_service import service_environment

ROOT = Path(__file__).resolve().parents[1]
READY_S = 120
CRAFTED = json.dumps({"inputs": [
    {"name": "latents", "shape": [1, 128, 100000, 100000], "datatype": "FP32", "data": [0]},
    {"name": "scale", "shape": [1, 1], "datatype": "INT32", "data": [2]},
    {"name": "seed", "shape": [1, 1], "datatype": "INT64", "data": [0]},
]}).encode()


def _serve(folder: Path, ports: Ports, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "runtime.serve", str(folder), "--backend", "onnxruntime",
               "--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics), *extra]
    return subprocess.Popen(command, cwd=ROOT, env=service_environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _send_crafted(port: int) -> str:
    """POST the crafted JSON request; what came back (a crash gives no answer)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{MODEL_NAME}/infer", data=CRAFTED,
                                     method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"no answer ({exc})"


def _normal_request(port: int) -> np.ndarray:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        return client.infer(MODEL_NAME, _inputs()).as_numpy("upscaled")
    finally:
        client.close()


def test_the_back_off_doubles_to_its_cap_and_the_window_forgets_old_crashes():
    policy = RestartPolicy(max_crashes=3, window_s=10, first_delay_s=1, max_delay_s=30)
    assert [policy.delay_s(n) for n in (1, 2, 3, 4, 5, 6, 40)] == [1, 2, 4, 8, 16, 30, 30]
    now = [0.0]
    window = CrashWindow(policy, clock=lambda: now[0])
    counts = []
    for t in (0, 4, 11, 15, 16):  # 0 falls out of the 10 s window by 11, 4 by 15
        now[0] = t
        counts.append(window.record())
    assert counts == [1, 2, 2, 2, 3]
    assert not window.exhausted(2) and window.exhausted(3)


@pytest.mark.parametrize("argv, message", [
    (["--max-crashes", "0"], "argument --max-crashes: 0 is outside the accepted range 1..1000"),
    (["--crash-window", "0"], "argument --crash-window: 0 is outside the accepted range 1..86400"),
])
def test_supervision_flags_out_of_range_are_refused(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_public_http_on_loopback_is_refused_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path), "--public-http"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --public-http goes with a --host other than loopback") and err.count("\n") == 1


def test_a_crashed_server_comes_back_and_a_crash_loop_gives_up(small_artifacts):
    """The crafted request kills Triton; the command logs it, starts Triton again on the same
    ports, checks it, and it answers a normal request. The second crash within the window is the
    --max-crashes 2nd: the command stops and exits 1 saying why, leaving nothing behind."""
    ports = Ports.free()
    process = _serve(small_artifacts, ports, "--max-crashes", "2", "--crash-window", "600")
    output = _Output(process)
    tritons = []
    try:
        assert output.wait_for("ready in", READY_S), output.lines
        ready = next(line for line in output.lines if "ready in" in line)
        assert f"HTTP http://127.0.0.1:{ports.http}/" in ready, ready  # the default host: loopback only
        assert not any("warning" in line for line in output.lines), output.lines
        tritons.append(_triton_of(ports))
        crash = _crash(ports, output)
        assert "restarting it in 1 s on the same ports (crash 1 within 600 s; the service gives up at 2)" in crash, crash
        assert output.wait_for("restarted: ready again in", READY_S), output.lines
        tritons.append(_triton_of(ports))
        assert tritons[1] is not None and tritons[1][0] != tritons[0][0], tritons
        assert _stubs_of(tritons[0][0]) == {}, "the crashed server's model processes were left running"
        upscaled = _normal_request(ports.http)
        assert upscaled.shape == (1, 32, 16, 16) and np.isfinite(upscaled).all()

        _send_crafted(ports.http)
        process.wait(timeout=60)
        text = output.text()
        assert process.returncode == 1, text
        assert output.lines[-1].startswith("error: Triton stopped 2 times within 600 s (--max-crashes 2, "
                                           "--crash-window 600); gave up. Last: it crashed (SIGABRT"), text
        assert "Traceback" not in text and text.count("restarted: ready again") == 1, text
        assert _triton_of(ports) is None and _stubs_of(tritons[1][0]) == {}, "a server or model process outlived it"
    finally:
        for triton in tritons or [None]:
            _end(process, triton)


def _crash(ports: Ports, output: _Output) -> str:
    """Send the crafted request; the command's line saying Triton crashed on it."""
    answer = _send_crafted(ports.http)
    assert output.wait_for("Triton stopped while serving", 60), (
        f"the crafted request no longer crashes Triton (it got {answer}): kill the Triton process instead",
        output.lines)
    crash = next(line for line in output.lines if "Triton stopped while serving" in line)
    assert "it crashed (SIGABRT, signal 6)" in crash and "std::bad_alloc" in crash, crash
    assert "NVML" not in crash, crash  # Triton's last words, without its start-up noise
    return crash


def test_a_restarted_server_still_stops_cleanly_on_sigterm(small_artifacts):
    """After a crash and its restart, the service's stop (SIGTERM) is a normal one: exit 0, and
    neither server nor model process is left."""
    ports = Ports.free()
    process = _serve(small_artifacts, ports)
    output = _Output(process)
    tritons = []
    try:
        assert output.wait_for("ready in", READY_S), output.lines
        tritons.append(_triton_of(ports))
        _crash(ports, output)
        assert output.wait_for("restarted: ready again in", READY_S), output.lines
        tritons.append(_triton_of(ports))
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        assert process.returncode == 0, output.text()
        assert "Traceback" not in output.text(), output.text()
        assert _triton_of(ports) is None, "tritonserver outlived the command"
        assert all(_stubs_of(triton[0]) == {} for triton in tritons if triton), "a model process outlived it"
    finally:
        for triton in tritons or [None]:
            _end(process, triton)


def _address_of_this_machine() -> str | None:
    """An IPv4 address of this machine other than loopback (the one its route out uses), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # a UDP connect sends nothing: it only picks the source address
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def _reachable(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(5)
        return probe.connect_ex((host, port)) == 0


def test_a_public_host_gets_grpc_only(small_artifacts):
    """--host <this machine's address>: gRPC listens there and refuses the crafted shape with
    INVALID_ARGUMENT (the server lives on); HTTP and metrics listen on 127.0.0.1 only."""
    host = _address_of_this_machine()
    if host is None:
        pytest.skip("this machine has no address other than loopback")
    ports = Ports.free()
    process = _serve(small_artifacts, ports, "--host", host)
    output = _Output(process)
    triton = None
    try:
        assert output.wait_for("ready in", READY_S), output.lines
        triton = _triton_of(ports)
        assert (_reachable(host, ports.grpc), _reachable(host, ports.http), _reachable(host, ports.metrics)) == (
            True, False, False)
        assert (_reachable(LOOPBACK, ports.http), _reachable(LOOPBACK, ports.metrics)) == (True, True)
        exposure = (f"gRPC {host}:{ports.grpc} is reachable from other machines; HTTP 127.0.0.1:{ports.http} and metrics "
                    f"127.0.0.1:{ports.metrics} from this machine only")
        assert output.wait_for(exposure, 10), output.lines  # printed just after the ready line
        request = service_pb2.ModelInferRequest(model_name=MODEL_NAME)
        for name, datatype, shape, values in (("latents", "FP32", [1, 32, 100000, 100000], np.zeros(1, np.float32)),
                                              ("scale", "INT32", [1, 1], np.full(1, 2, np.int32)),
                                              ("seed", "INT64", [1, 1], np.zeros(1, np.int64))):
            tensor = request.inputs.add(name=name, datatype=datatype)
            tensor.shape.extend(shape)
            request.raw_input_contents.append(values.tobytes())  # the crafted shape gets 4 bytes of values
        with grpc.insecure_channel(f"{host}:{ports.grpc}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
        assert _reachable(host, ports.grpc)
        assert _normal_request(ports.http).shape == (1, 32, 16, 16)
        assert process.poll() is None and not any("Triton stopped" in line for line in output.lines), output.lines
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        assert process.returncode == 0, output.text()
    finally:
        _end(process, triton)


@pytest.mark.parametrize("public_http", [False, True])
def test_the_command_line_puts_http_on_the_host_only_with_public_http(tmp_path, public_http):
    """What Triton is told to bind (the real start above checks the default's sockets)."""
    server = TritonServer(tmp_path, "192.0.2.7", Ports(18100, 18101, 18102), public_http=public_http)
    command = server.command(tmp_path / "backends")
    bound = {flag: command[command.index(flag) + 1] for flag in ("--http-address", "--grpc-address", "--metrics-address")}
    http = "192.0.2.7" if public_http else LOOPBACK
    assert bound == {"--http-address": http, "--grpc-address": "192.0.2.7", "--metrics-address": http}
    assert server.address == f"{http}:18100"
    loopback = TritonServer(tmp_path, "127.0.0.1", Ports(18100, 18101, 18102)).command(tmp_path)
    assert [loopback[loopback.index(f) + 1] for f in ("--http-address", "--grpc-address")] == ["127.0.0.1"] * 2
    assert os.path.basename(command[0]) == "tritonserver"

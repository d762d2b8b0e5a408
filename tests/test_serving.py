"""Serving on a real Triton server: the tritonserver bundled with nvidia-pytriton, started by
``python -m runtime.serve`` on loopback ports, always stopped at the end (bounded waits)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="serving needs the serve extra: pip install -e '.[serve]'")
httpclient = pytest.importorskip("tritonclient.http", reason="the serving tests' client is tritonclient (serve extra)")

from runtime import Upscaler
from runtime.serving.repository import (
    MODEL_NAME,
    RepositoryError,
    ServedModel,
    this_python_path,
    write_repository,
)
from runtime.serving.requests import Request, Result, serve_batch
from runtime.serving.server import Ports, TritonServer, scratch_dir
from tests.test_serving_service import service_environment

ROOT = Path(__file__).resolve().parents[1]
READY_S = 120
QUEUE_DELAY_US = 300_000  # long enough that concurrent requests are batched together


def _ports() -> Ports:
    return Ports.free()


def _serve(folder: Path, ports: Ports, *extra: str) -> subprocess.Popen:
    """``python -m runtime.serve`` as a service starts it (see ``test_serving_service``), default host."""
    command = [sys.executable, "-m", "runtime.serve", str(folder),
               "--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics), *extra]
    return subprocess.Popen(command, cwd=ROOT, env=service_environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_line(process: subprocess.Popen, needle: str, timeout_s: float) -> list[str]:
    """The output lines up to one containing ``needle``; fails if the process ends first or time runs out."""
    lines: list[str] = []
    done = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if needle in line:
                done.set()
                return
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(timeout_s), f"no {needle!r} within {timeout_s} s: {lines}"
    assert any(needle in line for line in lines), f"the command ended without {needle!r}: {lines}"
    return lines


def _stop(process: subprocess.Popen) -> tuple[int, str]:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        rest, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        rest, _ = process.communicate()
    return process.returncode, rest or ""


@pytest.fixture(scope="module")
def server(small_artifacts):
    """``python -m runtime.serve`` on the small folder, ONNX Runtime on the CPU, batching up to 4."""
    ports = _ports()
    process = _serve(small_artifacts, ports, "--backend", "onnxruntime", "--max-batch", "4",
                     "--max-queue-delay-us", str(QUEUE_DELAY_US))
    try:
        lines = _wait_line(process, "ready in", READY_S)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{ports.http}")
        yield {"ports": ports, "lines": lines, "process": process, "client": client}
        client.close()  # an open connection would hold Triton's shutdown for its whole exit timeout
    finally:
        code, rest = _stop(process)
    assert code == 0, rest
    assert "stopping (SIGTERM)" in rest and "stopped in" in rest, rest


@pytest.fixture(scope="module")
def upscaler(small_artifacts):
    with Upscaler.load(small_artifacts, backend="onnxruntime") as loaded:
        yield loaded


def _infer_once(server: dict, *args):
    """One request on a client of its own, closed after it (a client is bound to its thread)."""
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server['ports'].http}")
    try:
        return _infer(client, *args)
    finally:
        client.close()


def _inputs(latents: np.ndarray, scale: int | list[int], seeds: list[int], decode: bool | None = None) -> list:
    batch = latents.shape[0]
    scales = np.asarray(scale if isinstance(scale, list) else [scale] * batch, np.int32).reshape(batch, 1)
    tensors = [("latents", latents, "FP32"), ("scale", scales, "INT32"),
               ("seed", np.asarray(seeds, np.int64).reshape(batch, 1), "INT64")]
    if decode is not None:
        tensors.append(("decode", np.full((batch, 1), decode), "BOOL"))
    inputs = []
    for name, array, dtype in tensors:
        tensor = httpclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    return inputs


def _infer(client, latents: np.ndarray, scale=2, seeds=(0,), decode=None, outputs=("upscaled",)):
    requested = [httpclient.InferRequestedOutput(name, binary_data=True) for name in outputs]
    return client.infer(MODEL_NAME, _inputs(latents, scale, list(seeds), decode), outputs=requested)


def _latents(batch: int, side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 32, side, side), dtype=np.float32)


def _rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def test_startup_names_the_backend_and_folder(server, small_artifacts):
    ready = [line for line in server["lines"] if "flow_upscaler ready" in line]
    assert ready and "backend onnxruntime-cpu" in ready[0] and str(small_artifacts) in ready[0], server["lines"]


@pytest.mark.parametrize("scale", [2, 4])
def test_a_request_equals_the_upscaler_with_its_seeds(server, upscaler, scale):
    x = _latents(2, 8, seed=scale)
    got = _infer(server["client"], x, scale, seeds=[11, 2**63 - 1]).as_numpy("upscaled")
    expected = upscaler.upscale(x, scale=scale, seed=[11, 2**63 - 1])
    assert got.shape == (2, 32, 8 * scale, 8 * scale)
    assert np.array_equal(got, expected)


def counted(http_port: int, requests: int, send: Callable[[int], object]) -> tuple[list, int, int]:
    """``send(i)`` for i < ``requests``, concurrently (one thread each: tritonclient.http's client is
    bound to the thread that made it); their results, and the inferences and executions Triton's
    statistics count for them."""
    stats_url = f"http://127.0.0.1:{http_port}/v2/models/{MODEL_NAME}/stats"

    def counts() -> tuple[int, int]:
        with urllib.request.urlopen(stats_url, timeout=10) as response:
            stats = json.load(response)["model_stats"][0]
        return stats["inference_count"], stats["execution_count"]

    before = counts()
    with ThreadPoolExecutor(requests) as pool:
        results = list(pool.map(send, range(requests)))
    deadline = time.monotonic() + 10  # Triton updates its statistics after the responses are sent
    while counts()[0] - before[0] < requests and time.monotonic() < deadline:
        time.sleep(0.1)
    inferences, executions = (after - first for after, first in zip(counts(), before))
    return results, inferences, executions


def test_concurrent_requests_are_batched_and_each_equals_its_solo_result(server, upscaler):
    latents = [_latents(1, 16, seed=100 + i) for i in range(8)]
    seeds = [1000 + 7 * i for i in range(8)]
    results, inferences, executions = counted(
        server["ports"].http, 8, lambda i: _infer_once(server, latents[i], 2, [seeds[i]]))
    assert inferences == 8 and executions < 8, f"{inferences} latents ran in {executions} executions: nothing was batched"
    for i, result in enumerate(results):
        alone = upscaler.upscale(latents[i], scale=2, seed=seeds[i])
        assert _rel_l2(result.as_numpy("upscaled"), alone) < 1e-5, i


def test_decode_returns_rgb_images_of_the_upscaled_latents(server, upscaler):
    x = _latents(1, 8, seed=5)
    result = _infer(server["client"], x, 2, [9], decode=True, outputs=("upscaled", "image"))
    image = result.as_numpy("image")
    assert image.dtype == np.uint8 and image.shape == (1, 128, 128, 3)
    decoded = upscaler.decode(upscaler.upscale(x, scale=2, seed=9))
    expected = ((np.clip(decoded, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("latents, scale, seeds, message", [
    (np.full((1, 32, 8, 8), np.nan, np.float32), 2, [0], "NaN or Inf"),
    (np.zeros((1, 32, 9, 8), np.float32), 2, [0], "multiples of 2"),
    (np.zeros((1, 32, 8, 8), np.float32), 3, [0], "scale must be one of 2, 4, 8, got 3"),
    (np.zeros((2, 32, 8, 8), np.float32), [2, 4], [0, 1], "same for every item"),
    (np.zeros((1, 32, 200, 8), np.float32), 2, [0], "takes sides 8..32"),
    (np.zeros((1, 32, 4, 4), np.float32), 2, [0], "takes sides 8..32"),
    (np.zeros((1, 32, 32, 32), np.float32), 4, [0], "the second pass's input"),
    (np.zeros((1, 32, 8, 8), np.float32), 2, [-1], "non-negative INT64"),
    (np.zeros((1, 16, 8, 8), np.float32), 2, [0], "Expected [-1,32,-1,-1]"),
    (np.zeros((5, 32, 8, 8), np.float32), 2, [0] * 5, "batch-size must be <= 4"),
])
def test_bad_input_gets_an_error_naming_it_and_the_server_stays_ready(server, latents, scale, seeds, message):
    client = server["client"]
    with pytest.raises(Exception) as refused:
        _infer(client, latents, scale, seeds)
    assert message in str(refused.value), str(refused.value)
    assert client.is_server_ready() and client.is_model_ready(MODEL_NAME)
    assert _infer(client, _latents(1, 8, seed=1)).as_numpy("upscaled").shape == (1, 32, 16, 16)


def test_a_bad_request_batched_with_good_ones_fails_alone(upscaler):
    """The per-request logic without Triton: a bad request in a batch gets its error, the others their result."""
    good = [_latents(1, 8, seed=i) for i in range(2)]
    requests = [
        Request(good[0], np.array([[2]], np.int32), np.array([[3]], np.int64)),
        Request(np.full((1, 32, 8, 8), np.inf, np.float32), np.array([[2]], np.int32), np.array([[3]], np.int64)),
        Request(good[1], np.array([[2]], np.int32), np.array([[4]], np.int64)),
    ]
    answers = serve_batch(upscaler, requests)
    assert isinstance(answers[1], Exception) and "NaN or Inf" in str(answers[1])
    for answer, x, seed in ((answers[0], good[0], 3), (answers[2], good[1], 4)):
        assert isinstance(answer, Result)
        assert _rel_l2(answer.upscaled, upscaler.upscale(x, scale=2, seed=seed)) < 1e-5


def test_written_repository_loads_in_the_bundled_server(small_artifacts, upscaler, tmp_path):
    repository = tmp_path / "models"
    done = subprocess.run(
        [sys.executable, "-m", "runtime.serve", str(small_artifacts), "--backend", "onnxruntime", "--device", "cpu",
         "--instances", "2", "--write-repository", str(repository), "--copy-artifacts"],
        cwd=ROOT, env=service_environment(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    config = (repository / MODEL_NAME / "config.pbtxt").read_text()
    assert "count: 2 kind: KIND_CPU" in config and "max_batch_size: 4" in config and "dynamic_batching" in config
    assert (repository / MODEL_NAME / "1" / "artifacts" / "manifest.json").is_file()
    assert sorted(p.name for p in repository.iterdir()) == [MODEL_NAME]  # no staging leftovers
    x = _latents(1, 8, seed=3)
    with TritonServer(repository, host="127.0.0.1", ports=_ports()) as triton:
        triton.wait_ready(READY_S)
        client = httpclient.InferenceServerClient(triton.address)
        got = _infer(client, x, 4, [77]).as_numpy("upscaled")
        client.close()  # Triton waits for open connections on SIGTERM, up to its exit timeout
        process = triton.process
    assert process.returncode == 0
    assert np.array_equal(got, upscaler.upscale(x, scale=4, seed=77))


def test_rewriting_a_repository_replaces_only_its_own_model_whole(small_artifacts, tmp_path):
    """A model folder this command wrote is replaced whole (its copied folder, Python's __pycache__);
    one with a file it did not write is refused, naming the file; other entries are never touched."""
    repository = tmp_path / "models"
    (repository / "other_model").mkdir(parents=True)
    backup = repository / f".{MODEL_NAME}.backup" / "keep.txt"  # a user's, named like a leftover of a write
    backup.parent.mkdir()
    backup.write_text("mine")
    model = ServedModel(artifacts=small_artifacts, max_batch=2, python_path=this_python_path())
    write_repository(repository, model, copy_artifacts=True)
    (repository / MODEL_NAME / "1" / "__pycache__").mkdir()
    write_repository(repository, ServedModel(artifacts=small_artifacts, max_batch=3))
    assert sorted(p.name for p in repository.iterdir()) == [backup.parent.name, MODEL_NAME, "other_model"]
    assert sorted(p.name for p in (repository / MODEL_NAME / "1").iterdir()) == ["model.py"]
    assert "max_batch_size: 3" in (repository / MODEL_NAME / "config.pbtxt").read_text()
    assert backup.read_text() == "mine"
    notes = repository / MODEL_NAME / "1" / "notes.txt"
    notes.write_text("mine too")
    with pytest.raises(RepositoryError, match=rf"will not replace {repository / MODEL_NAME}: it holds 1/notes.txt, "
                       "which this command did not write; move it away"):
        write_repository(repository, model)
    assert notes.read_text() == "mine too" and backup.read_text() == "mine"
    with pytest.raises(RepositoryError, match="inside the artifact folder"):
        write_repository(small_artifacts / "repo", model)


def test_a_killed_write_is_recovered_and_a_running_one_left_alone(small_artifacts, tmp_path):
    """Leftovers of a write whose process is gone: the model it had set aside comes back, its staging
    folder goes; a write in progress elsewhere (its process alive) and user folders stay."""
    repository = tmp_path / "models"
    model = ServedModel(artifacts=small_artifacts, max_batch=2, python_path=this_python_path())
    write_repository(repository, model)
    dead = _dead_pid()
    set_aside = repository / f".{MODEL_NAME}.old-{dead}-x1y2z3"
    set_aside.mkdir()
    (repository / MODEL_NAME).rename(set_aside / MODEL_NAME)
    staging = repository / f".{MODEL_NAME}.staging-{dead}-a1b2c3"
    running = repository / f".{MODEL_NAME}.staging-{os.getppid()}-d4e5f6"
    for folder in (staging, running):
        (folder / "1").mkdir(parents=True)
    write_repository(repository, ServedModel(artifacts=small_artifacts, max_batch=3))
    assert sorted(p.name for p in repository.iterdir()) == sorted([MODEL_NAME, running.name])
    assert "max_batch_size: 3" in (repository / MODEL_NAME / "config.pbtxt").read_text()


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_write_repository_refuses_a_model_folder_it_did_not_write(small_artifacts, tmp_path):
    """The command on a DIR whose flow_upscaler is the user's: exit 1, one line naming what is there,
    nothing deleted (also not a user's .flow_upscaler.backup, whose name looks like a leftover)."""
    repository = tmp_path / "models"
    notes = repository / MODEL_NAME / "notes.txt"
    keep = repository / f".{MODEL_NAME}.backup" / "keep.txt"
    for path in (notes, keep):
        path.parent.mkdir(parents=True)
        path.write_text("mine")
    error = _refused(str(small_artifacts), "--backend", "onnxruntime", "--write-repository", str(repository))
    assert error.strip() == (f"error: will not replace {repository / MODEL_NAME}: it is no model folder this command "
                             "wrote (it holds notes.txt); move it away or write the repository elsewhere"), error
    assert notes.read_text() == "mine" and keep.read_text() == "mine"
    assert sorted(p.name for p in repository.iterdir()) == [keep.parent.name, MODEL_NAME]


def _refused(*args: str, timeout_s: float = 60) -> str:
    done = subprocess.run([sys.executable, "-m", "runtime.serve", *args], cwd=ROOT, env=service_environment(),
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr


def test_refusals_before_the_server_starts(small_artifacts, tmp_path):
    assert "(batch 1..4)" in _refused(str(small_artifacts), "--max-batch", "9")
    assert "manifest" in _refused(str(tmp_path))
    assert "goes with --write-repository" in _refused(str(small_artifacts), "--copy-artifacts")
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"--http-port {port}" in _refused(str(small_artifacts), "--host", "127.0.0.1", "--http-port", str(port))


def test_a_folder_that_cannot_load_here_stops_the_command_with_the_reason(small_artifacts):
    """The ready check's answer is computed before Triton starts, so a backend that cannot run here
    is refused then, by the same load the model instances would fail."""
    ports = _ports()
    process = _serve(small_artifacts, ports, "--backend", "tensorrt", "--device", "cpu")
    code, output = _stop_after_exit(process)
    assert code == 1, output
    assert output.splitlines()[-1].startswith("error: ") and "tensorrt" in output.lower(), output
    assert "starting Triton" not in output and "Traceback" not in output, output


def _stop_after_exit(process: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = process.communicate(timeout=READY_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return process.returncode, out


def test_sigint_stops_the_server_within_seconds(small_artifacts):
    ports = _ports()
    process = _serve(small_artifacts, ports, "--backend", "onnxruntime")
    try:
        _wait_line(process, "ready in", READY_S)
        start = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
        assert time.monotonic() - start < 15
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and "stopping (SIGINT)" in out, out
    assert not _tritonservers_on(ports.http), "tritonserver left running"


def _tritonservers_on(http_port: int) -> list[int]:
    """Pids of tritonserver processes started with ``http_port``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arguments and arguments[0].endswith(b"tritonserver") and str(http_port).encode() in arguments:
            found.append(int(entry.name))
    return found


def test_no_server_outlives_a_killed_command(small_artifacts):
    ports = _ports()
    process = _serve(small_artifacts, ports, "--backend", "onnxruntime")
    try:
        _wait_line(process, "ready in", READY_S)
        assert _tritonservers_on(ports.http)
        process.kill()  # SIGKILL: no handler runs; the server gets SIGTERM as its parent dies
        process.communicate(timeout=30)
        deadline = time.monotonic() + 30
        while _tritonservers_on(ports.http) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        if process.poll() is None:
            process.kill()
    assert not _tritonservers_on(ports.http), "tritonserver outlived the killed command"
    left = sorted(Path(tempfile.gettempdir()).glob(f"flow-upscaler-*-{process.pid}-*"))
    assert len(left) == 2, left  # the killed command's repository and server workspace...
    shutil.rmtree(scratch_dir("test"))
    assert not [path for path in left if path.exists()]  # ...deleted by the next run


def test_grpc_gives_the_same_result_and_errors(server, upscaler):
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient's gRPC client (serve extra)")
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server['ports'].grpc}")
    x = _latents(1, 8, seed=21)

    def inputs(scale: int) -> list:
        made = []
        for name, array, dtype in (("latents", x, "FP32"), ("scale", np.array([[scale]], np.int32), "INT32"),
                                   ("seed", np.array([[5]], np.int64), "INT64")):
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            made.append(tensor)
        return made

    got = client.infer(MODEL_NAME, inputs(2)).as_numpy("upscaled")
    assert np.array_equal(got, upscaler.upscale(x, scale=2, seed=5))
    with pytest.raises(Exception, match="scale must be one of 2, 4, 8, got 16") as refused:
        client.infer(MODEL_NAME, inputs(16))
    assert "INVALID_ARGUMENT" in str(refused.value.status())
    client.close()


def test_a_body_beyond_the_default_stack_reaches_the_model(server):
    """A 6 MB binary request: Triton 2.51's HTTP frontend dies on a body of about half its threads'
    stack (5 MB under the usual 8 MiB limit, measured); started with a larger one, the request gets
    its answer (here: the folder's refusal of the size) and the server stays up."""
    side = 216  # 1 x 32 x 216 x 216 FP32: 6.0 MB
    with pytest.raises(Exception, match=r"outside what .* was built for") as refused:
        _infer(server["client"], np.zeros((1, 32, side, side), np.float32))
    assert "400" in str(refused.value.status()), refused.value
    assert server["client"].is_server_ready()


def _post_json(server: dict, body: bytes) -> tuple[int, str]:
    url = f"http://127.0.0.1:{server['ports'].http}/v2/models/{MODEL_NAME}/infer"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["error"]


def _json_request(seed: object = 1, scale: object = 2, values: int = 2048) -> bytes:
    return json.dumps({"inputs": [
        {"name": "latents", "shape": [1, 32, 8, 8], "datatype": "FP32", "data": [0.25] * values},
        {"name": "scale", "shape": [1, 1], "datatype": "INT32", "data": [scale]},
        {"name": "seed", "shape": [1, 1], "datatype": "INT64", "data": [seed]},
    ]}).encode()


@pytest.mark.parametrize("body, status, message", [
    # refused by this model's checks: HTTP 400
    (_json_request(seed=-1), 400, "seed[0] must be in 0..9223372036854775807"),
    (_json_request(scale=3), 400, "scale must be one of 2, 4, 8, got 3"),
    # refused by Triton's own JSON parser, before the model sees the request: HTTP 500 (README)
    (_json_request(seed=2**63), 500, "Unable to parse 'data': attempt to access JSON non-signed-integer"),
    (_json_request(seed=1.5), 500, "Unable to parse 'data': attempt to access JSON non-signed-integer"),
    (_json_request(values=100), 500, "Unable to parse 'data': Shape does not match true shape of 'data' field"),
    (b"{not json", 500, "failed to parse the request JSON buffer"),
], ids=["negative seed", "scale 3", "seed 2**63", "seed 1.5", "data shorter than shape", "not json"])
def test_malformed_json_requests_are_refused_and_the_server_stays_ready(server, body, status, message):
    got, error = _post_json(server, body)
    assert got == status and message in error, (got, error)
    assert server["client"].is_server_ready()


@pytest.mark.parametrize("public_http, bound", [(False, "127.0.0.1"), (True, "0.0.0.0")])
def test_a_public_host_checks_http_where_it_binds(small_artifacts, public_http, bound):
    """--host 0.0.0.0 keeps HTTP on loopback unless --public-http: the taken-port refusal (before
    Triton starts, before any other output) names the address HTTP would bind."""
    with __import__("socket").socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "runtime.serve", str(small_artifacts), "--host", "0.0.0.0",
                               "--http-port", str(port), *(["--public-http"] if public_http else [])],
                              cwd=ROOT, env=service_environment(), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and f"--http-port {port} on {bound} is in use" in done.stderr, done.stderr
    assert done.stdout == ""

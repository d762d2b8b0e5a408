"""``python -m benchmarks.serving`` against a real Triton server (the bundled one) on the small folder."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from benchmarks.serving import Load, ServingBenchmarkError, main, measure, server_facts
from engines.errors import FlowUpscalerError
from engines.manifest import load_manifest
from runtime import Upscaler
from runtime.serving.ready import ReadyCheck
from runtime.serving.repository import ServedModel, this_python_path, write_repository
from runtime.serving.server import Ports, TritonServer, free_port

pytest.importorskip("tritonclient.http", reason="the serve extra is not installed: pip install -e '.[serve]'")


def _smallest_input_side(artifacts: Path) -> int:
    profiles = load_manifest(artifacts).components["cond_encoder"].profiles
    return min(min(p.min["latents_small"][2:]) for p in profiles)


def test_started_server_rows_per_client_count_then_stopped(small_artifacts, tmp_path, capsys):
    paths = {k: tmp_path / f"serving.{k}" for k in ("json", "md")}
    code = main([
        "--artifacts", str(small_artifacts), "--clients", "1,2", "--requests", "3", "--warmup", "1", "--batch", "2",
        "--max-queue-delay-us", "500", "--json", str(paths["json"]), "--markdown", str(paths["md"]),
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "checked: one 2x request of 8x8 latents (seed 20251205) answered equal to Upscaler's" in captured.out
    result = json.loads(paths["json"].read_text())
    side = _smallest_input_side(small_artifacts)
    assert (result["latent_side"], result["input_px"], result["output_px"]) == (side, 8 * side, 16 * side)
    assert (result["scale"], result["batch"]) == (2, 2)
    server = result["server"]
    assert server["started_here"] and server["startup_s"] > 0
    with Upscaler.load(small_artifacts, device="cpu") as chosen:  # what auto chooses on this CPU, as the server did
        assert (server["backend"], server["backend_resolved"], server["device"]) == ("auto", chosen.backend_name, "cpu")
    assert (server["max_batch"], server["instances"], server["max_queue_delay_us"]) == (4, 1, 500)
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["torch"]
    assert [r["clients"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["errors"] == 0 and row["error_samples"] == [] and row["requests"] == 3 * row["clients"]
        assert row["requests_per_s"] > 0 and row["latents_per_s"] == pytest.approx(2 * row["requests_per_s"])
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        # every request is counted in the wall time: no faster than its slowest request alone
        assert row["wall_s"] * 1e3 >= row["p99_ms"]
    table = paths["md"].read_text()
    assert "| clients | requests | errors |" in table and "| 2 | 6 | 0 |" in table
    # the server it started is gone
    with pytest.raises(ServingBenchmarkError, match="cannot reach"):
        server_facts(server["url"], 2)


@pytest.fixture(scope="module")
def running_server(small_artifacts):
    """A server started as runtime.serve does, for what the benchmark does against a running one."""
    model = ServedModel(artifacts=small_artifacts.resolve(), max_batch=4, python_path=this_python_path())
    with tempfile.TemporaryDirectory(prefix="serving-bench-test-") as scratch:
        server = TritonServer(write_repository(Path(scratch), model).parent, "127.0.0.1", Ports.free())
        try:
            server.start()
            server.wait_ready(120)
            yield server
        finally:
            server.stop()


def test_the_ready_check_refuses_an_answer_that_is_not_upscalers(running_server, small_artifacts):
    """The check the benchmark runs before measuring, against a real answer it does not expect."""
    right = ReadyCheck.against_upscaler(ServedModel(artifacts=small_artifacts.resolve(), max_batch=4))
    right.run(running_server.address, 60)
    wrong = ReadyCheck(right.latents, right.seed, right.expected * 2)
    with pytest.raises(FlowUpscalerError, match=r"got values that differ from Upscaler's by up to"):
        wrong.run(running_server.address, 60)


def test_failed_requests_are_counted_not_raised(running_server, small_artifacts):
    # a side the folder was not built for: the server refuses every request, the row still comes back
    too_large = 4 * _smallest_input_side(small_artifacts) * 8
    row = measure(Load(running_server.address, too_large, 2, 1, 30), clients=2, warmup=0, requests=2)
    assert row["requests"] == 4 and row["errors"] == 4
    assert row["requests_per_s"] == 0 and row["p50_ms"] is None
    assert any("outside what" in sample for sample in row["error_samples"])


def test_running_server_by_url(running_server, small_artifacts, tmp_path, capsys):
    out = tmp_path / "serving.json"
    url = running_server.address
    assert main(["--artifacts", str(small_artifacts), "--url", url, "--clients", "1", "--requests", "2", "--warmup", "0",
                 "--json", str(out)]) == 0
    assert "answered of the right form" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["server"]["url"] == url and not result["server"]["started_here"] and result["server"]["startup_s"] is None
    assert result["rows"][0]["errors"] == 0 and result["rows"][0]["requests"] == 2


@pytest.mark.parametrize("input_px", ["1000", "72"])
def test_input_size_outside_the_folder_is_refused_before_a_server_starts(small_artifacts, capsys, input_px):
    side = _smallest_input_side(small_artifacts)
    assert main(["--artifacts", str(small_artifacts), "--input-px", input_px]) == 1
    captured = capsys.readouterr()
    assert f"--input-px {input_px} is outside what" in captured.err
    assert f"multiples of 16 px from {8 * side} to " in captured.err
    assert "Traceback" not in captured.err and "starting Triton" not in captured.out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch", "5"], "--batch 5 is more than"),
        (["--max-batch", "2", "--batch", "3"], "--batch 3 is more than the server's max batch: 1..2"),
        (["--max-batch", "8"], "--max-batch 8 is outside what"),
    ],
)
def test_batch_beyond_the_folder_or_server_is_refused(small_artifacts, capsys, argv, message):
    assert main(["--artifacts", str(small_artifacts), *argv]) == 1
    captured = capsys.readouterr()
    assert message in captured.err and "starting Triton" not in captured.out


def test_unreachable_url_is_refused_in_one_line(small_artifacts, capsys):
    assert main(["--artifacts", str(small_artifacts), "--url", f"127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach a Triton server at 127.0.0.1:") and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--url", "host:port"], "is not host:port"),
        (["--url", "127.0.0.1:8000", "--instances", "2"], "--instances configure a server started here"),
        (["--clients", "1,0"], "0 is outside the accepted range 1..256"),
        (["--scale", "3"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2(small_artifacts, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--artifacts", str(small_artifacts), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err

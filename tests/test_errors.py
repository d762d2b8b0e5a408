"""One base exception for the project's refusals, and the one place CLIs turn errors into exit codes."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from engines.cli import EXIT_BUG, EXIT_ERROR, EXIT_INTERRUPTED, run_cli
from engines.errors import FlowUpscalerError

from .comfyui_standin import StandIn

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engines", "export", "runtime", "calib", "benchmarks")
# Raised and caught inside one module, never seen by a user.
INTERNAL = {"benchmarks.latency.Skip", "export.onnx.validate._OnnxRuntimeCannotRun"}


def _exception_classes() -> list[str]:
    """``module.Class`` of every class the sources define that derives from an exception."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ClassDef) and any(
                    (isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception", "Unavailable")))) for b in node.bases
                ):
                    found.append(f"{module}.{node.name}")
    return found


def test_every_error_the_project_defines_is_a_flow_upscaler_error(tmp_path):
    classes = [name for name in _exception_classes() if name not in INTERNAL]
    assert len(classes) >= 15  # the parser found them (engines, runtime, export, calib)
    assert any(name.startswith("runtime.comfyui.") for name in classes)
    standin = StandIn(tmp_path)  # the ComfyUI nodes import ComfyUI's modules
    standin.install()
    try:
        strays = []
        for name in classes:
            module, _, attribute = name.rpartition(".")
            cls = getattr(importlib.import_module(module), attribute)
            if not issubclass(cls, FlowUpscalerError):
                strays.append(name)
    finally:
        standin.remove()
    assert strays == []


def test_the_runtime_and_the_build_export_the_base_and_their_kinds():
    import export
    import runtime

    assert runtime.FlowUpscalerError is FlowUpscalerError and export.FlowUpscalerError is FlowUpscalerError
    for name in ("BackendUnavailable", "InvalidArgumentError", "InvalidLatentsError", "ManifestError",
                 "SizeOutOfRangeError", "UpscalerClosedError"):
        assert issubclass(getattr(runtime, name), FlowUpscalerError), name
    for name in ("BuildError", "CheckpointError"):
        assert issubclass(getattr(export, name), FlowUpscalerError), name
    # kinds keep the built-in they refine, for code written against it
    assert issubclass(runtime.InvalidLatentsError, ValueError) and issubclass(runtime.BackendUnavailable, RuntimeError)


def _raising(exc: BaseException):
    def main(argv):
        raise exc

    return main


def test_run_cli_prints_a_refusal_as_one_line_and_exits_1(capsys):
    class Refusal(FlowUpscalerError):
        pass

    assert run_cli(_raising(Refusal("the folder is stale;\n rebuild with: x"))) == EXIT_ERROR
    assert capsys.readouterr().err == "error: the folder is stale; rebuild with: x\n"
    assert run_cli(_raising(FileNotFoundError(2, "No such file or directory", "/nope"))) == EXIT_ERROR
    assert capsys.readouterr().err == "error: No such file or directory: /nope\n"


def test_run_cli_reports_anything_else_as_a_bug_with_its_traceback(capsys):
    assert run_cli(_raising(ValueError("an index went wrong"))) == EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: an index went wrong" in err and "a bug in this toolkit" in err


def test_run_cli_maps_ctrl_c_to_130_and_lets_exit_codes_through(capsys):
    assert run_cli(_raising(KeyboardInterrupt())) == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(_raising(SystemExit(2)))
    assert run_cli(lambda argv: 0) == 0

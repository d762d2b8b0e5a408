"""One CLI error policy: every ``python -m`` entry point leaves the ``error: ...`` line and the exit
code to ``engines.cli.run_cli``, so a refusal reads the same in every command (issue 32)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("export", "calib", "benchmarks", "runtime")
WRITERS = {"print", "write", "exit", "SystemExit"}  # print(...), sys.stderr.write(...), sys.exit(...), raise SystemExit(...)


def _is_main_block(node: ast.stmt) -> bool:
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    parts = [node.test.left, *node.test.comparators]
    return any(isinstance(p, ast.Name) and p.id == "__name__" for p in parts) and any(
        isinstance(p, ast.Constant) and p.value == "__main__" for p in parts
    )


def _entry_points() -> list[tuple[Path, ast.Module]]:
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            if any(_is_main_block(n) or isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
                found.append((path, tree))
    return found


def _leading_text(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def _call_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _own_error_lines(tree: ast.Module) -> list[int]:
    """Lines where the module writes an ``error:`` line itself or exits with one."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _call_name(node) in WRITERS:
            texts = [_leading_text(a) for a in node.args]
            if any(t is not None and t.lstrip().startswith("error:") for t in texts):
                lines.append(node.lineno)
    return sorted(lines)


def _calls_run_cli(nodes: list[ast.stmt]) -> bool:
    return any(isinstance(n, ast.Call) and _call_name(n) == "run_cli" for stmt in nodes for n in ast.walk(stmt))


def test_the_scan_finds_the_entry_points():
    names = {str(path.relative_to(REPO)) for path, _ in _entry_points()}
    assert {"export/reference.py", "export/onnx/__main__.py", "export/build.py", "export/accuracy.py",
            "export/quantize.py", "benchmarks/latency.py", "benchmarks/memory.py", "runtime/upscale.py",
            "runtime/serve.py", "runtime/check.py"} <= names, names


def test_the_scan_sees_a_local_error_line():
    """The detector itself: each way a command could write its own ``error:`` line is caught."""
    source = (
        'import sys\n'
        'def main(argv=None):\n'
        '    print(f"error: {argv}", file=sys.stderr)\n'
        '    print("error: plain", file=sys.stderr)\n'
        '    sys.stderr.write("error: written\\n")\n'
        '    sys.exit("error: exit")\n'
        '    raise SystemExit(f"error: sizes {argv}")\n'
        '    print("wrote error: not a refusal")\n'
    )
    assert _own_error_lines(ast.parse(source)) == [3, 4, 5, 6, 7]


def _params(entries: list[tuple[Path, ast.Module]]) -> list:
    return [pytest.param(path, tree, id=str(path.relative_to(REPO))) for path, tree in entries]


@pytest.mark.parametrize("path, tree", _params(_entry_points()))
def test_no_entry_point_writes_its_own_error_line(path, tree):
    lines = _own_error_lines(tree)
    assert not lines, (f"{path.relative_to(REPO)} writes 'error: ...' itself at line(s) {lines}: raise a "
                       "FlowUpscalerError and let engines.cli.run_cli print it")


@pytest.mark.parametrize("path, tree", _params([e for e in _entry_points() if any(_is_main_block(n) for n in e[1].body)]))
def test_every_main_block_goes_through_run_cli(path, tree):
    block = next(n for n in tree.body if _is_main_block(n))
    main = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert _calls_run_cli(block.body) or _calls_run_cli(main), (
        f"{path.relative_to(REPO)}: its __main__ block reaches no engines.cli.run_cli"
    )


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_reference_missing_checkpoint_is_one_line_exit_1(tmp_path):
    out = tmp_path / "out.safetensors"
    done = _run("export.reference", "--checkpoint", str(tmp_path / "none.safetensors"),
                "--random-input", "8x8", "--output", str(out))
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "none.safetensors" in lines[0] and "--random-weights" in lines[0], done.stderr
    assert not out.exists()


def test_quantize_odd_calibration_side_is_one_line_exit_1(tmp_path):
    out = tmp_path / "q"
    done = _run("export.quantize", "--precision", "int8", "--random-weights", "--calib-side", "3",
                "--out", str(out))
    assert done.returncode == 1, done.stderr
    assert done.stderr == "error: the fallback latent side must be even and at least 2, got 3\n"
    assert not out.exists()


def test_latency_missing_folder_is_one_line_exit_1(tmp_path):
    report = tmp_path / "r.json"
    done = _run("benchmarks.latency", "--artifacts", str(tmp_path / "nowhere"), "--device", "cpu",
                "--json", str(report))
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "nowhere" in lines[0] and "Traceback" not in done.stderr
    assert not report.exists()


def test_accuracy_on_a_folder_without_a_weight_source_is_one_line_exit_1(small_artifacts, tmp_path):
    """The folder's graphs are fine but its weight record names no source (built through the Python
    API): the fp32 reference cannot be rebuilt, which is the manifest's problem, said in one line."""
    import json
    import shutil

    folder = tmp_path / "no-source"
    shutil.copytree(small_artifacts, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["weights"].values():
        entry.pop("source")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    done = _run("export.accuracy", str(folder), "--device", "cpu", "--calib-size", "1")
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: the manifest does not say where the unet weights came from"), done.stderr

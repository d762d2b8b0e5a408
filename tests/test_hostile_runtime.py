"""Hostile use of the runtime: every refusal is one line naming the problem, before any work, and
leaves no output behind and the artifact folder untouched.

CLI cases run ``python -m runtime.upscale`` as a subprocess (the way users meet it, through
``engines.cli.run_cli``); API cases call ``Upscaler`` and ``read_manifest`` in-process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.manifest import MANIFEST_NAME, ManifestError, read_manifest
from runtime import BackendUnavailable, InvalidArgumentError, InvalidLatentsError, Upscaler, UpscalerClosedError
from runtime.latents import write_latents
from runtime.upscale import main

from .cpu_units import WITHOUT_BF16, pretend_cpu

ROOT = Path(__file__).resolve().parents[1]
SEED_RANGE = "must be an integer in 0..18446744073709551615 (2**64-1)"


def _latents(*shape, seed=1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under ``folder``: contents and modification times."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        for p in sorted(folder.rglob("*"))
    }


def _cli(*args, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m runtime.upscale ARGS``; with ``code``, a patched interpreter running the same module."""
    command = [sys.executable, "-m", "runtime.upscale"] if code is None else [sys.executable, "-c", code]
    return subprocess.run(
        [*command, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def _cannot_write(folder: str) -> bool:
    try:
        with open(Path(folder) / ".hostile-runtime-probe", "w"):
            pass
    except OSError:
        return Path(folder).is_dir()
    (Path(folder) / ".hostile-runtime-probe").unlink()
    return False


def _bad_manifest(artifacts: Path, folder: Path) -> Path:
    data = json.loads((artifacts / MANIFEST_NAME).read_text())
    data["components"] = list(data["components"].values())
    folder.mkdir()
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    return folder


def _artifact_copy(artifacts: Path, folder: Path) -> Path:
    shutil.copytree(artifacts, folder)
    return folder


# Each case: (work dir, shared artifacts, input file) -> (artifact folder used, CLI arguments).
A, IN = "ARTIFACTS", "INPUT"
REFUSALS = {
    "device-banana": (lambda w: [A, "--input", IN, "--output", w / "out.safetensors", "--device", "banana"],
                      "--device must be 'cpu', 'cuda' or 'cuda:N', got 'banana'"),
    "seed-2**70": (lambda w: [A, "--input", IN, "--output", w / "out.safetensors", "--seed", 2**70],
                   f"--seed {SEED_RANGE}, got {2**70}"),
    "seed-negative": (lambda w: [A, "--input", IN, "--output", w / "out.safetensors", "--seed", -1],
                      f"--seed {SEED_RANGE}, got -1"),
    "input-is-a-folder": (lambda w: [A, "--input", w, "--output", w / "out.safetensors"],
                          "is a folder; give a .safetensors file"),
    "empty-batch": (lambda w: [A, "--input", w / "empty.safetensors", "--output", w / "out.safetensors"],
                    "latents are an empty batch (shape (0, 32, 8, 8))"),
    "output-is-a-folder": (lambda w: [A, "--input", IN, "--output", w / "sub"], "is a folder; give a file path"),
    "output-folder-missing": (lambda w: [A, "--input", IN, "--output", w / "nowhere" / "out.safetensors"],
                              "the folder {w}/nowhere does not exist"),
    "output-is-the-input": (lambda w: [A, "--input", IN, "--output", IN], "is the input file"),
    "decode-not-png": (lambda w: [A, "--input", IN, "--output", w / "out.safetensors", "--decode", w / "out.jpg"],
                       "--decode writes PNG images; give a path ending in .png"),
    "output-in-artifact-folder": (lambda w: ["COPY", "--input", IN, "--output", "COPY/manifest.json"],
                                  "would overwrite the artifact folder's files"),
    "manifest-components-as-list": (lambda w: ["BAD", "--input", IN, "--output", w / "out.safetensors"],
                                    "components must be an object, got a list; rebuild with: python -m export.build"),
}
if not torch.cuda.is_available():
    REFUSALS["device-cuda-without-cuda"] = (
        lambda w: [A, "--input", IN, "--output", w / "out.safetensors", "--device", "cuda"],
        "--device 'cuda' asks for CUDA, but this machine has no usable CUDA device",
    )
if _cannot_write("/sys"):
    REFUSALS["output-folder-not-writable"] = (
        lambda w: [A, "--input", IN, "--output", "/sys/out.safetensors"], "cannot write in the folder /sys"
    )


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_cli_refusal_is_one_line_and_touches_nothing(case, small_artifacts, tmp_path):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    source = work / "in.safetensors"
    write_latents(source, _latents(1, 32, 8, 8))
    write_latents(work / "empty.safetensors", torch.zeros(0, 32, 8, 8))
    make_args, message = REFUSALS[case]
    folders = {A: small_artifacts, IN: source}
    if case == "output-in-artifact-folder":
        folders["COPY"] = _artifact_copy(small_artifacts, tmp_path / "copy")
    if case == "manifest-components-as-list":
        folders["BAD"] = _bad_manifest(small_artifacts, tmp_path / "bad")
    args = []
    for arg in make_args(work):
        for name, path in folders.items():
            arg = str(path) + str(arg)[len(name):] if str(arg).startswith(name) else arg
        args.append(arg)
    artifact_folders = [p for n, p in folders.items() if n != IN]
    before = {p: _snapshot(p) for p in [work, *artifact_folders]}

    result = _cli(*args)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message.format(w=work) in lines[0]
    for folder, snapshot in before.items():
        assert _snapshot(folder) == snapshot, f"{folder} changed"


def test_cli_usage_error_is_argparse_exit_2(small_artifacts, tmp_path):
    write_latents(tmp_path / "in.safetensors", _latents(1, 32, 8, 8))
    result = _cli(small_artifacts, "--input", tmp_path / "in.safetensors", "--output", tmp_path / "o", "--scale", 3)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --scale: invalid choice: 3" in result.stderr.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


PATCH_PRELUDE = """
import runpy, sys
sys.argv = ["python -m runtime.upscale", *sys.argv[1:]]
"""
RUN_MODULE = 'runpy.run_module("runtime.upscale", run_name="__main__", alter_sys=True)\n'


def test_cli_failed_image_write_leaves_no_latents_and_keeps_the_old_files(small_artifacts, tmp_path):
    """The PNG cannot be written (disk full): neither output appears, and an older output file of
    the same name is left as it was."""
    code = PATCH_PRELUDE + """
import PIL.Image
def full(self, fp, *args, **kwargs):
    raise OSError(28, "No space left on device", str(fp))
PIL.Image.Image.save = full
""" + RUN_MODULE
    write_latents(tmp_path / "in.safetensors", _latents(1, 32, 8, 8))
    (tmp_path / "out.safetensors").write_bytes(b"an older result")
    before = _snapshot(tmp_path)
    result = _cli(small_artifacts, "--input", tmp_path / "in.safetensors", "--output", tmp_path / "out.safetensors",
                  "--decode", tmp_path / "out.png", code=code)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"error: No space left on device: {tmp_path / 'out.png.partial'}"]
    assert _snapshot(tmp_path) == before  # no out.png, no partial files, the old latents untouched


def test_cli_says_which_backends_auto_skipped_and_why(small_artifacts, tmp_path):
    code = PATCH_PRELUDE + """
import runtime.selection as selection
from runtime import BackendUnavailable
from runtime.backends.registry import BackendSpec, register
def hidden(request):
    raise BackendUnavailable("ONNX Runtime hidden by the test")
register(BackendSpec("onnxruntime", "nothing: hidden by the test", ("cpu",), hidden))
from runtime.cpu import CpuMatrixUnits
selection.cpu_matrix_units = lambda: CpuMatrixUnits(False, False)  # the fp32 path: onnxruntime, then torch
""" + RUN_MODULE
    write_latents(tmp_path / "in.safetensors", _latents(1, 32, 8, 8))
    result = _cli(small_artifacts, "--input", tmp_path / "in.safetensors", "--output", tmp_path / "out.safetensors",
                  "--device", "cpu", code=code)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["warning: backend auto: skipped onnxruntime on cpu: ONNX Runtime hidden by the test"]
    # the folder's engines are skipped first, without a warning: no GPU here is the normal case
    assert "backend torch, auto skipped tensorrt, onnxruntime" in result.stdout
    assert (tmp_path / "out.safetensors").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", str(2**64)], "--seed must be an integer"),
        (["--device", "mps"], "--device must be 'cpu', 'cuda' or 'cuda:N', got 'mps'"),
        (["--decode", "{w}/out.webp"], "give a path ending in .png"),
        (["--output", "{w}/o.png", "--decode", "{w}/o.png"], "--decode and --output are the same file"),
        (["--output", "{a}/sub/x.safetensors"], "would overwrite the artifact folder's files"),
    ],
)
def test_cli_refuses_before_loading_anything(tmp_path, monkeypatch, capsys, extra, message):
    """In-process: the refusals above come before the artifact folder is opened or the input read."""
    import runtime.upscale as command

    def nothing(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(command.Upscaler, "load", nothing)
    monkeypatch.setattr(command, "read_latents", nothing)
    artifacts = tmp_path / "art"
    extra = [e.format(w=tmp_path, a=artifacts) for e in extra]
    args = [str(artifacts), "--input", str(tmp_path / "in.safetensors"), "--output", str(tmp_path / "out.safetensors")]
    assert main(args + extra) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# -- API ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upscaler(small_artifacts):
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as loaded:
        yield loaded


def test_tensor_that_requires_grad_is_read_as_its_values(upscaler):
    x = _latents(1, 32, 8, 8).requires_grad_()
    got = upscaler.upscale(x, seed=4)
    assert not got.requires_grad and torch.equal(got, upscaler.upscale(x.detach(), seed=4))
    assert upscaler.decode(x).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("seed", [None, 1.0, 2.5, True, "3", -1, 2**64, np.float32(1)], ids=repr)
def test_bad_seed_names_the_accepted_range(upscaler, monkeypatch, seed):
    monkeypatch.setattr(upscaler.backend, "run", lambda *a, **k: pytest.fail("the backend ran"))
    with pytest.raises(InvalidArgumentError, match=rf"^seed {re.escape(SEED_RANGE)}, got "):
        upscaler.upscale(_latents(1, 32, 8, 8), seed=seed)


def test_numpy_and_largest_seeds_are_accepted(upscaler):
    x = _latents(1, 32, 8, 8)
    torch.testing.assert_close(upscaler.upscale(x, seed=np.uint64(7)), upscaler.upscale(x, seed=7))
    assert upscaler.upscale(x, seed=2**64 - 1).shape == (1, 32, 16, 16)


@pytest.mark.parametrize("call", ["upscale", "decode"])
def test_empty_batch_is_named(upscaler, call):
    with pytest.raises(InvalidLatentsError, match=r"empty batch \(shape \(0, 32, 8, 8\)\)"):
        getattr(upscaler, call)(torch.zeros(0, 32, 8, 8))


def test_a_closed_upscaler_says_so(small_artifacts):
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as closed:
        pass
    closed.close()  # closing twice is harmless
    for call in (lambda: closed.upscale(_latents(1, 32, 8, 8)), lambda: closed.decode(_latents(1, 32, 8, 8))):
        with pytest.raises(UpscalerClosedError, match="this Upscaler .* is closed; load it again"):
            call()


@pytest.mark.parametrize(
    "device, error, message",
    [
        ("banana", InvalidArgumentError, "device must be 'cpu', 'cuda' or 'cuda:N', got 'banana'"),
        ("meta", InvalidArgumentError, "got 'meta'"),
        ([0], InvalidArgumentError, "got list"),
        pytest.param("cuda:0", BackendUnavailable, "no usable CUDA device",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")),
    ],
)
def test_bad_device_is_refused_before_the_folder_is_read(tmp_path, device, error, message):
    with pytest.raises(error, match=message):
        Upscaler.load(tmp_path / "not-read", device=device)


def test_auto_logs_each_skipped_backend(small_artifacts, monkeypatch):
    from runtime.backends.registry import BackendSpec, registered

    def hidden(request):
        raise BackendUnavailable("ONNX Runtime hidden by the test")

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("runtime.upscaler")
    logger.addHandler(handler)
    pretend_cpu(monkeypatch, WITHOUT_BF16)  # the fp32 path: onnxruntime, then torch
    try:
        with registered(BackendSpec("onnxruntime", "nothing: hidden by the test", ("cpu",), hidden)), \
                Upscaler.load(small_artifacts, device="cpu") as auto:
            assert auto.backend_name == "torch"
            assert auto.skipped_backends == {
                "tensorrt": "the folder's engines need a CUDA GPU; this machine runs on the CPU",
                "onnxruntime": "ONNX Runtime hidden by the test",
            }
    finally:
        logger.removeHandler(handler)
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, "backend auto: skipped onnxruntime on cpu: ONNX Runtime hidden by the test")
    ]


def _at(path: list, change):
    """An edit of the manifest document: ``change(parent, key)`` at ``path``; returns the document."""
    def edit(data):
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        change(parent, path[-1])
        return data
    return edit


def _drop(path: list):
    return _at(path, lambda parent, key: parent.pop(key))


def _set(path: list, value):
    return _at(path, lambda parent, key: parent.__setitem__(key, value))


PROFILE = ["components", "unet", "profiles", 0]
MANIFEST_SHAPES = {
    "a-list": (lambda data: [data], "holds a list, not a JSON object; rebuild the folder with: python -m export.build"),
    "null": (lambda data: None, "holds null, not a JSON object"),
    "components-as-list": (_set(["components"], []), "components must be an object, got a list"),
    "components-empty": (_set(["components"], {}), "names no components"),
    "profile-missing-max": (_drop([*PROFILE, "inputs", "sample", "max"]), "missing the field components.unet.profiles[0].inputs.sample.max"),
    "profile-missing-name": (_drop([*PROFILE, "name"]), "missing the field components.unet.profiles[0].name"),
    "profile-not-a-shape": (_set([*PROFILE, "inputs", "sample", "min"], "big"), "inputs.sample.min must be a shape"),
    "profile-other-inputs": (_drop([*PROFILE, "inputs", "cond"]), "but the component's inputs are"),
    "no-profiles": (_set(["components", "unet", "profiles"], []), "components.unet.profiles is empty"),
    "engine-built-without-file": (_set(["components", "unet", "engine"], {"built": True}), "missing the field components.unet.engine.file"),
    "onnx-as-string": (_set(["components", "unet", "onnx"], "unet.onnx"), "components.unet.onnx must be an object, got a string"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_SHAPES))
def test_manifest_of_the_wrong_shape_is_a_manifest_error(small_artifacts, tmp_path, case):
    edit, message = MANIFEST_SHAPES[case]
    data = json.loads((small_artifacts / MANIFEST_NAME).read_text())
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(edit(data)))
    with pytest.raises(ManifestError, match="rebuild") as caught:
        read_manifest(tmp_path)
    assert message in str(caught.value)

"""Our TensorRT code against the real TensorRT 10 and 11 bindings, on a CPU.

TensorRT cannot be installed here, so the TensorRT modules never run in CI. These tests check the
names they use (methods, properties, enum values, callback methods) against the names compiled
into the real bindings (committed lists, see ``tests/tensorrt_api.py``), and the keywords they pass
to Polygraphy against the installed Polygraphy. With ``TENSORRT_BINDINGS_WHEELS`` naming a folder
of the bindings wheels (CI downloads them), the committed lists are re-read from the wheels.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
from pathlib import Path

import polygraphy.backend.trt
import pytest

from tests.tensorrt_api import (
    PYTHON_NAMES,
    ROOT,
    NameList,
    Usage,
    check_on_module,
    committed_lists,
    describe,
    is_present,
    missing,
    names_in_library,
    names_in_wheel,
    polygraphy_calls,
    project_sources,
    python_names_in_wheel,
    sha256,
    tensorrt_modules,
    tensorrt_rtx_modules,
    used_names,
)

LISTS = committed_lists()
WHEELS = os.environ.get("TENSORRT_BINDINGS_WHEELS")


def _version(name_list: NameList) -> str:
    return name_list.version


@pytest.fixture(scope="module")
def usage() -> Usage:
    return used_names(tensorrt_modules())


def test_lists_cover_tensorrt_10_and_11():
    assert {10, 11} <= {int(n.version.split(".")[0]) for n in LISTS}, f"name lists found: {[n.path.name for n in LISTS]}"
    for name_list in LISTS:
        assert name_list.path.name.startswith("-".join(name_list.wheel.split("-")[:2]))
        assert len(name_list.names) > 1000 and {"execute_async_v3", "IBuilderConfig"} <= name_list.names


def test_collector_finds_our_tensorrt_code(usage):
    """A broken collector or a module escaping discovery must not pass as 'nothing missing'."""
    modules = {p.relative_to(ROOT).as_posix() for p in tensorrt_modules()}
    assert {"engines/tensorrt_build.py", "runtime/backends/tensorrt.py"} <= modules
    assert usage.problems == [], "TensorRT modules break the naming convention of tests/tensorrt_api.py:\n" + "\n".join(usage.problems)
    expected = {
        "deserialize_cuda_engine", "create_execution_context", "USER_MANAGED", "set_input_shape", "execute_async_v3",
        "get_timing_cache", "IProgressMonitor", "phase_start", "step_complete", "phase_finish",
        "RUNTIME_ACTIVATION_RESIZE_10_10", "STRONGLY_TYPED",
    }
    assert expected <= usage.all(), f"collector missed {sorted(expected - usage.all())}"
    assert len(usage.all()) >= 25


@pytest.mark.parametrize("name_list", LISTS, ids=_version)
def test_tensorrt_has_the_names_we_use(name_list, usage):
    absent = missing(usage.required, set(name_list.names))
    assert not absent, f"TensorRT {name_list.version} ({name_list.wheel}) lacks names our code uses:\n{describe(absent)}"


def test_probed_names_exist_in_some_version(usage):
    """A name our code probes with hasattr/getattr may be absent from a version, not from all: that is a typo."""
    absent = {n: p for n, p in usage.optional.items() if not any(is_present(n, set(l.names)) for l in LISTS)}
    versions = ", ".join(l.version for l in LISTS)
    assert not absent, f"no TensorRT version ({versions}) has these probed names:\n{describe(absent)}"


def test_check_catches_names_removed_in_tensorrt_11(tmp_path):
    """The check can fail: TensorRT 11 dropped implicit quantization (calibrators) and precision flags."""
    source = tmp_path / "snippet.py"
    source.write_text(
        "import tensorrt as trt\n"
        "config.int8_calibrator = calibrator\n"
        "config.set_flag(trt.BuilderFlag.FP16)\n"
        "class Progress(trt.IProgressMonitor):\n"
        "    def __init__(self):\n"
        "        trt.IProgressMonitor.__init__(self)\n"
        "    def phase_begin(self, name, parent, steps):\n"
        "        pass\n"
        "if hasattr(state.engine, 'get_device_memory_size_v9'):\n"
        "    pass\n"
    )
    found = used_names([source])
    by_major = {int(n.version.split(".")[0]): set(n.names) for n in LISTS}
    assert set(missing(found.required, by_major[10])) == {"phase_begin"}
    assert set(missing(found.required, by_major[11])) == {"int8_calibrator", "FP16", "phase_begin"}
    assert found.required["int8_calibrator"] == [f"{source}:2"]
    assert set(found.optional) == {"get_device_memory_size_v9"}


@pytest.mark.skipif(not WHEELS, reason="TENSORRT_BINDINGS_WHEELS is not set: the committed name lists are not re-read from the wheels (CI downloads them)")
@pytest.mark.parametrize("name_list", LISTS, ids=_version)
def test_committed_list_is_the_wheels_names(name_list):
    wheel = Path(WHEELS) / name_list.wheel
    assert wheel.is_file(), f"TENSORRT_BINDINGS_WHEELS={WHEELS} lacks {name_list.wheel}"
    assert sha256(wheel) == name_list.sha256, f"{wheel.name} is not the wheel {name_list.path.name} was read from"
    names = names_in_wheel(wheel)
    assert names == name_list.names, (
        f"{name_list.path.name} differs from {wheel.name}: {len(names - name_list.names)} names only in the wheel, "
        f"{len(name_list.names - names)} only in the list; rewrite it with python -m tests.tensorrt_api --write"
    )
    assert PYTHON_NAMES <= python_names_in_wheel(wheel), "names we allow as Python-defined are not in the wheel's __init__.py"


def test_installed_bindings_have_the_names_we_use(usage):
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tensorrt_bindings is not installed (its wheel needs TensorRT's libraries: GPU machines only)")
    package = Path(next(iter(spec.submodule_search_locations)))
    init = ast.parse((package / "__init__.py").read_text())
    version = next(
        (n.value.value for n in init.body if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in n.targets)),
        "of unknown version",
    )
    absent = missing(usage.required, names_in_library((package / "tensorrt.so").read_bytes()))
    assert not absent, f"the installed TensorRT {version} ({package}) lacks names our code uses:\n{describe(absent)}"


def _accepted_keywords(target: str) -> set[str]:
    """Keywords a Polygraphy callable accepts, following ``**kwargs`` up to the base class that takes them."""
    owner, _, method = target.partition(".")
    obj = getattr(polygraphy.backend.trt, owner)
    if not isinstance(obj, type):
        return set(inspect.signature(obj).parameters)
    accepted = set()
    for cls in obj.__mro__[:-1]:  # not object: its (*args, **kwargs) takes nothing
        if (method or "__init__") in vars(cls):
            parameters = inspect.signature(vars(cls)[method or "__init__"]).parameters.values()
            accepted |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            if not any(p.kind is p.VAR_KEYWORD for p in parameters):
                break
    return accepted


def test_polygraphy_keywords_exist():
    calls = polygraphy_calls(project_sources())
    assert {"CreateConfig", "NetworkFromOnnxPath", "Profile.add", "EngineFromBytes"} <= {c.target for c in calls}
    wrong = [
        f"  {c.where}: {c.target}({k}=...)"
        for c in calls
        for k in c.keywords
        if k not in _accepted_keywords(c.target)
    ]
    version = polygraphy.__version__
    assert not wrong, f"Polygraphy {version} does not take these keywords:\n" + "\n".join(wrong)


def test_polygraphy_check_catches_a_wrong_keyword(tmp_path):
    source = tmp_path / "snippet.py"
    source.write_text(
        "from polygraphy.backend.trt import CreateConfig, Profile\n"
        "def build():\n"
        "    profile = Profile()\n"
        "    profile.add('x', min=(1,), opt=(1,), maximum=(1,))\n"
        "    return CreateConfig(fp16=True, builder_optimization_level=3, optimisation_level=3)\n"
    )
    calls = polygraphy_calls([source])
    rejected = {(c.target, k) for c in calls for k in c.keywords if k not in _accepted_keywords(c.target)}
    assert rejected == {("Profile.add", "maximum"), ("CreateConfig", "optimisation_level")}


# TensorRT-RTX installs for real (tensorrt-rtx, module tensorrt_rtx): its names are read from the
# installed module itself, not from lists.


def test_collector_finds_the_code_tensorrt_rtx_runs():
    modules = {p.relative_to(ROOT).as_posix() for p in tensorrt_rtx_modules()}
    assert {"engines/tensorrt_rtx_build.py", "runtime/backends/tensorrt_rtx.py", "runtime/backends/tensorrt.py",
            "engines/tensorrt_build.py"} <= modules, modules
    usage = used_names([ROOT / m for m in modules])
    assert usage.problems == []
    expected = {"num_compute_capabilities", "set_compute_capability", "SM120", "SM86", "build_serialized_network",
                "create_runtime_config", "create_runtime_cache", "set_runtime_cache", "EAGER", "DISABLED",
                "get_engine_validity", "engine_header_size", "execute_async_v3", "set_shape", "TF32", "log"}
    assert expected <= usage.all(), f"collector missed {sorted(expected - usage.all())}"


def test_installed_tensorrt_rtx_has_the_names_we_use():
    """Each name on the class its receiver holds, exactly, and each call against the real signatures."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install -e '.[rtx]')")
    usage = used_names(tensorrt_rtx_modules())
    assert len([a for a in usage.accesses if a.call is not None]) >= 40  # the calls are seen, not only names
    problems = check_on_module(usage.accesses, trt)
    assert not problems, f"the installed TensorRT-RTX {trt.__version__} disagrees with our code:\n" + "\n".join(problems)


def test_tensorrt_rtx_check_catches_names_on_the_wrong_class_and_wrong_calls(tmp_path):
    """Each of these names exists somewhere in TensorRT-RTX (on another class, or as the tail of a
    real name: WHOLE_GRAPH_CAPTURE), or the method exists with other arguments."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install -e '.[rtx]')")
    source = tmp_path / "snippet.py"
    lines = [
        "import tensorrt_rtx as trt",
        "engine.set_tensor_address('x', 0)  # wrong: an IExecutionContext method",
        "context.get_engine_validity(plan)  # wrong: a Runtime method",
        "runtime_config.cuda_graph_strategy = trt.CudaGraphStrategy.CAPTURE  # wrong: the tail of WHOLE_GRAPH_CAPTURE",
        "context.set_input_shape('x')  # wrong: its shape missing",
        "optimization_profile.set_shape('x', lo, opt, hi, extra)  # wrong: one too many",
        "context.set_tensor_address(name='x', address=0)  # wrong: its second parameter is memory",
        "trt.Runtime()  # wrong: the logger missing",
        "config.set_compute_capabilities([trt.ComputeCapability.SM120])  # wrong: no such method anywhere",
        # right, all of them:
        "context.set_tensor_address('x', 0)",
        "context.set_tensor_address(name='x', memory=0)",
        "runtime.get_engine_validity(plan)",
        "runtime_config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE",
        "optimization_profile.set_shape('x', lo, opt, hi)",
        "trt.Runtime(trt.Logger(trt.Logger.WARNING))",
        "context.set_input_shape(*args)",  # unpacked: not counted
        "if hasattr(engine, 'get_device_memory_size_v9'):",  # probed: may be absent
        "    pass",
        "class Log(trt.ILogger):",
        "    def __init__(self):",
        "        trt.ILogger.__init__(self)",
        "    def log(self, severity, msg):",
        "        pass",
        "    def write(self, severity, msg):  # wrong: not a method ILogger calls back",
        "        pass",
    ]
    source.write_text("\n".join(lines) + "\n")
    problems = check_on_module(used_names([source]).accesses, trt)
    wrong = [f"{source}:{number}" for number, line in enumerate(lines, 1) if "# wrong" in line]
    assert [p.split(": ")[0] for p in problems] == wrong, problems
    assert "engine (ICudaEngine) has no 'set_tensor_address'" in problems[0]
    assert "context (IExecutionContext) has no 'get_engine_validity'" in problems[1]
    assert "trt.CudaGraphStrategy has no 'CAPTURE'" in problems[2]
    assert problems[3].endswith("context.set_input_shape(_): the real one takes set_input_shape(name, shape)")
    assert "trt.ILogger has no 'write'" in problems[8]

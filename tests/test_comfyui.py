"""The ComfyUI nodes (``runtime.comfyui``), against a named stand-in for ComfyUI (``tests/comfyui_standin``).

Supported: ComfyUI's classic node API (``INPUT_TYPES``/``RETURN_TYPES``/``FUNCTION``), as ComfyUI
0.8.0 loads it from ``custom_nodes/<folder>/__init__.py``. What is checked here: the declared
interface, the models folders, the latent convention, that a node's output equals
``Upscaler.upscale`` on the same input and seeds, seeds per item, progress and cancel, the errors,
the loaded upscaler's lifetime, and the installer on a fake ComfyUI tree.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from runtime import Upscaler
from runtime.comfyui.install import NODE_FOLDER, RECORD, InstallError, install, uninstall
from runtime.inputs import SEED_MAX
from runtime.selection import BACKENDS

from .comfyui_standin import StandIn

WORKFLOWS = Path(__file__).resolve().parents[1] / "runtime" / "comfyui" / "workflows"
COMFY_BUILTINS = {"LoadLatent": {"latent"}, "SaveLatent": {"samples", "filename_prefix"},
                  "SaveImage": {"images", "filename_prefix"}}  # inputs of ComfyUI's own nodes the examples use


@pytest.fixture()
def comfy(tmp_path, small_artifacts):
    """A ComfyUI base folder with the small artifact folder linked in as models/flow_upscaler/small/."""
    (tmp_path / "models" / "flow_upscaler").mkdir(parents=True)
    (tmp_path / "models" / "latent_upscale_models").mkdir()
    (tmp_path / "models" / "flow_upscaler" / "small").symlink_to(small_artifacts, target_is_directory=True)
    standin = StandIn(tmp_path)
    standin.install()
    nodes = importlib.import_module("runtime.comfyui.nodes")
    yield standin, nodes
    importlib.import_module("runtime.comfyui.loaded").LOADED.close_all()
    standin.remove()


def _packed(batch=1, side=4, seed=1):
    return torch.randn(batch, 128, side, side, generator=torch.Generator().manual_seed(seed))


def _load(nodes, model="small/", backend="onnxruntime", node_id="1", **optional):
    return nodes.FlowUpscalerLoader().load(model, backend, unique_id=node_id, **optional)[0]


# -- the declared interface ------------------------------------------------------------------------

def test_nodes_declare_the_classic_interface_with_comfyuis_types(comfy):
    _, nodes = comfy
    assert set(nodes.NODE_CLASS_MAPPINGS) == {"FlowUpscalerLoader", "FlowUpscalerUpscale", "FlowUpscalerDecode"}
    assert set(nodes.NODE_DISPLAY_NAME_MAPPINGS) == set(nodes.NODE_CLASS_MAPPINGS)
    returns = {"FlowUpscalerLoader": ("FLOW_UPSCALER",), "FlowUpscalerUpscale": ("LATENT",),
               "FlowUpscalerDecode": ("IMAGE",)}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert cls.RETURN_TYPES == returns[name] and len(cls.OUTPUT_TOOLTIPS) == 1
        assert isinstance(cls.CATEGORY, str) and cls.DESCRIPTION
        inputs = cls.INPUT_TYPES()
        declared = {n for section in inputs.values() for n in section}
        function = inspect.signature(getattr(cls, cls.FUNCTION))
        assert set(function.parameters) - {"self"} == declared, name  # ComfyUI passes inputs by name
        for section in ("required", "optional"):
            for spec in inputs.get(section, {}).values():
                assert isinstance(spec, tuple) and isinstance(spec[0], (str, list)) and spec[1].get("tooltip")

    loader = nodes.FlowUpscalerLoader.INPUT_TYPES()
    assert loader["required"]["model"][0] == ["small/"]
    assert loader["required"]["backend"][0] == list(BACKENDS) and loader["required"]["backend"][1]["default"] == "auto"
    assert loader["optional"]["precision"][0] == ["auto", "fp32", "fp16", "bf16", "int8"]
    assert loader["hidden"] == {"unique_id": "UNIQUE_ID"}
    upscale = nodes.FlowUpscalerUpscale.INPUT_TYPES()["required"]
    assert upscale["flow_upscaler"][0] == "FLOW_UPSCALER" and upscale["samples"][0] == "LATENT"
    assert upscale["scale"][0] == ["2x", "4x", "8x"]
    seed = upscale["seed"][1]
    assert upscale["seed"][0] == "INT" and (seed["min"], seed["max"]) == (0, 2**64 - 1) and seed["control_after_generate"]
    assert "seed + i" in seed["tooltip"]
    decode = nodes.FlowUpscalerDecode.INPUT_TYPES()["required"]
    assert decode["flow_upscaler"][0] == "FLOW_UPSCALER" and decode["samples"][0] == "LATENT"


def test_example_workflows_are_api_format_over_the_nodes_inputs(comfy):
    _, nodes = comfy
    files = sorted(WORKFLOWS.glob("*.json"))
    assert files
    for file in files:
        workflow = json.loads(file.read_text())
        for node_id, node in workflow.items():
            cls = nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
            accepted = COMFY_BUILTINS.get(node["class_type"]) or {
                n for section in ("required", "optional") for n in cls.INPUT_TYPES().get(section, {})}
            assert set(node["inputs"]) <= accepted, (file.name, node_id)
            if cls is not None:
                assert set(cls.INPUT_TYPES()["required"]) <= set(node["inputs"]), (file.name, node_id)
            for value in node["inputs"].values():
                if isinstance(value, list):  # a link: [node id, output index]
                    assert value[0] in workflow and isinstance(value[1], int), (file.name, node_id)


# -- models folders --------------------------------------------------------------------------------

def test_models_come_from_comfyuis_paths_extra_paths_and_flow_upscaler_checkpoints_only(tmp_path, small_artifacts):
    extra = tmp_path / "elsewhere"
    (extra / "nested" / "rtx").mkdir(parents=True)
    shutil.copy(small_artifacts / "manifest.json", extra / "nested" / "rtx" / "manifest.json")
    (tmp_path / "models" / "latent_upscale_models").mkdir(parents=True)
    save_file({"low_res_encoder.in_conv.weight": torch.zeros(1)}, str(tmp_path / "models" / "latent_upscale_models" / "flow.safetensors"))
    save_file({"decoder.conv.weight": torch.zeros(1)}, str(tmp_path / "models" / "latent_upscale_models" / "other.safetensors"))
    standin = StandIn(tmp_path)
    # extra_model_paths.yaml is read before custom nodes load: its path stays, the default is added
    standin.modules["folder_paths"].add_model_folder_path("flow_upscaler", str(extra))
    standin.install()
    try:
        models = importlib.import_module("runtime.comfyui.models")
        models.register()
        assert models.choices() == ["nested/rtx/", "flow.safetensors"]
        assert models.resolve("nested/rtx/").path == extra / "nested" / "rtx"
        assert models.resolve("flow.safetensors").kind == "checkpoint"
        with pytest.raises(models.ModelNotFound, match="no artifact folder"):
            models.resolve("../elsewhere/nested/rtx/")  # cannot climb out of a models path
        with pytest.raises(models.ModelNotFound, match="no checkpoint"):
            models.resolve("missing.safetensors")
        paths = standin.modules["folder_paths"].get_folder_paths("flow_upscaler")
        assert paths == [str(extra), str(tmp_path / "models" / "flow_upscaler")]
    finally:
        standin.remove()


# -- same numbers, seeds, the latent convention ------------------------------------------------------

@pytest.mark.parametrize("scale", [2, 4])
def test_upscale_node_equals_the_runtime_on_the_same_input_seeds_and_backend(comfy, small_artifacts, scale):
    _, nodes = comfy
    handle = _load(nodes)
    latent = {"samples": _packed(batch=2), "batch_index": [3, 4]}
    (out,) = nodes.FlowUpscalerUpscale().upscale(handle, latent, f"{scale}x", 7)
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as upscaler:
        expected = upscaler.upscale(latent["samples"], scale, seed=[7, 8], latent_format="flux2_packed")
    assert out["samples"].shape == (2, 128, 4 * scale, 4 * scale) and out["samples"].dtype == torch.float32
    assert torch.equal(out["samples"], expected)  # ONNX Runtime on the CPU is deterministic
    assert out["batch_index"] == [3, 4] and latent["samples"].shape == (2, 128, 4, 4)  # input untouched


def test_batch_item_i_gets_seed_plus_i_wrapping_past_the_largest_seed(comfy):
    _, nodes = comfy
    handle = _load(nodes)
    node = nodes.FlowUpscalerUpscale()
    pair = _packed(batch=2)
    (both,) = node.upscale(handle, {"samples": pair}, "2x", SEED_MAX)
    (first,) = node.upscale(handle, {"samples": pair[:1]}, "2x", SEED_MAX)
    (second,) = node.upscale(handle, {"samples": pair[1:]}, "2x", 0)
    assert torch.equal(both["samples"][:1], first["samples"]) and torch.equal(both["samples"][1:], second["samples"])
    assert not torch.equal(first["samples"], node.upscale(handle, {"samples": pair[:1]}, "2x", 1)[0]["samples"])


def test_decode_node_gives_comfyuis_image_from_the_runtimes_decode(comfy, small_artifacts):
    _, nodes = comfy
    handle = _load(nodes)
    samples = _packed(side=6)
    (image,) = nodes.FlowUpscalerDecode().decode(handle, {"samples": samples})
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as upscaler:
        decoded = upscaler.decode(samples, latent_format="flux2_packed")
    assert image.shape == (1, 96, 96, 3) and image.dtype == torch.float32  # [B, H, W, 3]: 16x the packed side
    assert image.min() >= 0 and image.max() <= 1
    assert torch.equal(image, ((decoded + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1))


# -- progress and cancel ------------------------------------------------------------------------------

def test_progress_bar_per_pass_and_per_tile(comfy):
    standin, nodes = comfy
    handle = _load(nodes)
    nodes.FlowUpscalerUpscale().upscale(handle, {"samples": _packed()}, "8x", 0)
    assert standin.progress == [(0, 3), (1, 3), (2, 3), (3, 3)]
    standin.progress.clear()
    nodes.FlowUpscalerDecode().decode(handle, {"samples": _packed(side=48)})  # 96x96 latents, tile 64: 2 x 2
    assert standin.progress == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]


def test_cancel_stops_between_passes_and_the_next_prompt_gets_the_same_result(comfy):
    standin, nodes = comfy
    handle = _load(nodes)
    node, latent = nodes.FlowUpscalerUpscale(), {"samples": _packed()}
    standin.interrupt_at = (1, 3)  # the user cancels while the first of three passes runs
    with pytest.raises(standin.modules["comfy.model_management"].InterruptProcessingException):
        node.upscale(handle, latent, "8x", 11)
    assert standin.progress[-1] == (1, 3)  # stopped before the second pass
    standin.interrupt_at = None
    (again,) = node.upscale(handle, latent, "8x", 11)
    with Upscaler.load(handle.spec.path, backend="onnxruntime", device="cpu") as fresh:
        assert torch.equal(again["samples"], fresh.upscale(latent["samples"], 8, seed=[11], latent_format="flux2_packed"))

    standin.interrupt_at = (2, 4)
    with pytest.raises(standin.modules["comfy.model_management"].InterruptProcessingException):
        nodes.FlowUpscalerDecode().decode(handle, {"samples": _packed(side=48)})
    assert standin.progress[-1] == (2, 4)


# -- errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, named", [
    ((1, 16, 8, 8), "16-channel latent (FLUX.1"), ((1, 4, 8, 8), "4-channel latent (SD"),
    ((1, 32, 8, 8), "32-channel"), ((1, 16, 3, 8, 8), "shape [1, 16, 3, 8, 8]"),
])
def test_other_models_latents_are_refused_in_one_sentence_naming_them(comfy, shape, named):
    _, nodes = comfy
    handle = _load(nodes)
    for call in (lambda x: nodes.FlowUpscalerUpscale().upscale(handle, x, "2x", 0),
                 lambda x: nodes.FlowUpscalerDecode().decode(handle, x)):
        with pytest.raises(nodes.FlowUpscalerNodeError) as refused:
            call({"samples": torch.zeros(shape)})
        message = str(refused.value)
        assert named in message and "FLUX.2 latents only: [batch, 128" in message and "\n" not in message


def test_runtime_refusals_reach_comfyui_as_one_line_without_the_runtimes_traceback(comfy):
    _, nodes = comfy
    handle = _load(nodes)
    with pytest.raises(nodes.FlowUpscalerNodeError) as refused:
        nodes.FlowUpscalerUpscale().upscale(handle, {"samples": _packed(side=32)}, "2x", 0)  # 64x64 > the folder's 32
    assert "outside what" in str(refused.value) and "takes sides 8..32" in str(refused.value)
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
    shown = {Path(str(entry.path)).parent.name for entry in refused.traceback}
    assert "comfyui" in shown and not shown & {"runtime", "engines"}  # ComfyUI shows the node's frames only

    with pytest.raises(nodes.FlowUpscalerNodeError, match="no artifact folder 'gone'"):
        nodes.FlowUpscalerLoader().load("gone/", "auto", unique_id="2")
    with pytest.raises(nodes.FlowUpscalerNodeError, match="tensorrt backend needs|TensorRT"):
        nodes.FlowUpscalerLoader().load("small/", "tensorrt", unique_id="3")  # a folder built for an RTX GPU, here a CPU


# -- the loaded upscaler's lifetime ----------------------------------------------------------------

def test_loader_keeps_its_upscaler_across_prompts_until_an_input_or_the_folder_changes(comfy, small_artifacts):
    _, nodes = comfy
    first = _load(nodes).upscaler()
    assert _load(nodes).upscaler() is first  # the next prompt, same inputs
    other = _load(nodes, backend="torch").upscaler()  # the node now asks for another backend
    assert first.closed and not other.closed and other.backend_name == "torch"
    stale = nodes.FlowUpscalerLoader.IS_CHANGED("small/", "torch")
    manifest = small_artifacts / "manifest.json"  # a rebuild replaces the manifest (a new file renamed in)
    shutil.copy(manifest, manifest.with_suffix(".new"))
    os.replace(manifest.with_suffix(".new"), manifest)
    assert nodes.FlowUpscalerLoader.IS_CHANGED("small/", "torch") != stale  # ComfyUI runs the loader again
    reloaded = _load(nodes, backend="torch").upscaler()
    assert reloaded is not other and other.closed
    old_handle = _load(nodes, backend="onnxruntime")  # a handle ComfyUI kept from an earlier prompt
    _load(nodes, backend="torch")
    assert not old_handle.upscaler().closed  # opened again on use


def test_loading_and_running_free_the_folders_figures_from_comfyuis_models_on_cuda(comfy, small_artifacts):
    standin, nodes = comfy
    handle = _load(nodes)
    assert standin.freed == []  # ComfyUI on the CPU: nothing to unload
    manifest = json.loads((small_artifacts / "manifest.json").read_text())
    components = manifest["components"].values()
    assert all(c["engine"]["built"] for c in components)  # the folder carries RTX engines: their builder's figures count
    weights = sum(c["engine"]["weights_bytes"] for c in components)
    work = max(max(c["engine"]["activation_bytes_per_profile"]) for c in components)
    assert Upscaler.memory_needed(small_artifacts) == weights + work
    cuda = nodes.FlowUpscalerModel(nodes.LoadSpec("folder", handle.spec.path, "auto", None, "cuda:0"))
    nodes.free_for(cuda, extra=5)
    assert standin.freed == [(weights + work + 5, torch.device("cuda:0"))]


# -- the published checkpoint without a build -------------------------------------------------------

def test_a_checkpoint_runs_on_torch_without_a_build(comfy, full_unet):
    standin, nodes = comfy
    path = Path(standin.modules["folder_paths"].get_folder_paths("latent_upscale_models")[0]) / "flow_upscaler.safetensors"
    save_file({k: v.contiguous() for k, v in full_unet.state_dict().items()}, str(path))
    assert "flow_upscaler.safetensors" in nodes.FlowUpscalerLoader.INPUT_TYPES()["required"]["model"][0]
    handle = _load(nodes, "flow_upscaler.safetensors", "auto")
    latent = {"samples": _packed(side=4)}
    (out,) = nodes.FlowUpscalerUpscale().upscale(handle, latent, "2x", 3)
    with Upscaler.from_checkpoint(path, device="cpu") as upscaler:
        assert upscaler.backend_name == "torch"  # fp32, the reference
        assert torch.equal(out["samples"], upscaler.upscale(latent["samples"], 2, seed=[3], latent_format="flux2_packed"))
    with pytest.raises(nodes.FlowUpscalerNodeError, match="has no decoder: decode with ComfyUI's VAE Decode"):
        nodes.FlowUpscalerDecode().decode(handle, latent)
    with pytest.raises(nodes.FlowUpscalerNodeError, match="runs on the torch backend only"):
        _load(nodes, "flow_upscaler.safetensors", "onnxruntime", node_id="2")
    with pytest.raises(nodes.FlowUpscalerNodeError, match="int8 needs a folder"):
        _load(nodes, "flow_upscaler.safetensors", "torch", node_id="3", precision="int8")
    save_file({"low_res_encoder.in_conv.weight": torch.zeros(1)}, str(path.with_name("broken.safetensors")))
    with pytest.raises(nodes.FlowUpscalerNodeError, match="broken.safetensors"):
        _load(nodes, "broken.safetensors", "auto", node_id="4")


# -- the installer ------------------------------------------------------------------------------------

def _comfyui_tree(root: Path) -> Path:
    (root / "custom_nodes").mkdir(parents=True)
    (root / "main.py").write_text("# ComfyUI\n")
    (root / "nodes.py").write_text("# ComfyUI\n")
    return root


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "runtime.comfyui", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def test_install_writes_one_folder_that_loads_the_nodes_and_rerunning_is_harmless(tmp_path, comfy):
    standin, _ = comfy
    tree = _comfyui_tree(tmp_path / "ComfyUI")
    done = _cli("install", str(tree))
    assert done.returncode == 0 and "wrote" in done.stdout and NODE_FOLDER in done.stdout
    folder = tree / "custom_nodes" / NODE_FOLDER
    assert sorted(p.name for p in folder.iterdir()) == ["__init__.py", RECORD]
    written = (folder / "__init__.py").read_bytes()
    assert _cli("install", str(tree)).returncode == 0 and (folder / "__init__.py").read_bytes() == written

    # ComfyUI imports the folder as it imports every custom node: its __init__.py from the file
    spec = importlib.util.spec_from_file_location("custom_nodes_flow_upscaler", folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.NODE_CLASS_MAPPINGS) == {"FlowUpscalerLoader", "FlowUpscalerUpscale", "FlowUpscalerDecode"}

    # a Python without the toolkit: one clear log line and no nodes, not an import traceback
    probe = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('n', sys.argv[1]); "
             "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); print(len(m.NODE_CLASS_MAPPINGS))")
    bare = subprocess.run([sys.executable, "-S", "-c", probe, str(folder / "__init__.py")], capture_output=True,
                          text=True, cwd=tmp_path)
    assert bare.returncode == 0 and bare.stdout.strip() == "0"
    assert "not installed in the Python that runs ComfyUI" in bare.stderr and "Traceback" not in bare.stderr


def test_install_refuses_what_is_not_comfyui_or_not_its_own_and_uninstall_removes_only_its_files(tmp_path):
    assert _cli("install", str(tmp_path)).stderr.startswith("error: ")  # not a ComfyUI folder
    failed = _cli("install", str(tmp_path))
    assert failed.returncode == 1 and "not a ComfyUI folder" in failed.stderr and "Traceback" not in failed.stderr

    tree = _comfyui_tree(tmp_path / "ComfyUI")
    theirs = tree / "custom_nodes" / NODE_FOLDER
    theirs.mkdir()
    (theirs / "__init__.py").write_text("# someone else's node pack\n")
    for refused in (lambda: install(tree, report=lambda line: None), lambda: uninstall(tree, report=lambda line: None)):
        with pytest.raises(InstallError, match="not written by"):
            refused()
    assert (theirs / "__init__.py").read_text() == "# someone else's node pack\n"
    shutil.rmtree(theirs)

    folder = install(tree, report=lambda line: None)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"compiled")
    (folder / "__init__.py").write_text("# edited by the user\n")
    with pytest.raises(InstallError, match="__init__.py in .* changed since it was installed"):
        install(tree, report=lambda line: None)
    (folder / "notes.txt").write_text("mine")
    lines = []
    uninstall(tree, report=lines.append)
    assert sorted(p.name for p in folder.iterdir()) == ["__init__.py", "notes.txt"]  # the user's, left
    assert "left" in lines[0]
    shutil.rmtree(folder)

    install(tree, report=lambda line: None)
    removed = _cli("install", "--uninstall", str(tree))
    assert removed.returncode == 0 and not folder.exists() and "removed" in removed.stdout
    assert "nothing to remove" in _cli("install", "--uninstall", str(tree)).stdout

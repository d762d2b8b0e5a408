"""ONNX export: graphs match fp32 eager in ONNX Runtime, axes are symbolic, types as documented."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import onnx
import pytest
import torch

from export.checkpoint import random_vae, seeded_init
from export.models import UpscalerUNet, VAEDecoder
from export.onnx.__main__ import main
from export.onnx.components import COMPONENTS, Models
from export.onnx.exporter import export_component, graph_filename
from export.models.precision import DEFAULT_POLICY, Fp32NearestUpsample, apply_policy
from export.onnx.validate import validate_graph
from tests.conftest import SMALL_UNET, SMALL_VAE

FLOAT, FLOAT16, BFLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16


@pytest.fixture(scope="module")
def small_models() -> Models:
    unet = seeded_init(lambda: UpscalerUNet(**SMALL_UNET), 0).eval()
    return Models(unet=unet, vae=random_vae(0, **SMALL_VAE))


@pytest.fixture(scope="module")
def exported(small_models, tmp_path_factory):
    """Export on first use, once per (component, dtype)."""
    out, cache = tmp_path_factory.mktemp("onnx"), {}

    def get(component: str, dtype: str):
        if (component, dtype) not in cache:
            spec = COMPONENTS[component]
            cache[component, dtype] = export_component(
                spec, small_models, dtype, out / graph_filename(spec, dtype, small_models.cut)
            )
        return cache[component, dtype]

    return get


def _elem_types(values) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in values}


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_small_component_matches_eager_at_three_shapes(component, small_models, exported):
    result = exported(component, "fp32")
    report = validate_graph(COMPONENTS[component], small_models, str(result.path), "fp32")
    assert report["status"] == "passed", report
    sizes = [(c["batch"], c["height"], c["width"]) for c in report["checks"]]
    assert len(sizes) >= 3 and COMPONENTS[component].export_size in sizes
    assert any(h != w for _, h, w in sizes if (1, h, w) != COMPONENTS[component].export_size)


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_batch_and_spatial_axes_are_symbolic(component, exported):
    graph = onnx.load(str(exported(component, "fp32").path)).graph
    spec = COMPONENTS[component]
    for value in graph.input:
        dims = _dims(value)
        for axis in spec.dynamic_axes[value.name]:
            assert isinstance(dims[axis], str) and dims[axis], (value.name, dims)
    for value in graph.output:
        dims = _dims(value)
        assert isinstance(dims[0], str), (value.name, dims)
        if len(dims) == 4:
            assert isinstance(dims[2], str) and isinstance(dims[3], str), (value.name, dims)


def test_unet_input_names_are_the_encoder_output_names(exported):
    encoder = onnx.load(str(exported("cond_encoder", "fp32").path)).graph
    unet = onnx.load(str(exported("unet", "fp32").path)).graph
    assert [o.name for o in encoder.output] == [i.name for i in unet.input][1:]
    assert [o.name for o in unet.output] == ["velocity"]


def test_fp16_graph_types_are_as_documented(small_models, exported):
    result = exported("unet", "fp16")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(result.path)))
    graph = model.graph
    assert _elem_types(graph.input) == {
        "sample": FLOAT, "cond": FLOAT16, "lr1": FLOAT16, "lr2": FLOAT16, "lr3": FLOAT16
    }
    assert _elem_types(graph.output) == {"velocity": FLOAT}
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    types.update(_elem_types(graph.input))
    types.update({i.name: i.data_type for i in graph.initializer})
    conv_types = {types[n.input[1]] for n in graph.node if n.op_type == "Conv"}
    assert conv_types == {FLOAT16}
    norm_inputs = {types[n.input[0]] for n in graph.node if n.op_type == "InstanceNormalization"}
    assert norm_inputs == {FLOAT}

    report = validate_graph(COMPONENTS["unet"], small_models, str(result.path), "fp16")
    assert report["status"] == "passed"
    errors = [c["outputs"]["velocity"]["rel_l2"] for c in report["checks"]]
    assert all(0 < e < 1e-2 for e in errors)  # fp16 really ran: not bit-equal to fp32


def test_time_embedding_stays_fp32_in_fp16_encoder(exported):
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(exported("cond_encoder", "fp16").path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    types.update(_elem_types(graph.input))
    trig = [n for n in graph.node if n.op_type in ("Sin", "Cos")]
    assert trig and {types[n.input[0]] for n in trig} == {FLOAT}
    assert _elem_types(graph.input) == {"latents_small": FLOAT, "timestep": FLOAT}
    assert set(_elem_types(graph.output).values()) == {FLOAT16}


@pytest.mark.parametrize(
    "component, modes", [("unet", {"linear"}), ("vae_decoder", {"nearest"}), ("vae_decoder_tail", {"nearest"})]
)
def test_bf16_graph_resizes_fp32_data(component, modes, exported):
    # The types come from the graph (shape inference), not from the policy under test.
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(exported(component, "bf16").path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    types.update(_elem_types(graph.input))
    resizes = [n for n in graph.node if n.op_type == "Resize"]
    found = {next((a.s.decode() for a in n.attribute if a.name == "mode"), "nearest") for n in resizes}
    assert found == modes
    assert {n.name: types[n.input[0]] for n in resizes} == dict.fromkeys((n.name for n in resizes), FLOAT)


def test_fp32_nearest_upsample_is_bit_identical_to_bf16(small_models):
    """Nearest copies values, so resizing bf16 data in fp32 must change no bit of the decoder's output."""
    decoder = VAEDecoder(small_models.vae)
    latents = torch.randn(2, 32, 6, 10, generator=torch.Generator().manual_seed(0)).bfloat16()
    patched = apply_policy(decoder, DEFAULT_POLICY["bf16"])
    plain = apply_policy(decoder, replace(DEFAULT_POLICY["bf16"], resize_fp32=False))
    assert any(isinstance(m, Fp32NearestUpsample) for m in patched.modules())
    with torch.no_grad():
        assert torch.equal(patched(latents), plain(latents))


def test_bf16_graph_is_reported_not_run_on_cpu(small_models, exported):
    result = exported("unet", "bf16")
    graph = onnx.load(str(result.path)).graph
    assert Counter(i.data_type for i in graph.initializer if len(i.dims) == 4)[BFLOAT16] > 0
    report = validate_graph(COMPONENTS["unet"], small_models, str(result.path), "bf16")
    assert report["status"] == "not_run" and "bf16" in report["reason"]


@pytest.mark.parametrize("component", ["cond_encoder", "unet"])
def test_full_size_component_matches_eager_at_a_tiny_shape(component, full_unet, tmp_path):
    models = Models(unet=full_unet)
    spec = COMPONENTS[component]
    result = export_component(spec, models, "fp32", tmp_path / graph_filename(spec, "fp32", "f3"))
    size = (1, 10, 14) if component == "cond_encoder" else (1, 20, 28)
    report = validate_graph(spec, models, str(result.path), "fp32", sizes=(size,))
    assert report["status"] == "passed", report


def test_cli_exports_validates_and_writes_json(tmp_path, capsys):
    code = main(["--component", "cond_encoder", "--dtype", "fp32", "fp16", "--random-weights", "--out", str(tmp_path)])
    assert code == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "cond_encoder.fp16.onnx", "cond_encoder.fp16.validation.json",
        "cond_encoder.fp32.onnx", "cond_encoder.fp32.validation.json",
    ]
    report = json.loads((tmp_path / "cond_encoder.fp16.validation.json").read_text())
    assert report["status"] == "passed" and report["nodes_final"] > 0 and len(report["checks"]) == 3
    assert "cond_encoder.fp16.onnx: passed" in capsys.readouterr().out


def test_cli_failed_validation_exits_1_and_keeps_no_graph(tmp_path, capsys, monkeypatch):
    from export.onnx import validate

    monkeypatch.setitem(validate.TOLERANCES, "fp32", validate.Tolerance(rel_l2=0.0, max_abs=0.0))
    code = main(["--component", "cond_encoder", "--random-weights", "--out", str(tmp_path)])
    assert code == 1
    assert "validation failed for cond_encoder.fp32.onnx" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cond_encoder.fp32.validation.json"]
    assert json.loads((tmp_path / "cond_encoder.fp32.validation.json").read_text())["status"] == "failed"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--component", "decoder"], "invalid choice: 'decoder'"),
        (["--component", "unet", "--dtype", "int4"], "invalid choice: 'int4'"),
    ],
)
def test_cli_rejects_unknown_component_and_dtype(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv + ["--random-weights", "--out", str(tmp_path)])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_cli_missing_checkpoint_exits_1_with_hint(tmp_path, capsys):
    code = main(["--component", "unet", "--checkpoint", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "--random-weights" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()

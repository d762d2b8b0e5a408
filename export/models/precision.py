"""Precision policy of the models in reduced precision: which parts run in which type.

One policy for the exported graphs and the runtime's torch backend, so both compute alike.
Strongly typed TensorRT builds follow the types in the ONNX graph, so the graph is where the
precision is decided:
- weights and activations in the compute dtype (fp32, fp16 or bf16);
- graph inputs and outputs that the runtime touches (latents, velocity, image) stay fp32, and
  the time embedding is computed in fp32 (MODEL.md section 2); tensors passed from one engine
  to the next (cond, lr1..3, decoder features) travel in the compute dtype;
- GroupNorm statistics in fp32 when ``norm_fp32`` (the default for reduced precision, see
  ``DEFAULT_POLICY``);
- when ``resize_fp32`` (bf16), every Resize on fp32 data: the U-Net's bilinear ones and the VAE
  decoder's nearest ones (diffusers' ``Upsample2D``). TensorRT's operator reference lists no bf16
  for its Resize layer (int8, fp16, fp32) while onnx-tensorrt's table lists BF16; fp32 is
  supported by both. Nearest copies values, so there it costs two casts and no accuracy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .components import Part
from .upscaler_unet import BilinearResize

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Policy:
    dtype: str
    norm_fp32: bool
    resize_fp32: bool

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


DEFAULT_POLICY = {
    "fp32": Policy("fp32", norm_fp32=False, resize_fp32=False),
    "fp16": Policy("fp16", norm_fp32=True, resize_fp32=False),
    "bf16": Policy("bf16", norm_fp32=True, resize_fp32=True),
}


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm whose mean/variance and affine run in fp32, output in the input's type."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def _upcast_group_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.GroupNorm:
            upcast = Fp32GroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
            upcast.load_state_dict(child.state_dict())
            setattr(module, name, upcast)
        else:
            _upcast_group_norms(child)


class _CastInput(nn.Module):
    """Runs ``module`` on its input cast to the module's weight type (a bf16 conv after fp32 data)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.module.weight.dtype))


class Fp32NearestUpsample(nn.Module):
    """diffusers' ``Upsample2D`` with its nearest interpolation on fp32 data, the conv in its own type."""

    def __init__(self, upsample: Upsample2D):
        super().__init__()
        if upsample.norm is not None:
            raise ValueError("Upsample2D with a norm would run the norm on fp32 data; not supported")
        conv_name = "conv" if upsample.name == "conv" else "Conv2d_0"
        conv = getattr(upsample, conv_name)
        if conv is not None:
            setattr(upsample, conv_name, _CastInput(conv))
        self.upsample = upsample

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.upsample(x.float(), output_size).to(x.dtype)


def _upcast_nearest_upsamplers(module: nn.Module) -> None:
    for name, child in module.named_children():
        # Only these interpolate: a transposed-conv or non-interpolating Upsample2D has no Resize.
        if isinstance(child, Upsample2D) and child.interpolate and not child.use_conv_transpose:
            setattr(module, name, Fp32NearestUpsample(child))
        else:
            _upcast_nearest_upsamplers(child)


def apply_policy(module: nn.Module, policy: Policy) -> nn.Module:
    """A copy of ``module`` (weights included) cast and patched as ``policy`` says."""
    module = copy.deepcopy(module)
    if policy.norm_fp32:
        _upcast_group_norms(module)
    module = module.to(policy.torch_dtype)
    if policy.norm_fp32:
        for child in module.modules():
            if isinstance(child, Fp32GroupNorm):
                child.float()
    if policy.resize_fp32:
        for child in module.modules():
            if isinstance(child, BilinearResize):
                child.compute_dtype = torch.float32
        _upcast_nearest_upsamplers(module)
    return module.eval()


class TypedGraph(nn.Module):
    """Casts each input to the dtype the graph computes in and each output to its I/O dtype.

    ``input_dtypes``/``output_dtypes`` map position -> dtype; ``None`` keeps a tensor as it is.
    """

    def __init__(
        self,
        module: nn.Module,
        input_dtypes: list[torch.dtype | None],
        output_dtypes: list[torch.dtype | None],
    ):
        super().__init__()
        self.module = module
        self.input_dtypes = input_dtypes
        self.output_dtypes = output_dtypes

    def forward(self, *inputs: torch.Tensor):
        cast = [x if d is None else x.to(d) for x, d in zip(inputs, self.input_dtypes)]
        outputs = self.module(*cast)
        single = isinstance(outputs, torch.Tensor)
        outputs = (outputs,) if single else tuple(outputs)
        outputs = tuple(y if d is None else y.to(d) for y, d in zip(outputs, self.output_dtypes))
        return outputs[0] if single else outputs


def typed_part(part: Part, module: nn.Module, dtype: torch.dtype) -> TypedGraph:
    """``module`` (the part, already cast to ``dtype``) with the part's fp32 boundaries."""
    cast_in = [dtype if n in part.fp32_inputs else None for n in part.inputs]
    cast_out = [torch.float32 if n in part.fp32_outputs else dtype for n in part.outputs]
    return TypedGraph(module, cast_in, cast_out)

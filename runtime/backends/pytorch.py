"""The torch backend: the eager (or compiled) models rebuilt from the weights the manifest names."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import ContextManager

import torch

from engines.manifest import Manifest, ManifestError

from ..numerics import full_fp32
from ..upscale_pass import timesteps, x0_from_velocity
from .base import Backend, BackendUnavailable, Tensors
from .registry import BackendSpec, OpenRequest, register

logger = logging.getLogger(__name__)


TORCH_PRECISIONS = ("fp32", "fp16", "bf16")
# torch.compile modes; the ones that capture CUDA graphs replay a whole pass per shape on the GPU.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class TorchBackend(Backend):
    """Eager (or compiled) PyTorch, rebuilt from the weights the manifest names.

    The only runtime code that imports ``export``, and only its model definitions
    (``export.models``, ``export.checkpoint``), lazily. The weights are checked against the digests
    recorded at build time, so this backend runs exactly what the graphs were exported from.

    - ``precision="fp32"`` (default) is the reference: IEEE fp32, TF32 off while it runs
      (``runtime.numerics.full_fp32``). ``fp16``/``bf16`` follow the exported graphs' precision
      policy (``export.models.precision``: fp32 time embedding and GroupNorm statistics, fp32 at
      the pass's boundaries); the VAE decoder then runs in bf16 (FLUX's VAE overflows fp16).
    - ``compile_mode`` (one of ``COMPILE_MODES``): channels-last weights, and ``torch.compile`` of
      the whole pass (encoder, U-Net, ``x0 = noise - v``) and of the decoder, one compilation per
      input shape (the first call at a shape pays it; Inductor's on-disk cache, under
      ``TORCHINDUCTOR_CACHE_DIR``, spares a second process most of it). ``reduce-overhead`` and
      ``max-autotune`` replay each shape's pass as a CUDA graph.
    - On the CPU, ``bf16`` runs channels-last: oneDNN's convolutions on the CPU's bf16 matrix units
      (AMX, AVX-512 BF16; ``runtime.cpu``), what ``auto`` chooses on such CPUs.
    """

    name = "torch"

    def __init__(
        self,
        manifest: Manifest,
        device: torch.device,
        precision: str = "fp32",
        compile_mode: str | None = None,
        offline: bool = False,
        components: tuple[str, ...] | None = None,
        models: object | None = None,
    ):
        """``offline``: rebuild from local weights (files, the Hugging Face cache) only, never a
        download: what ``auto`` asks, so that a folder copied without its weights falls back to
        its graphs at once. ``components``: the folder's components to rebuild (default: all).
        ``models``: the fp32 eager models (``export.models.components.Models``) already loaded,
        instead of the manifest's weight record (``runtime.checkpoint``: a checkpoint without a folder)."""
        if precision not in TORCH_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(TORCH_PRECISIONS)}, got {precision!r}")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)} or None, got {compile_mode!r}")
        needs = "the torch backend needs the model code's packages (pip install -e '.[models]')"
        try:
            from export.checkpoint import CheckpointError
            from export.models.components import PARTS, Models
            from export.models.precision import DEFAULT_POLICY, apply_policy, typed_part
            from export.models.weights_record import models_from_weights_record
        except ImportError as exc:  # an app installed with the runtime's core and no `models` extra
            raise BackendUnavailable(f"{needs}: {exc}") from exc

        try:
            names = [n for n in manifest.components if components is None or n in components]
            if models is None:
                models = models_from_weights_record(manifest.weights, names, offline=offline)
        except ImportError as exc:  # huggingface_hub, imported when a checkpoint is read
            raise BackendUnavailable(f"{needs}: {exc}") from exc
        except CheckpointError as exc:  # the weights could not be read (offline: not in a local cache)
            hint = " (auto reads local files and the Hugging Face cache only; backend='torch' downloads)" if offline else ""
            raise BackendUnavailable(f"the torch backend cannot rebuild the models{hint}: {exc}") from exc
        except (ManifestError, ValueError, TypeError, KeyError) as exc:  # no source recorded, other weights; a hand-edited record
            raise BackendUnavailable(f"the torch backend cannot rebuild the models: {exc}") from exc
        self.device, self.precision, self.compile_mode = device, precision, compile_mode
        self.name = "torch" if precision == "fp32" and compile_mode is None else (
            f"torch-{precision}" + (f"-compile-{compile_mode}" if compile_mode else "")
        )
        policy = DEFAULT_POLICY[precision]
        decoder_policy = DEFAULT_POLICY["fp32" if precision == "fp32" else "bf16"]
        if models.unet is not None and precision != "fp32":
            models = Models(unet=apply_policy(models.unet, policy), vae=models.vae, cut=models.cut)
        # oneDNN runs bf16/fp16 convolutions on the CPU's matrix units in channels-last only
        # (NCHW bf16 is no faster than fp32 there: benchmarks/results/cpu_latency.md).
        self._channels_last = compile_mode is not None or (device.type == "cpu" and precision != "fp32")
        self._modules, self._parts = {}, {}
        for name in names:
            part = PARTS[name]
            module, part_policy = part.module(models), policy
            if part.needs == "vae":
                part_policy = decoder_policy
                module = apply_policy(module, part_policy) if part_policy.dtype != "fp32" else module
            module = typed_part(part, module, part_policy.torch_dtype).to(device)
            if self._channels_last:
                module = module.to(memory_format=torch.channels_last)
            self._modules[name], self._parts[name] = module, part
        self._decode = self._modules.get("vae_decoder")
        self._pass = None
        self.compile_seconds: dict[tuple[int, ...], float] = {}  # first call per latents_small shape
        if compile_mode is not None:
            self._pass = torch.compile(self._eager_pass, mode=compile_mode, dynamic=False, fullgraph=True)
            if self._decode is not None:
                self._decode = torch.compile(self._decode, mode=compile_mode, dynamic=False, fullgraph=True)

    def _numerics(self) -> ContextManager[None]:
        return full_fp32() if self.precision == "fp32" else nullcontext()

    def _eager_pass(self, latents_small: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        encoded = self._modules["cond_encoder"](latents_small, timesteps(latents_small.shape[0], latents_small.device))
        return x0_from_velocity(noise, self._modules["unet"](noise, *encoded))

    def _prepared(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._channels_last and tensor.dim() == 4:
            return tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def fused_pass(self, latents_small: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        if self._pass is None or "cond_encoder" not in self._modules:
            return None
        return self._run_compiled_pass

    @torch.no_grad()
    def _run_compiled_pass(self, latents_small: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.compile_mode in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()
        shape = tuple(latents_small.shape)
        started = time.perf_counter()
        with self._numerics():
            x0 = self._pass(self._prepared(latents_small), self._prepared(noise))
        if shape not in self.compile_seconds:  # the first call at a shape compiles it
            self.compile_seconds[shape] = time.perf_counter() - started
            logger.info("torch backend: compiled the pass for %s in %.1f s", shape, self.compile_seconds[shape])
        return self._handed_over(x0)

    def _handed_over(self, tensor: torch.Tensor) -> torch.Tensor:
        """An fp32 output as the caller gets it: the standard layout, and memory of its own where
        a CUDA graph would overwrite it on its next replay."""
        if self.compile_mode in CUDA_GRAPH_MODES:
            return tensor.clone(memory_format=torch.contiguous_format)
        return tensor.contiguous()

    @torch.no_grad()
    def run(self, component: str, inputs: Tensors) -> Tensors:
        part = self._parts[component]
        args = [self._prepared(inputs[n]) for n in part.inputs]
        compiled = component == "vae_decoder" and self.compile_mode is not None
        if compiled and self.compile_mode in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()
        with self._numerics():
            result = (self._decode if compiled else self._modules[component])(*args)
        result = (result,) if isinstance(result, torch.Tensor) else result
        return {
            n: self._handed_over(r) if n in part.fp32_outputs else r for n, r in zip(part.outputs, result)
        }

    def run_precision(self, component: str) -> str | None:
        if self.precision == "fp32":
            return "fp32"
        return "bf16" if self._parts[component].needs == "vae" else self.precision

    def memory_bytes(self) -> int:
        if self.device.type == "cpu":
            return 0
        # cond_encoder and unet share one U-Net: count each tensor once.
        tensors = {t.data_ptr(): t for m in self._modules.values() for t in m.state_dict().values()}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def close(self) -> None:
        self._modules.clear()
        self._pass = self._decode = None



def _open_torch(request: OpenRequest) -> Backend:
    return TorchBackend(request.manifest, request.device, **request.torch_options, components=request.only)


register(BackendSpec("torch", "torch and the model definitions (the models extra); the weights the manifest names",
                     ("cpu", "cuda"), _open_torch))

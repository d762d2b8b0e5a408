"""The check-set stage: inputs and fp32 eager outputs stored in the artifact folder, so that engines
built where they cannot run (TensorRT-RTX ahead of time) can be checked where they do run
(``runtime.check``, and the runtime itself on first use; DESIGN.md "Trust for engines built where
they cannot run").

For every built component: batch 1 at the smallest size its first profile admits (its ``min``
shapes, so every engine takes them), inputs in the types the graph takes (read from the graph, so
the engine built from it takes them too), and the fp32 eager outputs of the fp32 inputs before that
cast, as ``export.onnx.validate`` measures (the U-Net is charged for the fp16 rounding of what the
encoder feeds it, as in the pipeline). With both pass components: one whole 2x pass
(``latents_small``, its noise drawn by the runtime's CPU convention and stored, and the fp32 eager
``x0``), whose two steps are the encoder's and the U-Net's entries (each full-size eager call costs
seconds on a CPU, so each runs once).

The limits are stored as absolute numbers beside the tensors, because the runtime may not import
the build or ``calib`` (DESIGN.md "Layering"):
- per component output, the ONNX validation tolerance of its precision (``export.onnx.validate``:
  rel-L2, and max-abs scaled by ``max(1, max|ref|)``, here multiplied out); quantized components
  get ``QUANTIZED_TOLERANCES`` (measured on the CPU, see there);
- the pass, the accuracy gate's limits for the U-Net precision (``calib.thresholds.THRESHOLDS``:
  rel-L2 and max-abs of ``x0``; no decoded PSNR, which needs the eager decoder).
- fp32 components built with TF32 allowed get the fp16 limits: TF32 keeps fp16's 10-bit mantissa.
- beside those, float components and the pass store the limits of the other float precisions a
  runtime may run them in (``precision_limits``: fp16, bf16), so that the torch backend in bf16 on
  a CPU (what ``auto`` runs there) is held to bf16's limits, not to the fp16 graph's.

Reused when the components' graphs (file hashes), precisions and first profiles, the weights, the
seed, the TF32 option and the source of every project module this stage imports are unchanged.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch
from safetensors.torch import save

from calib.thresholds import CPU_INT8, GATE_OF, THRESHOLDS
from engines.files import atomic_output
from engines.manifest import CheckSetRecord, ComponentRecord, content_key, sha256_file
from export.onnx.components import COMPONENTS, Models
from export.onnx.validate import TOLERANCES, Tolerance
from runtime.upscale_pass import TIMESTEP
from runtime.noise import CpuNoise
from runtime.numerics import full_fp32

from .errors import BuildError
from .folder import CHECK_DIR, ArtifactFolder
from .progress import StageLog
from .sources import source_digest

if TYPE_CHECKING:
    from .settings import BuildSettings

# export.pipeline.settings.PASS_COMPONENTS, not imported: the settings import the quantizer, the
# gate and through it the runtime's backends, whose edits would change this stage's key for nothing.
PASS_COMPONENTS = ("cond_encoder", "unet")
CHECK_SET_FORMAT = "flow-upscaler-check-set"
CHECK_SET_VERSION = 1
PASS = "pass"
# Per output of an int8/fp8 component (rel-L2, and max-abs over max(1, max|ref|)). Measured with
# ONNX Runtime's CPU provider on the small random-weight models of the tests at their check-set
# shapes (8x8 latents in): int8 worst rel-L2 0.064 (unet velocity), 0.032 (cond_encoder lr maps);
# fp8 0.20 and 0.10; max-abs at most 0.11 and 0.24 of the scale. A component's own error at the
# smallest shape is larger than the whole pass's (int8 0.028, fp8 0.079), which the pass check
# holds to the accuracy gate's limits; these leave about 2x headroom in rel-L2 (another runtime's
# int8/fp8 kernels, TensorRT's, round differently) and keep the gate's max-abs.
QUANTIZED_TOLERANCES = {
    "int8": Tolerance(rel_l2=0.15, max_abs=0.5),
    "fp8": Tolerance(rel_l2=0.4, max_abs=1.0),
}
QUANTIZED_TOLERANCES[CPU_INT8] = QUANTIZED_TOLERANCES["int8"]  # the CPU graphs (export.pipeline.cpu_graphs)
_ONNX_TYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
}


def graph_input_dtypes(path: Path) -> dict[str, torch.dtype]:
    """The type of each input of the ONNX graph at ``path``: what its engine takes, too."""
    graph = onnx.load(str(path), load_external_data=False).graph
    dtypes = {}
    for value in graph.input:
        element = value.type.tensor_type.elem_type
        if element not in _ONNX_TYPES:
            raise BuildError(f"{path.name}: input {value.name} has ONNX type {element}, which the check set cannot hold")
        dtypes[value.name] = _ONNX_TYPES[element]
    return dtypes


def tensor_name(component: str, kind: str, name: str) -> str:
    """A tensor's name in the check-set file: ``<component>/<inputs|outputs>/<name>``, ``pass/<name>``."""
    return f"{component}/{kind}/{name}" if kind else f"{component}/{name}"


def component_limits(precision: str, tf32: bool) -> Tolerance:
    """The tolerance of one component's outputs at ``precision`` (see the module docstring)."""
    if precision == "fp32" and tf32:
        precision = "fp16"
    return QUANTIZED_TOLERANCES.get(precision) or TOLERANCES[precision]


def pass_limits(precision: str, tf32: bool) -> dict[str, float]:
    """The accuracy gate's limits on one pass's ``x0`` (rel-L2, max-abs) at ``precision``."""
    precision = GATE_OF.get(precision, precision)  # cpu-int8's pass: bf16's limits
    limits = THRESHOLDS["fp16" if precision == "fp32" and tf32 else precision]
    return {"rel_l2": limits.rel_l2, "max_abs": limits.max_abs}


# Precisions a runtime may run a component in other than its graph's own: the torch backend runs
# bf16 on CPUs with bf16 units (``auto``), fp16 or bf16 when asked; ONNX Runtime's CPU provider runs
# the pass components' CPU graphs (cpu-int8) where the folder has them. The check set stores their
# limits too, so such a run is held to the limits of what it runs.
RUN_PRECISIONS = ("fp16", "bf16")


def _other_precisions(precision: str, component: str) -> list[str]:
    """Precisions to store limits for beside ``precision``'s (quantized graphs' too: the torch
    backend runs their float models); ``component``: a pass component or ``PASS``."""
    cpu = [CPU_INT8] if component in (*PASS_COMPONENTS, PASS) else []
    return [p for p in RUN_PRECISIONS if p != precision] + cpu


def _errors_limits(tolerance: Tolerance, reference: torch.Tensor) -> dict[str, float]:
    scale = max(1.0, float(reference.abs().max())) if reference.numel() else 1.0
    return {"rel_l2": tolerance.rel_l2, "max_abs": tolerance.max_abs * scale}


class MakeCheckSet:
    """Check-set stage. In: the component records about to be published (graphs, precisions,
    profiles), the fp32 eager models, the weights' digests and the settings' seed and TF32 option.
    Out: the ``CheckSetRecord`` for the manifest; the file goes to ``checks/`` under a name of its
    key. Key: those inputs and the source of this module's imports."""

    def __init__(self, models: Models, settings: BuildSettings, digests: dict[str, str], folder: ArtifactFolder,
                 progress: StageLog):
        self.models, self.settings, self.digests = models, settings, digests
        self.folder, self.progress = folder, progress

    def key(self, records: dict[str, ComponentRecord]) -> str:
        graphs = {n: (r.precision, r.onnx_sha256, r.profiles[0].to_dict()) for n, r in records.items()}
        return content_key("check_set", CHECK_SET_VERSION, graphs, self.digests, self.settings.seed,
                           self.settings.options.tf32, source_digest(__name__))

    def __call__(self, records: dict[str, ComponentRecord]) -> CheckSetRecord:
        start = time.perf_counter()
        key = self.key(records)
        relative = f"{CHECK_DIR}/checkset.{key}.safetensors"  # never a file the current manifest names
        previous = self.folder.previous_check_set
        if previous and previous.key == key and previous.file == relative and self.folder.reusable(relative, previous.sha256):
            self.progress.finished("all", "check set", start, reused=True)
            return previous
        tensors: dict[str, torch.Tensor] = {}
        components: dict[str, dict] = {}
        whole_pass = {}
        with torch.inference_mode(), full_fp32():  # the references in IEEE fp32
            if set(PASS_COMPONENTS) <= set(records):
                whole_pass = self._pass(records, tensors, components)
            for index, (name, record) in enumerate(records.items()):
                if name not in components:
                    components[name], _ = self._component(name, record, tensors, seed=self.settings.seed + index)
        path = self.folder.out / relative
        data = save({k: v.contiguous() for k, v in tensors.items()},
                    metadata={"format": CHECK_SET_FORMAT, "version": str(CHECK_SET_VERSION)})
        with atomic_output(path) as partial:  # written by Python: the umask's permissions, as the graphs
            partial.write_bytes(data)
        facts = {"format": CHECK_SET_FORMAT, "version": CHECK_SET_VERSION, "bytes": len(data),
                 "reference": "fp32 eager PyTorch (IEEE fp32, TF32 off)", "seed": self.settings.seed}
        self.progress.finished("all", "check set", start, reused=False, bytes=len(data))
        components = {name: components[name] for name in records}
        return CheckSetRecord(relative, sha256_file(path), key, components, whole_pass, facts)

    def _component(self, name: str, record: ComponentRecord, tensors: dict[str, torch.Tensor],
                   raw: tuple[torch.Tensor, ...] | None = None, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
        """Store ``name``'s inputs (``raw``, fp32, or drawn at its first profile's ``min``) in the
        graph's types and the fp32 eager outputs of ``raw``; its manifest entry and those outputs.

        The outputs are those of the fp32 inputs, as ``export.onnx.validate`` measures: a component
        fed in fp16 (the U-Net's encoder inputs) is charged for that rounding, as in the pipeline."""
        spec = COMPONENTS[name]
        profile = record.profiles[0]
        if raw is None:
            _, _, height, width = profile.min[spec.inputs[0]]
            raw = spec.make_inputs(self.models, 1, height, width, torch.Generator().manual_seed(seed))
        dtypes = graph_input_dtypes(self.folder.out / record.onnx_file)
        # copies: a tensor stored under two names (an fp32 graph's encoder outputs) cannot be saved
        inputs = {n: x.to(dtypes.get(n, torch.float32), copy=True) for n, x in zip(spec.inputs, raw)}
        shapes = {n: tuple(x.shape) for n, x in inputs.items()}
        if not profile.covers(shapes):
            raise BuildError(f"the {name} check-set inputs {shapes} lie outside its first profile {profile.name}; "
                             "this is a bug in the check-set stage")
        outputs = spec.module(self.models)(*(x.float() for x in raw))
        outputs = {n: y.float() for n, y in zip(spec.outputs, (outputs,) if isinstance(outputs, torch.Tensor) else outputs)}
        tolerance = component_limits(record.precision, self.settings.options.tf32)
        others = {p: component_limits(p, False) for p in _other_precisions(record.precision, name)}
        tensors.update({tensor_name(name, "inputs", n): x for n, x in inputs.items()})
        tensors.update({tensor_name(name, "outputs", n): y for n, y in outputs.items()})
        entry = {
            "precision": record.precision,
            "profile": profile.name,
            "inputs": {n: list(s) for n, s in shapes.items()},
            "outputs": {n: list(y.shape) for n, y in outputs.items()},
            "limits": {n: _errors_limits(tolerance, y) for n, y in outputs.items()},
            "precision_limits": {p: {n: _errors_limits(t, y) for n, y in outputs.items()} for p, t in others.items()},
        }
        return entry, outputs

    def _pass(self, records: dict[str, ComponentRecord], tensors: dict[str, torch.Tensor],
              components: dict[str, dict]) -> dict:
        """One 2x pass at the encoder's first profile's ``min``: its input, noise (the runtime's CPU
        convention for the seed) and fp32 eager x0; the pass components' entries are its two steps
        (a full-size U-Net costs seconds per eager call on a CPU: each runs once)."""
        shape = records["cond_encoder"].profiles[0].min["latents_small"]
        seed = self.settings.seed
        latents_small = torch.randn(shape, generator=torch.Generator().manual_seed(seed + len(records)))
        timestep = torch.full((shape[0],), TIMESTEP, dtype=torch.float32)
        components["cond_encoder"], encoded = self._component(
            "cond_encoder", records["cond_encoder"], tensors, (latents_small, timestep))
        noise = CpuNoise(seed).next_pass(latents_small)
        components["unet"], velocity = self._component("unet", records["unet"], tensors, (noise, *encoded.values()))
        tensors[tensor_name(PASS, "", "x0")] = noise - velocity["velocity"]
        precision = records["unet"].precision
        return {
            "precision": precision,
            "latents_small": list(shape),
            "seed": seed,
            "noise": "runtime.noise.CpuNoise(seed)",
            # the pass's input and noise are the components' (safetensors stores a tensor once)
            "tensors": {"latents_small": tensor_name("cond_encoder", "inputs", "latents_small"),
                        "noise": tensor_name("unet", "inputs", "sample"), "x0": tensor_name(PASS, "", "x0")},
            "limits": pass_limits(precision, self.settings.options.tf32),
            "precision_limits": {p: pass_limits(p, False) for p in _other_precisions(precision, PASS)},
        }

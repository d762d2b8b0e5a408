"""The check-set stage: inputs and fp32 eager outputs stored in the artifact folder, so that engines
built where they cannot run (TensorRT-RTX ahead of time) can be checked where they do run
(``runtime.check``, and the runtime itself on first use; DESIGN.md "Trust for engines built where
they cannot run").

What is stored, for every built component (``cases`` in its manifest entry):
- the smallest and the largest shape of every profile (batch included: a profile's largest is its
  largest batch at its largest side), each shape once, named ``b<batch>.<height>x<width>`` of the
  main input, with the profiles it is the smallest or largest of and the profile the runtime runs
  it on (``engines.profiles.select_profile``, as the TensorRT backend chooses);
- within ``BUDGET_BYTES`` for the whole file, its header included. The smallest shapes are always
  stored (every profile admits them; a set they alone exceed holds only them). The largest shapes
  share what is left. Each profile's candidates are the shapes inside it that the runtime runs on
  it, down a ladder from its largest that narrows the width, then lowers the batch, then the
  height. First every profile gets the last (smallest) of its ladder, cheapest first, while they
  fit: coverage of every profile before size; then each, smallest profile first, grows to the
  largest on its ladder within an equal part of what is left. A case short of its profile's largest
  shape records that shape in ``reduced``; a profile that got none is in ``not_stored``, with why.
  Sizes are planned from the shapes alone (the eager outputs' shapes on the meta device) before
  any eager work.

Inputs are in the types the graph takes (read from the graph, so the engine built from it takes
them too), with the fp32 eager outputs of the fp32 inputs before that cast, as
``export.onnx.validate`` measures (the U-Net is charged for the fp16 rounding of what the encoder
feeds it, as in the pipeline). With both pass components: one whole 2x pass at the smallest shape
(``runtime.upscale_pass.run_pass`` on the eager components, ``latents_small`` and its noise drawn
by the runtime's CPU convention and stored, and the fp32 eager ``x0``), whose two steps are the
encoder's and the U-Net's smallest cases.

The limits are stored as absolute numbers beside the tensors, because the runtime may not import
the build or ``calib`` (DESIGN.md "Layering"):
- per component output, the ONNX validation tolerance of its precision (``export.onnx.validate``:
  rel-L2, and max-abs scaled by ``max(1, max|ref|)``, here multiplied out with the largest
  ``|ref|`` among the component's cases: one limit per output for all of them); quantized
  components get ``QUANTIZED_TOLERANCES`` (measured on the CPU, see there);
- the pass, the accuracy gate's limits for the U-Net precision (``calib.thresholds.THRESHOLDS``:
  rel-L2 and max-abs of ``x0``; no decoded PSNR, which needs the eager decoder).
- fp32 components built with TF32 allowed get the fp16 limits: TF32 keeps fp16's 10-bit mantissa.
- beside those, float components and the pass store the limits of the other float precisions a
  runtime may run them in (``precision_limits``: fp16, bf16), so that the torch backend in bf16 on
  a CPU (what ``auto`` runs there) is held to bf16's limits, not to the fp16 graph's.

Reused when the components' graphs (file hashes), precisions and profiles, the weights, the seed,
the TF32 option, the budget and the source of every project module this stage imports are unchanged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch
from safetensors.torch import save
from torch.func import functional_call

from calib.thresholds import CPU_INT8, GATE_OF, THRESHOLDS
from engines.files import atomic_output
from engines.manifest import CheckSetRecord, ComponentRecord, content_key, sha256_file
from engines.profiles import Profile, select_profile
from export.onnx.components import COMPONENTS, Models
from export.onnx.validate import TOLERANCES, Tolerance
from runtime.noise import CpuNoise
from runtime.numerics import full_fp32
from runtime.upscale_pass import PASS_COMPONENTS, run_pass

from .errors import BuildError
from .folder import CHECK_DIR, ArtifactFolder
from .progress import StageLog
from .sources import source_digest

if TYPE_CHECKING:
    from .settings import BuildSettings

CHECK_SET_FORMAT = "flow-upscaler-check-set"
PASS = "pass"
X0 = f"{PASS}/x0"  # the pass's fp32 eager result in the file
# The whole file at most (inputs, expected outputs, the pass's x0, the header). On the default
# target (rtx5090, full-size models) the smallest shapes take about 21 MiB, mostly the encoder's
# 384-channel maps (fp32 as expected outputs, fp16 again as the U-Net's inputs), and the profiles'
# largest shapes are far beyond any file worth shipping (the encoder's 512 profile alone about
# 2 GiB). 192 MiB is about the least that gives every one of its 9 profiles a case that runs on it
# beyond the smallest shape (planned from shapes alone, with every profile at batch 4: 12 cases,
# the largest U-Net case batch 1 at 560x128 for its 1024 profile; 128 MiB leaves 2 profiles out).
# The eager fp32 outputs cost build time roughly in proportion: measured on our 2-core box, the
# full U-Net takes about 5 s at 128x128 and the decoder about 16 s at 64x64.
BUDGET_BYTES = 192 * 2**20
# Per output of an int8/fp8 component (rel-L2, and max-abs over max(1, max|ref|)). Measured with
# ONNX Runtime's CPU provider on the small random-weight models of the tests at their smallest
# check-set shapes (8x8 latents in): int8 worst rel-L2 0.064 (unet velocity), 0.032 (cond_encoder
# lr maps); fp8 0.20 and 0.10; max-abs at most 0.11 and 0.24 of the scale. A component's own error
# at the smallest shape is larger than the whole pass's (int8 0.028, fp8 0.079), which the pass
# check holds to the accuracy gate's limits; these leave about 2x headroom in rel-L2 (another
# runtime's int8/fp8 kernels, TensorRT's, round differently) and keep the gate's max-abs.
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


def tensor_name(component: str, case: str, kind: str, name: str) -> str:
    """A tensor's name in the check-set file: ``<component>/<case>/<inputs|outputs>/<name>``."""
    return f"{component}/{case}/{kind}/{name}"


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


def _errors_limits(tolerance: Tolerance, ref_max_abs: float) -> dict[str, float]:
    return {"rel_l2": tolerance.rel_l2, "max_abs": tolerance.max_abs * max(1.0, ref_max_abs)}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * dtype.itemsize


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _header_bytes(name: str, shape: tuple[int, ...]) -> int:
    """At least what a tensor's entry takes in the safetensors header (the file's budget holds it
    too): spaced JSON, the longest dtype name and offsets up to 2**48."""
    return len(json.dumps({name: {"dtype": "BF16", "shape": list(shape), "data_offsets": [2**48, 2**48]}}))


def _case_name(batch: int, height: int, width: int) -> str:
    return f"b{batch}.{height}x{width}"


@dataclass
class Case:
    """One stored shape of one component: its main input's batch and sides, every input's shape,
    the profile ends it is (``(profile, "min" | "max")``), the profile it runs on, its size in the
    file, and, when it replaces a profile's largest shape that did not fit, that shape."""

    component: str
    batch: int
    height: int
    width: int
    shapes: dict[str, tuple[int, ...]]
    runs_on: str
    nbytes: int
    ends: list[tuple[str, str]] = field(default_factory=list)
    reduced: dict | None = None

    @property
    def name(self) -> str:
        return _case_name(self.batch, self.height, self.width)

    def to_dict(self) -> dict:
        entry = {"name": self.name, "inputs": {n: list(s) for n, s in self.shapes.items()},
                 "ends": [list(e) for e in self.ends], "runs_on": self.runs_on}
        return {**entry, "reduced": self.reduced} if self.reduced else entry


class _Sizes:
    """A component's case sizes in the file, from shapes alone: inputs in the graph's types and the
    fp32 outputs, whose shapes the eager module gives on the meta device (its weights as meta
    tensors: nothing is computed or allocated), and their entries in the file's header."""

    def __init__(self, name: str, models: Models, dtypes: dict[str, torch.dtype]):
        self.name, self.spec, self.models, self.dtypes = name, COMPONENTS[name], models, dtypes
        self.module = self.spec.module(models)
        self.meta = {n: t.to("meta") for n, t in (*self.module.named_parameters(), *self.module.named_buffers())}
        self._known: dict[tuple[int, int, int], int] = {}

    def shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        return dict(self.spec.input_shapes(self.models, batch, height, width))

    def __call__(self, batch: int, height: int, width: int) -> int:
        key = (batch, height, width)
        if key not in self._known:
            shapes = self.shapes(*key)
            with torch.no_grad():
                outputs = functional_call(self.module, self.meta,
                                          tuple(torch.empty(shapes[n], device="meta") for n in self.spec.inputs))
            outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
            case = _case_name(*key)
            self._known[key] = (
                sum(_nbytes(s, self.dtypes.get(n, torch.float32)) + _header_bytes(
                    tensor_name(self.name, case, "inputs", n), s) for n, s in shapes.items())
                + sum(_nbytes(tuple(y.shape), torch.float32) + _header_bytes(
                    tensor_name(self.name, case, "outputs", n), tuple(y.shape)) for n, y in zip(self.spec.outputs, outputs)))
        return self._known[key]


def _main_size(profile_shapes: dict[str, tuple[int, ...]], main: str) -> tuple[int, int, int]:
    batch, _, height, width = profile_shapes[main]
    return batch, height, width


def _ladder(profile: Profile, main: str, grid: int) -> list[tuple[int, int, int]]:
    """Sizes inside ``profile`` from its largest down, each no larger than the one before: the
    width narrowed to the smallest, then the batch lowered to 1, then the height lowered."""
    batch, height, width = _main_size(profile.max, main)
    _, low_height, low_width = _main_size(profile.min, main)
    return ([(batch, height, w) for w in range(width, low_width - 1, -grid)]
            + [(b, height, low_width) for b in range(batch - 1, 0, -1)]
            + [(1, h, low_width) for h in range(height - grid, low_height - 1, -grid)])


def plan_cases(records: dict[str, ComponentRecord], sizes: dict[str, _Sizes], fixed_bytes: int,
               budget: int = BUDGET_BYTES) -> tuple[dict[str, list[Case]], dict[str, dict[str, str]]]:
    """Every component's cases (the smallest shapes, then the largest within ``budget``, see the
    module docstring) and, per component, the profiles whose largest shape has no case, with why.
    ``fixed_bytes``: what the file holds beside the cases (the header's fixed part, the pass's ``x0``)."""
    cases: dict[str, list[Case]] = {name: [] for name in records}
    not_stored: dict[str, dict[str, str]] = {name: {} for name in records}

    def case_at(name: str, size: tuple[int, int, int]) -> Case:
        for case in cases[name]:
            if (case.batch, case.height, case.width) == size:
                return case
        shapes = sizes[name].shapes(*size)
        index = select_profile(records[name].profiles, shapes)
        if index is None:
            raise BuildError(f"the {name} check-set shapes {shapes} lie outside every profile; "
                             "this is a bug in the check-set stage")
        case = Case(name, *size, shapes, records[name].profiles[index].name, sizes[name](*size))
        cases[name].append(case)
        return case

    for name, record in records.items():  # the smallest shapes: always
        main = COMPONENTS[name].inputs[0]
        for profile in record.profiles:
            case_at(name, _main_size(profile.min, main)).ends.append((profile.name, "min"))
    used = fixed_bytes + sum(c.nbytes for named in cases.values() for c in named)
    plans = []  # [order, component, profile index, its ladder, the position chosen on it]
    for order, (name, record) in enumerate(records.items()):
        main = COMPONENTS[name].inputs[0]
        smallest = {(c.batch, c.height, c.width): c for c in cases[name]}
        for index, profile in enumerate(record.profiles):
            top = _main_size(profile.max, main)
            if top in smallest:  # the largest shape is already a case (a profile's smallest)
                smallest[top].ends.append((profile.name, "max"))
                continue
            ladder = [size for size in _ladder(profile, main, COMPONENTS[name].grid) if size not in smallest
                      and select_profile(record.profiles, sizes[name].shapes(*size)) == index]
            if ladder:
                plans.append([order, name, index, ladder, None])
            else:
                not_stored[name][profile.name] = "every shape that runs on it is a smallest shape, stored as such"
    # breadth: each profile the smallest shape that runs on it, cheapest first, while they fit
    for plan in sorted(plans, key=lambda p: (sizes[p[1]](*p[3][-1]), p[0], p[2])):
        _, name, index, ladder, _ = plan
        cost = sizes[name](*ladder[-1])
        if used + cost <= budget:
            plan[4], used = len(ladder) - 1, used + cost
            continue
        not_stored[name][records[name].profiles[index].name] = (
            f"even its smallest shape that runs on it (batch {ladder[-1][0]}, {ladder[-1][1]}x{ladder[-1][2]}: "
            f"{_mib(cost)}) does not fit what is left of the check set's budget ({_mib(budget - used)} of "
            f"{_mib(budget)})")
    # depth: each grown to the largest on its ladder within an equal part of what is left, smallest first
    chosen = sorted((p for p in plans if p[4] is not None), key=lambda p: (sizes[p[1]](*p[3][0]), p[0], p[2]))
    for left, (_, name, index, ladder, position) in zip(range(len(chosen), 0, -1), chosen):
        profile, main = records[name].profiles[index], COMPONENTS[name].inputs[0]
        current = sizes[name](*ladder[position])
        allowance = current + max(0, budget - used) // left
        lo, hi = 0, position  # the first size on the ladder within the allowance (sizes only fall)
        while lo < hi:
            middle = (lo + hi) // 2
            if sizes[name](*ladder[middle]) <= allowance:
                hi = middle
            else:
                lo = middle + 1
        case = case_at(name, ladder[lo])
        case.ends.append((profile.name, "max"))
        used += case.nbytes - current
        if ladder[lo] != _main_size(profile.max, main):
            case.reduced = {"profile": profile.name, "largest": list(profile.max[main]),
                            "largest_bytes": sizes[name](*ladder[0]), "allowance_bytes": allowance}
    return cases, not_stored


class MakeCheckSet:
    """Check-set stage. In: the component records about to be published (graphs, precisions,
    profiles), the fp32 eager models, the weights' digests and the settings' seed and TF32 option.
    Out: the ``CheckSetRecord`` for the manifest; the file goes to ``checks/`` under a name of its
    key. Key: those inputs, the budget and the source of this module's imports."""

    def __init__(self, models: Models, settings: BuildSettings, digests: dict[str, str], folder: ArtifactFolder,
                 progress: StageLog, budget: int = BUDGET_BYTES):
        self.models, self.settings, self.digests = models, settings, digests
        self.folder, self.progress, self.budget = folder, progress, budget

    def key(self, records: dict[str, ComponentRecord]) -> str:
        graphs = {n: (r.precision, r.onnx_sha256, [p.to_dict() for p in r.profiles]) for n, r in records.items()}
        return content_key("check_set", CheckSetRecord.VERSION, graphs, self.digests, self.settings.seed,
                           self.settings.options.tf32, self.budget, source_digest(__name__))

    def __call__(self, records: dict[str, ComponentRecord]) -> CheckSetRecord:
        start = time.perf_counter()
        key = self.key(records)
        relative = f"{CHECK_DIR}/checkset.{key}.safetensors"  # never a file the current manifest names
        previous = self.folder.previous_check_set
        if previous and previous.key == key and previous.file == relative and self.folder.reusable(relative, previous.sha256):
            self.progress.finished("all", "check set", start, reused=True)
            return previous
        dtypes = {name: graph_input_dtypes(self.folder.out / r.onnx_file) for name, r in records.items()}
        sizes = {name: _Sizes(name, self.models, dtypes[name]) for name in records}
        with_pass = set(PASS_COMPONENTS) <= set(records)
        # beside the cases: the header's length field, its metadata and padding, and the pass's x0
        fixed_bytes = 8 + 8 + len(json.dumps({"__metadata__": self._metadata()}))
        if with_pass:  # x0 has the U-Net's sample's shape, in fp32
            x0 = sizes["unet"].shapes(*_main_size(records["unet"].profiles[0].min, "sample"))["sample"]
            fixed_bytes += _nbytes(x0, torch.float32) + _header_bytes(X0, x0)
        cases, not_stored = plan_cases(records, sizes, fixed_bytes, self.budget)
        tensors: dict[str, torch.Tensor] = {}
        references: dict[str, dict[str, float]] = {name: {} for name in records}  # largest |ref| per output
        whole_pass: dict = {}
        with torch.inference_mode(), full_fp32():  # the references in IEEE fp32
            if with_pass:
                whole_pass = self._pass(records, cases, dtypes, tensors, references)
            for number, case in enumerate((c for named in cases.values() for c in named), start=1 + len(records)):
                spec = COMPONENTS[case.component]
                if tensor_name(case.component, case.name, "inputs", spec.inputs[0]) in tensors:
                    continue  # a step of the pass
                raw = spec.make_inputs(self.models, case.batch, case.height, case.width,
                                       torch.Generator().manual_seed(self.settings.seed + number))
                self._store(case, raw, dtypes[case.component], tensors, references[case.component])
        components = {name: self._entry(name, records[name], cases[name], not_stored[name], references[name])
                      for name in records}
        path = self.folder.out / relative
        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=self._metadata())
        with atomic_output(path) as partial:  # written by Python: the umask's permissions, as the graphs
            partial.write_bytes(data)
        facts = {"format": CHECK_SET_FORMAT, "version": CheckSetRecord.VERSION, "bytes": len(data),
                 "budget_bytes": self.budget, "reference": "fp32 eager PyTorch (IEEE fp32, TF32 off)",
                 "seed": self.settings.seed}
        for name, entry in components.items():
            for case in entry["cases"]:
                if "reduced" in case:
                    self.progress(f"    check set: {name} {case['reduced']['profile']} is checked at {case['name']}, "
                                  f"not at its largest shape {case['reduced']['largest']} (over the budget)")
            for profile, why in entry["not_stored"].items():
                self.progress(f"    check set: {name} {profile}: its largest shape is not checked: {why}")
        self.progress.finished("all", "check set", start, reused=False, bytes=len(data),
                               cases=sum(len(c) for c in cases.values()))
        return CheckSetRecord(relative, sha256_file(path), key, components, whole_pass, facts)

    @staticmethod
    def _metadata() -> dict[str, str]:
        return {"format": CHECK_SET_FORMAT, "version": str(CheckSetRecord.VERSION)}

    def _store(self, case: Case, raw: tuple[torch.Tensor, ...], dtypes: dict[str, torch.dtype],
               tensors: dict[str, torch.Tensor], references: dict[str, float]) -> dict[str, torch.Tensor]:
        """Store ``case``'s inputs (``raw``, fp32) in the graph's types and the fp32 eager outputs of
        ``raw``; returns those outputs.

        The outputs are those of the fp32 inputs, as ``export.onnx.validate`` measures: a component
        fed in fp16 (the U-Net's encoder inputs) is charged for that rounding, as in the pipeline."""
        spec = COMPONENTS[case.component]
        # copies: a tensor stored under two names (an fp32 graph's encoder outputs) cannot be saved
        inputs = {n: x.to(dtypes.get(n, torch.float32), copy=True) for n, x in zip(spec.inputs, raw)}
        shapes = {n: tuple(x.shape) for n, x in inputs.items()}
        if shapes != case.shapes:
            raise BuildError(f"the {case.component} check-set inputs {shapes} are not the planned {case.shapes}; "
                             "this is a bug in the check-set stage")
        outputs = spec.module(self.models)(*(x.float() for x in raw))
        outputs = {n: y.float() for n, y in zip(spec.outputs, (outputs,) if isinstance(outputs, torch.Tensor) else outputs)}
        tensors.update({tensor_name(case.component, case.name, "inputs", n): x for n, x in inputs.items()})
        tensors.update({tensor_name(case.component, case.name, "outputs", n): y for n, y in outputs.items()})
        for n, y in outputs.items():
            references[n] = max(references.get(n, 0.0), float(y.abs().max()) if y.numel() else 0.0)
        return outputs

    def _entry(self, name: str, record: ComponentRecord, cases: list[Case], not_stored: dict[str, str],
               references: dict[str, float]) -> dict:
        """The component's manifest entry: its cases, what was not stored, and the limits."""
        tolerance = component_limits(record.precision, self.settings.options.tf32)
        others = {p: component_limits(p, False) for p in _other_precisions(record.precision, name)}
        outputs = COMPONENTS[name].outputs
        return {
            "precision": record.precision,
            "outputs": list(outputs),
            "cases": [c.to_dict() for c in cases],
            "not_stored": not_stored,
            "limits": {n: _errors_limits(tolerance, references[n]) for n in outputs},
            "precision_limits": {p: {n: _errors_limits(t, references[n]) for n in outputs} for p, t in others.items()},
        }

    def _pass(self, records: dict[str, ComponentRecord], cases: dict[str, list[Case]],
              dtypes: dict[str, dict[str, torch.dtype]], tensors: dict[str, torch.Tensor],
              references: dict[str, dict[str, float]]) -> dict:
        """One 2x pass at the encoder's first profile's smallest shape, run by the runtime's own
        ``run_pass`` on the eager components: its input, noise (the runtime's CPU convention for the
        seed) and fp32 eager x0; its two steps are the pass components' smallest cases (a full-size
        U-Net costs seconds per eager call on a CPU: each runs once)."""
        size = _main_size(records["cond_encoder"].profiles[0].min, "latents_small")
        steps = {"cond_encoder": size, "unet": (size[0], 2 * size[1], 2 * size[2])}
        step_cases = {n: [c for c in cases[n] if (c.batch, c.height, c.width) == s] for n, s in steps.items()}
        if not all(step_cases.values()):
            raise BuildError(f"the check set's pass needs the U-Net's smallest shape to be twice the encoder's "
                             f"({steps}); this is a bug in the check-set stage")
        step_cases = {n: found[0] for n, found in step_cases.items()}
        seed = self.settings.seed
        latents_small = torch.randn(step_cases["cond_encoder"].shapes["latents_small"],
                                    generator=torch.Generator().manual_seed(seed + len(records)))

        def run(component: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            raw = tuple(inputs[n] for n in COMPONENTS[component].inputs)
            return self._store(step_cases[component], raw, dtypes[component], tensors, references[component])

        x0 = run_pass(run, latents_small, CpuNoise(seed))
        tensors[X0] = x0
        precision = records["unet"].precision
        encoder, unet = step_cases["cond_encoder"].name, step_cases["unet"].name
        return {
            "precision": precision,
            "latents_small": list(latents_small.shape),
            "seed": seed,
            "noise": "runtime.noise.CpuNoise(seed)",
            # the pass's input and noise are the components' (safetensors stores a tensor once)
            "tensors": {"latents_small": tensor_name("cond_encoder", encoder, "inputs", "latents_small"),
                        "noise": tensor_name("unet", unet, "inputs", "sample"), "x0": X0},
            "limits": pass_limits(precision, self.settings.options.tf32),
            "precision_limits": {p: pass_limits(p, False) for p in _other_precisions(precision, PASS)},
        }

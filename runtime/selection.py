"""Which backend runs a folder: the options ``Upscaler.load`` accepts, ``auto``'s order on each
device, and opening a backend by name through the registry (``runtime.backends.registry``).

``auto``'s order, by device. CUDA: TensorRT first; the order of the others is to be set by an
H100 measurement (benchmarks.latency --backends runtime rows); until then ONNX Runtime's CUDA
provider, then torch in the folder's precision. The CPU, by the measured order of
benchmarks/results/cpu_latency.md: the folder's CPU graphs (int8, gated at bf16's limits) where the
CPU has int8 dot products (1.5x torch's bf16 on AVX-512), decoding on the path that follows; then,
with bf16 matrix units, torch in bf16 channels-last (2.0x ONNX Runtime's fp32 on AVX-512 BF16) and
ONNX Runtime; without them ONNX Runtime, then torch in fp32. A registered backend that runs on the
device and is not in these lists is tried after them; one that does not run there is left out.
"""

from __future__ import annotations

import logging

import torch

from engines.manifest import Manifest, cpu_graphs_unusable

from .backends import COMPILE_MODES, TORCH_PRECISIONS, Backend, BackendUnavailable
from .backends.onnxruntime import CPU_GRAPHS
from .backends.registry import OpenRequest, names, spec
from .cpu import cpu_matrix_units
from .errors import InvalidArgumentError
from .inputs import DECODER
from .noise import NOISE_MODES
from .upscale_pass import PASS_COMPONENTS

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-tensorrt", "torch")  # the built-in ones
PRECISIONS = (*TORCH_PRECISIONS, "int8")
# tensorrt first wherever it runs (the built-in one on CUDA only, so the CPU lists skip it)
AUTO_ORDER_CUDA = ("tensorrt", "onnxruntime", "torch")
AUTO_ORDER_CPU_BF16 = ("tensorrt", "torch", "onnxruntime")
AUTO_ORDER_CPU = ("tensorrt", "onnxruntime", "torch")


def backend_choices() -> tuple[str, ...]:
    """What ``backend=`` takes: ``BACKENDS``, then backends registered since (an app's own)."""
    return (*BACKENDS, *(n for n in names() if n not in BACKENDS))


def check_load_options(backend: object, noise: object, precision: object, compile_mode: object) -> None:
    """Refuse, before anything is read, options ``Upscaler.load`` does not take together."""
    choices = backend_choices()
    if not isinstance(backend, str) or backend not in choices:
        raise InvalidArgumentError(f"backend must be one of {', '.join(choices)}, got {backend!r}")
    if noise not in NOISE_MODES:
        raise InvalidArgumentError(f"noise must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
    if precision is not None and precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise InvalidArgumentError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    if precision == "int8" and (backend not in ("auto", "onnxruntime") or compile_mode is not None):
        raise InvalidArgumentError(
            "precision int8 runs the folder's CPU graphs on ONNX Runtime: with backend auto or onnxruntime, "
            f"without compile_mode (got backend {backend!r}, compile_mode {compile_mode!r})"
        )
    if backend not in ("auto", "torch") and (precision, compile_mode) not in ((None, None), ("int8", None)):
        raise InvalidArgumentError(
            f"precision and compile_mode configure the torch backend; the {backend} backend runs the "
            "folder's graphs as built (rebuild with --precision to change theirs; precision int8 runs "
            "its CPU graphs on the CPU)"
        )


def folder_float_precision(manifest: Manifest) -> str:
    """The float precision the folder's U-Net graphs were built in (fp32 for quantized or fp32 ones)."""
    precision = manifest.components["unet"].precision if "unet" in manifest.components else "fp32"
    return precision if precision in ("fp16", "bf16") else "fp32"


def open_backend(kind: str, request: OpenRequest) -> Backend:
    """Open the registered backend ``kind`` (``BackendUnavailable`` where it cannot run here)."""
    entry = spec(kind)
    if entry is None:
        raise BackendUnavailable(f"no backend {kind!r} is registered (registered: {', '.join(names())})")
    return entry.open(request)


def open_decoder(kinds: tuple[str, ...], request: OpenRequest) -> Backend:
    """The first of ``kinds`` that opens and runs the decoder here (auto's decoder beside its CPU graphs)."""
    reasons = []
    for kind in kinds:
        try:
            backend = open_backend(kind, request)
            try:
                backend.check(DECODER)
            except BackendUnavailable:
                backend.close()
                raise
            return backend
        except BackendUnavailable as exc:
            reasons.append(f"{kind}: {exc}")
    raise BackendUnavailable("; ".join(reasons))


def runs_on(kind: str, device: torch.device) -> bool:
    """Whether the registered backend ``kind`` runs on ``device``'s type."""
    entry = spec(kind)
    return entry is not None and device.type in entry.devices


def auto_order(device: torch.device, manifest: Manifest, precision: str | None) -> tuple[tuple[str, ...], str | None]:
    """What ``auto`` tries on ``device``, in order, and the torch backend's precision there."""
    order, precision = _preferred(device, manifest, precision)
    listed = set(order)
    others = tuple(n for n in backend_choices()[1:] if n not in listed)
    return tuple(k for k in (*order, *others) if runs_on(k, device)), precision


def _preferred(device: torch.device, manifest: Manifest, precision: str | None) -> tuple[tuple[str, ...], str | None]:
    """The built-in preference (module docstring), logged with why. CUDA: the folder's float precision
    for torch. The CPU: torch in bf16 first where the CPU has bf16 matrix units and no other
    precision was asked for; else the fp32 path."""
    if device.type == "cuda":
        return AUTO_ORDER_CUDA, precision or folder_float_precision(manifest)
    units = cpu_matrix_units()
    threads = torch.get_num_threads()
    if precision == "int8":  # the pass on the CPU graphs only; what follows them decodes
        logger.info("backend auto on the CPU: the folder's CPU graphs (int8) on ONNX Runtime, as asked (this CPU has "
                    "%s), %d threads", units.describe(), threads)
        # the pass on the CPU graphs or nothing; what follows them decodes
        return (CPU_GRAPHS, *(AUTO_ORDER_CPU_BF16 if units.bf16 else AUTO_ORDER_CPU)[1:]), "bf16" if units.bf16 else None
    first: tuple[str, ...] = ()
    no_graphs = cpu_graphs_unusable(manifest, PASS_COMPONENTS)
    if precision is None and units.int8_dot and no_graphs is None:
        first = (CPU_GRAPHS,)
        logger.info("backend auto on the CPU: the folder's CPU graphs (int8, gated at bf16's limits) on ONNX Runtime "
                    "first (this CPU has %s; measured faster than torch's bf16, benchmarks/results/cpu_latency.md), "
                    "decoding on the path below", units.describe())
    elif precision is None:
        logger.info("backend auto on the CPU: not the folder's CPU graphs (%s)",
                    no_graphs or "this CPU has no int8 dot products (VNNI/AMX-INT8)")
    if units.bf16 and precision in (None, "bf16"):
        logger.info("backend auto on the CPU: torch in bf16, channels-last, %s (this CPU has %s; measured faster "
                    "than ONNX Runtime's fp32, benchmarks/results/cpu_latency.md), %d threads",
                    "next" if first else "first", units.describe(), threads)
        return (AUTO_ORDER_CPU_BF16[0], *first, *AUTO_ORDER_CPU_BF16[1:]), "bf16"
    reason = f"precision {precision} was asked for" if units.bf16 else f"this CPU has {units.describe()}"
    logger.info("backend auto on the CPU: ONNX Runtime (the folder's graphs) %s, then torch in %s (%s), %d threads",
                "next" if first else "first", precision or "fp32", reason, threads)
    return (AUTO_ORDER_CPU[0], *first, *AUTO_ORDER_CPU[1:]), precision

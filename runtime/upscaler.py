"""``Upscaler``: load an artifact folder once, then upscale latents 2x, 4x or 8x per call.

One pass: ``cond_encoder(latents_small, t=1000)`` -> ``unet(noise, cond, lr1..3)`` -> velocity,
then ``x0 = noise - velocity`` in fp32; 4x and 8x chain passes. Noise (``runtime.noise``): on the
CPU the cross-backend convention, on CUDA drawn on the device unless ``noise="cpu"`` asks for the
convention; a seed list gives every batch item the result it gets alone with its seed.

Thread safety: one lock per ``Upscaler`` serialises the backend work of concurrent ``upscale``
calls (TensorRT execution contexts, IO bindings and reused buffers are not re-entrant); input
checks run outside it and each call has its own generator, so calls from several threads give
the results they would give alone. A backend with a CUDA stream of its own (TensorRT) runs the
whole call there, ordered against the calling thread's stream with events, so threads on different
streams never see a shared buffer in use. For parallel throughput, load one ``Upscaler`` per thread.

Ownership: every tensor returned owns its memory, whatever the backend reuses inside.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from engines.cli import SEED_RANGE
from engines.errors import FlowUpscalerError
from engines.manifest import (
    CPU_INT8,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    cpu_graphs,
    cpu_graphs_unusable,
    load_manifest,
)
from engines.profiles import admitting_profile

from .backends import (
    COMPILE_MODES,
    ORT_TENSORRT_CACHE,
    TORCH_PRECISIONS,
    Backend,
    BackendUnavailable,
    DecoderElsewhere,
    OnnxRuntimeBackend,
    TorchBackend,
    tensorrt_provider_options,
)
from .latents import (
    LATENT_CHANNELS,
    OTHER_LATENTS,
    PACKED_CHANNELS,
    SCALES,
    InvalidLatentsError,
    LatentStats,
    denormalise,
    normalise,
    pack,
    unpack,
    validate_latents,
)
from .cpu import cpu_matrix_units
from .noise import NOISE_MODES, CpuNoise, DeviceNoise, Noise, Seeds, chain_noise_shapes
from .progress import ProgressCallback, Steps
from .upscale_pass import run_pass
from .tiling import decode_bytes, decode_tiled, tile_count

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-tensorrt", "torch")
# What ``auto`` tries, in order. CUDA: TensorRT first; the order of the others is to be set by the
# H100 measurement (benchmarks.latency --backends runtime rows); until then ONNX Runtime's CUDA
# provider, then torch in the folder's precision. The CPU, by the measured order of
# benchmarks/results/cpu_latency.md and the CPU's bf16 matrix units (runtime.cpu): with them, torch
# in bf16 channels-last (2.0x ONNX Runtime's fp32 on AVX-512 BF16), then ONNX Runtime; without
# them the fp32 path as before: ONNX Runtime, then torch in fp32.
AUTO_ORDER_CUDA = ("tensorrt", "onnxruntime", "torch")
AUTO_ORDER_CPU_BF16 = ("torch", "onnxruntime")
AUTO_ORDER_CPU = ("onnxruntime", "torch")
# Before either, where the folder has CPU graphs (int8, gated at bf16's limits) and the CPU has int8 dot
# products: those on ONNX Runtime (1.5x torch's bf16 on AVX-512), decoding on the path that follows.
CPU_GRAPHS = "onnxruntime-cpu-int8"  # the folder's CPU graphs on ONNX Runtime: auto's, or onnxruntime with precision int8
PRECISIONS = (*TORCH_PRECISIONS, "int8")
# flux2: normalised [B, 32, H/8, W/8]; flux2_packed: ComfyUI's and the diffusers pipelines' `latents=`
# form [B, 128, H/16, W/16]; flux2_vae: raw VAE latents [B, 32, H/8, W/8], what Flux2KleinPipeline
# returns and vae.decode takes (normalised with the folder's BN statistics, `latent_stats`).
LATENT_FORMATS = ("flux2", "flux2_packed", "flux2_vae")
PIPELINE = ("cond_encoder", "unet")
DECODER = "vae_decoder"
MAIN_INPUTS = {"cond_encoder": "latents_small", "unet": "sample", DECODER: "latents"}
PIXELS_PER_LATENT = 8
TILE_OVERLAP_FRACTION = 4  # overlap = tile / 4
# What torch.Generator.manual_seed takes without wrapping: it also takes -2**63..-1, as the same
# generators as seed + 2**64; refusing negatives keeps one spelling per noise.
SEED_MAX = SEED_RANGE[1]
LOAD_ATTEMPTS = 3  # loads of a folder whose manifest a finishing build replaced meanwhile


class SizeOutOfRangeError(InvalidLatentsError):
    """Latents the artifact folder's profiles do not cover, or too large to decode in the memory
    the device has free."""


class InvalidArgumentError(FlowUpscalerError, ValueError):
    """An argument other than the latents (seed, device, backend) outside what is accepted; says what is."""


class UpscalerClosedError(FlowUpscalerError, RuntimeError):
    """An ``Upscaler`` used after ``close()`` (or after its ``with`` block)."""


def check_seeds(seed: object, batch: int) -> Seeds:
    """``seed`` as an int, or as a list of one int per batch item; each in 0..2**64-1."""
    if isinstance(seed, (np.ndarray, torch.Tensor)) and seed.ndim != 1:
        if seed.ndim == 0:  # a scalar array is one seed
            return check_seed(seed.item())
        raise InvalidArgumentError(
            f"seed as an array must be 1-D, one seed per batch item ({batch} for this batch), got a "
            f"{seed.ndim}-D array of shape {tuple(seed.shape)}; flatten it (e.g. seed.ravel()) or pass a list"
        )
    if isinstance(seed, (list, tuple, np.ndarray, torch.Tensor)):
        seeds = seed.tolist() if isinstance(seed, (np.ndarray, torch.Tensor)) else list(seed)
        if len(seeds) != batch:
            raise InvalidArgumentError(
                f"seed as a list needs one seed per batch item: {batch} for this batch, got {len(seeds)}"
            )
        return [check_seed(s, f"seed[{i}]") for i, s in enumerate(seeds)]
    return check_seed(seed)


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` as an int in 0..2**64-1 (numpy integers too); anything else is refused by name."""
    accepted = f"an integer in 0..{SEED_MAX} (2**64-1)"
    if isinstance(seed, (bool, np.bool_)):
        raise InvalidArgumentError(f"{name} must be {accepted}, got {seed!r}")
    try:
        value = operator.index(seed)
    except TypeError:
        got = "None" if seed is None else f"{type(seed).__name__} {seed!r:.40}"
        raise InvalidArgumentError(f"{name} must be {accepted}, got {got}") from None
    if not 0 <= value <= SEED_MAX:
        raise InvalidArgumentError(f"{name} must be {accepted}, got {value}")
    return value


def resolve_device(device: str | torch.device | None, name: str = "device") -> torch.device:
    """The torch device to run on: ``cpu``, ``cuda``, ``cuda:N`` or an index N as torch reads it
    (None: cuda if present, else cpu).

    Refuses an unknown string or device type (``InvalidArgumentError``) and a CUDA device this
    machine lacks (``BackendUnavailable``) before anything is loaded.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise InvalidArgumentError(f"{name} must be 'cpu', 'cuda' or 'cuda:N', got {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidArgumentError(f"{name} must be 'cpu', 'cuda' or 'cuda:N', got {str(device)!r:.60}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"{name} must be 'cpu', 'cuda' or 'cuda:N', got {str(device)!r:.60}")
    if parsed.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            f"{name} {str(device)!r} asks for CUDA, but this machine has no usable CUDA device "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); use cpu"
        )
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if parsed.index is None else parsed.index
    if not 0 <= index < count:
        raise BackendUnavailable(f"{name} {str(device)!r}: this machine has CUDA devices 0..{count - 1}")
    return torch.device("cuda", index)


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can take now; None where this cannot be told.

    CUDA: the driver's free memory plus what torch's allocator holds unused. CPU: the kernel's
    ``MemAvailable`` (free plus reclaimable cache) on Linux, else the free pages ``os.sysconf``
    reports. A container's cgroup limit below the machine's is not read.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _manifest_stamp(folder: Path) -> tuple[int, int, int] | None:
    """What changes when a build replaces the folder's manifest (a new file renamed into place)."""
    try:
        stat = os.stat(folder / MANIFEST_NAME)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def _side_range(manifest: Manifest, component: str, name: str) -> tuple[int, int, int]:
    """(smallest side, largest side, largest batch) over the component's profiles."""
    profiles = manifest.components[component].profiles
    lo = min(min(p.min[name][2:]) for p in profiles)
    hi = max(max(p.max[name][2:]) for p in profiles)
    return lo, hi, max(p.max[name][0] for p in profiles)


def pass_inputs(batch: int, height: int, width: int, scale: int) -> list[tuple[str, str, tuple[int, ...], str]]:
    """(component, input, shape, description) of the main input of every engine a chain runs."""
    checks = []
    for k in range(int(math.log2(scale))):
        f, ordinal = 2**k, ("first", "second", "third")[k]
        checks.append(("cond_encoder", "latents_small", (batch, LATENT_CHANNELS, height * f, width * f),
                       f"the {ordinal} pass's input"))
        checks.append(("unet", "sample", (batch, LATENT_CHANNELS, 2 * height * f, 2 * width * f),
                       f"the {ordinal} pass's output"))
    return checks


def folder_float_precision(manifest: Manifest) -> str:
    """The float precision the folder's U-Net graphs were built in (fp32 for quantized or fp32 ones)."""
    precision = manifest.components["unet"].precision if "unet" in manifest.components else "fp32"
    return precision if precision in ("fp16", "bf16") else "fp32"


def _open_backend(kind: str, folder: Path, manifest: Manifest, device: torch.device, torch_options: dict,
                  only: tuple[str, ...] | None = None) -> Backend:
    """Open ``kind`` on the folder (``manifest``: the one the caller loaded and checked); ``only``:
    the components to open (default: all; TensorRT opens the folder's engines as they are)."""
    if kind == "tensorrt":
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend.from_folder(folder, device)
    if kind == "torch":
        return TorchBackend(manifest, device, **torch_options, components=only)
    graphs = {name: folder / record.onnx_file for name, record in manifest.components.items()
              if only is None or name in only}
    if kind == CPU_GRAPHS:
        if device.type != "cpu":
            raise BackendUnavailable(f"the folder's CPU graphs run on ONNX Runtime's CPU provider, not on {device}")
        try:
            graphs.update(cpu_graphs(folder, manifest, PIPELINE))
        except ManifestError as exc:  # none made, or one missing or changed: auto runs its next path
            raise BackendUnavailable(str(exc)) from exc
        if not cpu_matrix_units().int8_dot:
            logger.warning("the folder's CPU graphs on a CPU without int8 dot products (VNNI/AMX-INT8): ONNX Runtime's "
                           "int8 kernels multiply in 16-bit pairs here, which can saturate; auto would not run them")
        return OnnxRuntimeBackend(graphs, device, provider="cpu", variant=CPU_INT8, variant_components=PIPELINE)
    if kind == "onnxruntime-tensorrt":
        if device.type != "cuda":
            raise BackendUnavailable(f"the ONNX Runtime TensorRT provider needs a CUDA device, got {device}")
        cache = folder / ORT_TENSORRT_CACHE
        try:
            cache.mkdir(exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(f"the ONNX Runtime TensorRT provider needs a writable engine cache {cache}: {exc}") from exc
        options = {n: tensorrt_provider_options(r, cache, device.index or 0) for n, r in manifest.components.items()}
        return OnnxRuntimeBackend(graphs, device, provider="tensorrt", provider_options=options)
    return OnnxRuntimeBackend(graphs, device, provider="cpu" if device.type == "cpu" else "cuda")


def _auto_order(device: torch.device, manifest: Manifest, precision: str | None) -> tuple[tuple[str, ...], str | None]:
    """What ``auto`` tries on ``device``, in order, and the torch backend's precision there.

    CUDA: the folder's float precision for torch. The CPU: torch in bf16 first where the CPU has bf16
    matrix units and no other precision was asked for; else the fp32 path. Logged with why.
    """
    if device.type == "cuda":
        return AUTO_ORDER_CUDA, precision or folder_float_precision(manifest)
    units = cpu_matrix_units()
    threads = torch.get_num_threads()
    if precision == "int8":  # the pass on the CPU graphs only; what follows them decodes
        logger.info("backend auto on the CPU: the folder's CPU graphs (int8) on ONNX Runtime, as asked (this CPU has "
                    "%s), %d threads", units.describe(), threads)
        return (CPU_GRAPHS, *(AUTO_ORDER_CPU_BF16 if units.bf16 else AUTO_ORDER_CPU)), "bf16" if units.bf16 else None
    first: tuple[str, ...] = ()
    no_graphs = cpu_graphs_unusable(manifest, PIPELINE)
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
        return (*first, *AUTO_ORDER_CPU_BF16), "bf16"
    reason = f"precision {precision} was asked for" if units.bf16 else f"this CPU has {units.describe()}"
    logger.info("backend auto on the CPU: ONNX Runtime (the folder's graphs) %s, then torch in %s (%s), %d threads",
                "next" if first else "first", precision or "fp32", reason, threads)
    return (*first, *AUTO_ORDER_CPU), precision


def _open_decoder(kinds: tuple[str, ...], folder: Path, manifest: Manifest, device: torch.device,
                  torch_options: dict) -> Backend:
    """The first of ``kinds`` that opens and runs the decoder here (auto's decoder beside its CPU graphs)."""
    reasons = []
    for kind in kinds:
        try:
            backend = _open_backend(kind, folder, manifest, device, torch_options, only=(DECODER,))
            try:
                backend.check(DECODER)
            except BackendUnavailable:
                backend.close()
                raise
            return backend
        except BackendUnavailable as exc:
            reasons.append(f"{kind}: {exc}")
    raise BackendUnavailable("; ".join(reasons))


class Upscaler:
    """Latent upscaling with the engines (or graphs, or eager models) of one artifact folder."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        backend: Backend,
        skipped: dict[str, str] | None = None,
        noise: str = "auto",
    ):
        missing = [c for c in PIPELINE if c not in manifest.components]
        if missing:
            raise InvalidLatentsError(
                f"{folder} lacks {', '.join(missing)}; rebuild with: {manifest.rebuild_command}"
            )
        for component, name in MAIN_INPUTS.items():  # what the size checks read; hand-edited manifests
            record = manifest.components.get(component)
            ranks = {len(box.get(name, ())) for p in record.profiles for box in (p.min, p.max)} if record else {4}
            if ranks != {4}:
                raise ManifestError(
                    f"{folder}: the {component} profiles must give {name} as [batch, channels, height, width]; "
                    f"rebuild with: {manifest.rebuild_command}"
                )
        if noise not in NOISE_MODES:
            raise InvalidArgumentError(f"noise must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
        self.folder, self.manifest, self.backend = folder, manifest, backend
        self.noise_mode = ("device" if backend.device.type == "cuda" else "cpu") if noise == "auto" else noise
        self.skipped_backends = skipped or {}
        self._lock = threading.Lock()
        self._closed = False
        self._noise_worker: ThreadPoolExecutor | None = None  # draws CPU noise ahead while a GPU runs

    @classmethod
    def load(
        cls,
        artifact_dir: str | Path,
        backend: str = "auto",
        device: str | torch.device | None = None,
        noise: str = "auto",
        precision: str | None = None,
        compile_mode: str | None = None,
    ) -> Upscaler:
        """Open ``artifact_dir`` (checked against its manifest) with ``backend`` on ``device``.

        ``auto`` takes the first that opens of tensorrt, onnxruntime (CUDA) and torch (engines built
        where they could not run must first pass the folder's check set here:
        ``runtime.checkset.verify_first_use``); on the CPU, the folder's CPU graphs (below), then
        torch in bf16 (channels-last) and onnxruntime where the CPU has bf16 matrix units
        (``runtime.cpu``), else onnxruntime and torch in fp32;
        ``skipped_backends`` says why the ones before it did not, and each skip is logged as a
        warning on this module's logger. ``device``: ``cpu``, ``cuda`` or ``cuda:N`` (see
        ``resolve_device``). ``noise``: ``cpu`` (the cross-backend convention), ``device`` (drawn
        on the GPU: no host work, reproducible on the same GPU model) or ``auto`` (device on
        CUDA, cpu on the CPU); see ``runtime.noise``.

        ``precision`` and ``compile_mode`` configure the torch backend (see ``TorchBackend``):
        asked for by name it runs fp32, the reference, unless ``precision`` says otherwise; chosen
        by ``auto`` it runs the folder's float precision on CUDA and bf16 on a CPU with bf16 units
        (``precision="fp32"`` keeps ``auto`` on the CPU's fp32 path). Other backends run the folder's
        graphs or engines as built and refuse these options.

        On the CPU, ``auto`` first runs the folder's CPU graphs (int8 for ONNX Runtime, made by the
        build and gated at bf16's limits) where the CPU has int8 dot products (VNNI, AMX-INT8) and no
        precision was asked for; decoding then runs on the path that follows, opened at the first
        decode. ``precision="int8"`` (with ``auto`` or ``onnxruntime``) asks for those graphs.
        """
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise InvalidArgumentError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
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
        folder = Path(artifact_dir)
        device = resolve_device(device)
        if precision == "int8" and device.type != "cpu":
            raise InvalidArgumentError(f"precision int8 runs the folder's CPU graphs on the CPU, not on {device}")
        attempt = 1
        while True:
            # A build finishing meanwhile replaces the manifest, then deletes the files only the old one
            # named: a load that read the old one may find them gone. It loads the new one instead.
            stamp = _manifest_stamp(folder)
            try:
                loaded = cls._load_once(folder, backend, device, noise, precision, compile_mode)
            except (FlowUpscalerError, OSError):
                if attempt == LOAD_ATTEMPTS or _manifest_stamp(folder) == stamp:
                    raise
            else:
                if not loaded.skipped_backends or attempt == LOAD_ATTEMPTS or _manifest_stamp(folder) == stamp:
                    return loaded
                loaded.close()  # a backend auto skipped may have been skipped for a deleted file
            attempt += 1
            logger.info("%s: its manifest was replaced while loading (a build finished): loading the new one", folder)

    @classmethod
    def _load_once(cls, folder: Path, backend: str, device: torch.device, noise: str, precision: str | None,
                   compile_mode: str | None) -> Upscaler:
        manifest = load_manifest(folder)
        order: tuple[str, ...] = (CPU_GRAPHS,) if precision == "int8" else (backend,)
        strict = backend != "auto" or precision == "int8"  # no other path for the pass
        if backend == "auto":
            order, precision = _auto_order(device, manifest, precision)
        # auto never downloads weights: a folder copied without them falls back to its graphs at once
        torch_options = {"precision": precision or "fp32", "compile_mode": compile_mode, "offline": backend == "auto"}
        skipped = {}
        if backend == "auto" and device.type != "cuda" and any(c.engine.built for c in manifest.components.values()):
            # said, not warned: a CPU machine loading a folder built for a GPU is the normal case here
            skipped["tensorrt"] = "the folder's engines need a CUDA GPU; this machine runs on the CPU"
            logger.info("backend auto: skipped tensorrt on %s: %s", device, skipped["tensorrt"])
        from .checkset import verify_first_use  # imports this module: loaded when first needed

        for index, kind in enumerate(order):
            rest = order[index + 1:]
            try:
                if kind == CPU_GRAPHS and rest and DECODER in manifest.components:
                    # auto: the pass on the CPU graphs, decoding on the path that follows, opened when first used
                    opened = DecoderElsewhere(
                        _open_backend(kind, folder, manifest, device, torch_options, only=PIPELINE),
                        lambda rest=rest: _open_decoder(rest, folder, manifest, device, torch_options))
                else:
                    opened = _open_backend(kind, folder, manifest, device, torch_options)
                verify_first_use(opened, folder, manifest)  # engines that never ran here: checked once
                return cls(folder, manifest, opened, skipped, noise)
            except BackendUnavailable as exc:
                if strict:
                    raise
                skipped[kind] = str(exc)
                # said, not warned: torch before ONNX Runtime on the CPU is a speed-up that a folder
                # deployed without its weights (or an app without the models extra) goes without
                level = logging.INFO if kind == "torch" and "onnxruntime" in order[index + 1:] else logging.WARNING
                logger.log(level, "backend auto: skipped %s on %s: %s", kind, device, exc)
        raise BackendUnavailable("no backend can run here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        device: str | torch.device | None = None,
        noise: str = "auto",
        precision: str | None = None,
        compile_mode: str | None = None,
    ) -> Upscaler:
        """The published Flow Upscaler ``.safetensors`` file on the torch backend, without a build.

        No graphs, engines, check set or decoder (``decode`` is refused: decode with the FLUX.2 VAE);
        sizes are bounded by memory only (``runtime.checkpoint``). ``precision``: fp32 (default, the
        reference), fp16 or bf16 (``TorchBackend``'s policies); ``device`` and ``noise`` as in ``load``.
        """
        if noise not in NOISE_MODES:
            raise InvalidArgumentError(f"noise must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
        if precision is not None and precision not in TORCH_PRECISIONS:
            raise InvalidArgumentError(
                f"a checkpoint runs on the torch backend: precision must be one of {', '.join(TORCH_PRECISIONS)}, "
                f"got {precision!r} (int8 needs a folder built with python -m export.build)")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise InvalidArgumentError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
        from .checkpoint import open_checkpoint

        path, manifest, backend = open_checkpoint(checkpoint, resolve_device(device), precision or "fp32", compile_mode)
        return cls(path, manifest, backend, noise=noise)

    @staticmethod
    def memory_needed(artifact_dir: str | Path) -> int:
        """Device memory (bytes) the folder needs loaded, from its manifest's figures, read before
        loading (``runtime.footprint``): what a host sharing the GPU frees first."""
        from .footprint import memory_needed

        return memory_needed(artifact_dir)

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (a host keeping upscalers open checks it before reuse)."""
        return self._closed

    @property
    def latent_stats(self) -> LatentStats:
        """The BN statistics of the VAE the folder was built with (its manifest's record): what
        ``runtime.latents.normalise``/``denormalise`` and ``latent_format="flux2_vae"`` use."""
        record = self.manifest.weights.get("vae", {}).get("latent_stats")
        if record is None:
            raise InvalidArgumentError(
                f"{self.folder} records no VAE statistics (a checkpoint, a folder built without vae_decoder, or "
                f"by an older build: {self.manifest.rebuild_command}); normalise raw VAE latents yourself with "
                "runtime.latents.normalise(latents, LatentStats.from_vae(pipe.vae))")
        try:
            return LatentStats.from_record(record)
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{self.folder}: weights.vae.latent_stats is malformed ({exc}); rebuild with: "
                                f"{self.manifest.rebuild_command}") from None

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def memory_bytes(self) -> int:
        """Device memory the backend holds (0 on the CPU)."""
        return self.backend.memory_bytes()

    def close(self) -> None:
        """Free the backend; later ``upscale``/``decode`` calls raise ``UpscalerClosedError``.

        Waits for a call in progress on another thread: the backend is never freed under it.
        """
        with self._lock:
            self._closed = True
            self.backend.close()
            if self._noise_worker is not None:
                self._noise_worker.shutdown(wait=True)

    def _require_open(self) -> None:
        if self._closed:
            raise UpscalerClosedError(
                f"this Upscaler ({self.folder}) is closed; load it again with Upscaler.load({str(self.folder)!r})"
            )

    def __enter__(self) -> Upscaler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- input checks -------------------------------------------------------------------------

    def _as_tensor(self, latents: object) -> torch.Tensor:
        if isinstance(latents, np.ndarray):
            if self.device.type != "cpu":
                raise InvalidLatentsError(
                    f"numpy input is accepted on the CPU only; this upscaler runs on {self.device}: "
                    "pass a torch tensor on that device"
                )
            return torch.from_numpy(latents)
        if not isinstance(latents, torch.Tensor):
            raise InvalidLatentsError(f"latents must be a torch.Tensor or numpy array, got {type(latents).__name__}")
        if latents.device != self.device:
            raise InvalidLatentsError(
                f"latents are on {latents.device} but this upscaler runs on {self.device}; move them with .to('{self.device}')"
            )
        # An upscaler does not backpropagate: a tensor that requires grad is read as its values.
        return latents.detach()

    @staticmethod
    def _require_batch(x: torch.Tensor) -> None:
        if x.dim() >= 1 and x.shape[0] == 0:
            raise InvalidLatentsError(
                f"latents are an empty batch (shape {tuple(x.shape)}): pass at least one latent [1.., 32, h, w]"
            )

    def _check_range(self, component: str, name: str, shape: tuple[int, ...], what: str) -> None:
        if admitting_profile(self.manifest.components[component].profiles, name, shape) is not None:
            return
        lo, hi, batch = _side_range(self.manifest, component, name)
        px = PIXELS_PER_LATENT
        raise SizeOutOfRangeError(
            f"{what} of {shape[2]}x{shape[3]} latent pixels ({shape[2] * px}x{shape[3] * px} px) at batch "
            f"{shape[0]} is outside what {self.folder} was built for: {component} takes sides {lo}..{hi} "
            f"({lo * px}..{hi * px} px), batch up to {batch}. Rebuild with other --min-px/--max-px/--max-batch: "
            f"{self.manifest.rebuild_command}"
        )

    def _unpacked(self, latents: object, latent_format: str) -> torch.Tensor:
        if latent_format not in LATENT_FORMATS:
            raise InvalidLatentsError(f"latent_format must be one of {LATENT_FORMATS}, got {latent_format!r}")
        x = self._as_tensor(latents)
        if x.dim() == 3 and x.shape[2] == PACKED_CHANNELS:
            raise InvalidLatentsError(
                f"latents of shape {tuple(x.shape)} look like Flux2Pipeline's tokens [batch, h*w, {PACKED_CHANNELS}], "
                "which carry no image size: convert them with runtime.latents.tokens_to_packed(tokens, height, width) "
                "and pass latent_format='flux2_packed'")
        if x.dim() == 4 and x.shape[1] in OTHER_LATENTS:
            raise InvalidLatentsError(
                f"latents have {x.shape[1]} channels, as {OTHER_LATENTS[x.shape[1]]} latents do; the Flow Upscaler "
                f"takes FLUX.2 latents: [batch, {LATENT_CHANNELS}, H/8, W/8], or {PACKED_CHANNELS} channels packed")
        if latent_format == "flux2_packed":
            if x.dim() != 4 or x.shape[1] != PACKED_CHANNELS:
                raise InvalidLatentsError(
                    f"flux2_packed latents must be [batch, {PACKED_CHANNELS}, h, w], got shape {tuple(x.shape)}"
                )
            x = unpack(x)
        elif x.dim() == 4 and x.shape[1] == PACKED_CHANNELS:
            raise InvalidLatentsError(
                f"latents have {PACKED_CHANNELS} channels: pass latent_format='flux2_packed' for packed FLUX.2 "
                f"latents, or unpacked [batch, {LATENT_CHANNELS}, h, w]"
            )
        elif latent_format == "flux2_vae":
            stats = self.latent_stats
            validate_latents(x)  # before the normalisation, which needs the shape and hides a non-float dtype
            x = normalise(x.float(), stats)
        return x

    def _check_decode(self, batch: int, height: int, width: int, new_latents: bool) -> None:
        """Whether the folder and backend decode these latents, and the device's memory holds the images.
        Reads the shape only. ``new_latents``: the call makes the fp32 latents it decodes."""
        if DECODER not in self.manifest.components:
            raise BackendUnavailable(
                f"decoding needs a vae_decoder in {self.folder}; rebuild with --components cond_encoder unet vae_decoder"
            )
        try:
            self.backend.check(DECODER)
        except BackendUnavailable:
            self._require_open()  # closed meanwhile by another thread: say so
            raise
        lo, _, max_batch = _side_range(self.manifest, DECODER, "latents")
        if min(height, width) < lo or batch > max_batch:
            raise SizeOutOfRangeError(
                f"decoding {batch}x{height}x{width} latents needs sides of at least {lo} and batch up to "
                f"{max_batch} (the vae_decoder profile of {self.folder})"
            )
        self._check_decode_memory(batch, height, width, new_latents)

    def _decode_tile(self) -> int:
        return max(self.manifest.components[DECODER].profiles[0].max["latents"][2:])

    def decode_memory_bytes(self, batch: int, height: int, width: int, new_latents: bool = False) -> tuple[int, int]:
        """(bytes the decode of [batch, 32, height, width] latents allocates for its images,
        bytes one tile's decode works in): the images' from their size (with the fp32 latents when
        the call makes them: an upscale's output, a conversion to fp32), the tile's from the
        folder's memory estimate of the vae_decoder profile (at its largest tile and batch)."""
        estimates = self.manifest.components[DECODER].memory_estimate_bytes
        latents = 4 * batch * LATENT_CHANNELS * height * width if new_latents else 0
        return latents + decode_bytes(batch, height, width, self._decode_tile()), max(estimates, default=0)

    def _check_decode_memory(self, batch: int, height: int, width: int, new_latents: bool = False) -> None:
        """Refuse, before any work, a decode whose images and tile work exceed the free memory."""
        image, work = self.decode_memory_bytes(batch, height, width, new_latents)
        available = available_memory(self.device)
        if available is None or image + work <= available:
            return
        side, step = 0, 1 << 20  # the largest square decode that fits, at this batch
        while step:
            if sum(self.decode_memory_bytes(batch, side + step, side + step, new_latents)) <= available:
                side += step
            step //= 2
        side -= side % 2
        px = PIXELS_PER_LATENT
        fits = (f"at batch {batch} it decodes up to about {side}x{side} latents ({side * px}x{side * px} px) now"
                if side >= 2 else "not even the smallest decode fits now")
        raise SizeOutOfRangeError(
            f"decoding {batch}x{height}x{width} latents ({height * px}x{width * px} px) needs about "
            f"{_gib(image + work)} ({_gib(image)} for the fp32 images and their blending, {_gib(work)} for a "
            f"tile's decode) but {self.device} has about {_gib(available)} free: {fits}; decode smaller "
            "latents or fewer at once, or free memory"
        )

    def check_input(
        self, latents: torch.Tensor | np.ndarray, scale: int = 2, decode: bool = False, latent_format: str = "flux2"
    ) -> torch.Tensor:
        """Validate everything before any work; returns the unpacked 32-channel latents."""
        self._require_open()
        if isinstance(scale, bool) or scale not in SCALES:
            raise InvalidLatentsError(f"scale must be one of {SCALES}, got {scale!r}")
        x = self._unpacked(latents, latent_format)
        self._require_batch(x)
        validate_latents(x)
        b, _, h, w = x.shape
        for component, name, shape, what in pass_inputs(b, h, w, scale):
            self._check_range(component, name, shape, what)
        if decode:
            self._check_decode(b, h * scale, w * scale, new_latents=True)
        return x

    # -- work ---------------------------------------------------------------------------------

    def _noise(self, seeds: Seeds, shape: tuple[int, ...], scale: int, mode: str) -> Noise:
        """Called under the lock."""
        if mode == "device":
            return DeviceNoise(seeds, self.device)
        if self.device.type == "cuda" and self._noise_worker is None:
            self._noise_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flow-upscaler-noise")
        ahead = chain_noise_shapes(shape[0], shape[2], shape[3], int(math.log2(scale)))
        return CpuNoise(seeds, self.device, ahead, self._noise_worker)

    def _pass(self, latents_small: torch.Tensor, noise: Noise) -> torch.Tensor:
        fused = self.backend.fused_pass(latents_small)
        if fused is not None:
            return fused(latents_small, noise.next_pass(latents_small))
        return run_pass(self.backend.run, latents_small, noise)

    def decode_tiles(self, height: int, width: int) -> int:
        """How many tiles the decode of [B, 32, height, width] latents runs (the progress steps it reports)."""
        tile = self._decode_tile()
        return tile_count(height, width, tile, tile // TILE_OVERLAP_FRACTION)

    def _decode(self, latents: torch.Tensor, steps: Steps) -> torch.Tensor:
        tile = self._decode_tile()

        def run(tile_latents: torch.Tensor) -> torch.Tensor:
            return self.backend.run(DECODER, {"latents": tile_latents.contiguous()})["image"]

        return decode_tiled(run, latents, tile, tile // TILE_OVERLAP_FRACTION, PIXELS_PER_LATENT, steps.advance)

    def upscale(
        self,
        latents: torch.Tensor | np.ndarray,
        scale: int = 2,
        seed: int | Sequence[int] = 0,
        decode: bool = False,
        latent_format: str = "flux2",
        noise: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> torch.Tensor | np.ndarray:
        """Normalised FLUX.2 latents in, latents ``scale`` times larger out (or images with ``decode``).

        ``seed``: an int for the whole batch, or one int per batch item (each item then equals
        its result alone with its seed). ``noise``: this call's noise mode (``cpu`` or ``device``;
        None: the one loaded with). Output: the input's form (packed stays packed, ``flux2_vae``
        stays raw; numpy in, numpy out); with ``decode``, images [B, 3, 8H, 8W] fp32, about [-1, 1].

        ``progress(done, total)``: called before the work and after each pass and decoded tile;
        raising from it cancels the call between two of them (``runtime.progress``).
        """
        x = self.check_input(latents, scale, decode, latent_format)
        seeds = check_seeds(seed, x.shape[0])
        if noise not in (None, "cpu", "device"):
            raise InvalidArgumentError(f"noise must be cpu, device or None (the loaded mode), got {noise!r}")
        _check_progress(progress)
        as_numpy = isinstance(latents, np.ndarray)
        x = x.float()
        passes = int(math.log2(scale))
        tiles = self.decode_tiles(x.shape[2] * scale, x.shape[3] * scale) if decode else 0
        with self._lock, self.backend.on_stream() as caller:
            self._require_open()  # closed by another thread while this call waited
            _used_here(x, caller)
            steps = Steps(progress, passes + tiles)
            source = self._noise(seeds, tuple(x.shape), scale, noise or self.noise_mode)
            for _ in range(passes):
                x = self._pass(x, source)
                steps.advance()
            out = self._decode(x, steps) if decode else x
            _hand_over(out, caller)
        if not decode and latent_format == "flux2_packed":
            out = pack(out)
        elif not decode and latent_format == "flux2_vae":
            out = denormalise(out, self.latent_stats)
        return out.numpy() if as_numpy else out

    def decode(self, latents: torch.Tensor | np.ndarray, latent_format: str = "flux2",
               progress: ProgressCallback | None = None) -> torch.Tensor | np.ndarray:
        """Normalised latents -> images [B, 3, 8H, 8W] fp32, decoded in tiles beyond one profile tile.

        ``progress(done, total)``: as in ``upscale``, one step per tile."""
        self._require_open()
        _check_progress(progress)
        x = self._unpacked(latents, latent_format)
        self._require_batch(x)
        if x.dim() == 4 and x.shape[1] == LATENT_CHANNELS:  # before the NaN scan, which allocates a
            # flag per value (expanded latents included): a decode too large is refused from its shape
            self._check_decode(x.shape[0], x.shape[2], x.shape[3], new_latents=x.dtype != torch.float32)
        validate_latents(x)  # refuses any other shape
        x = x.float()
        with self._lock, self.backend.on_stream() as caller:
            self._require_open()  # closed by another thread while this call waited
            _used_here(x, caller)
            images = self._decode(x, Steps(progress, self.decode_tiles(x.shape[2], x.shape[3])))
            _hand_over(images, caller)
        return images.numpy() if isinstance(latents, np.ndarray) else images


def _check_progress(progress: object) -> None:
    if progress is not None and not callable(progress):
        raise InvalidArgumentError(f"progress must be a callable (done, total) or None, got {type(progress).__name__}")


def _used_here(tensor: torch.Tensor, caller: torch.cuda.Stream | None) -> None:
    """Inside the backend's stream scope: ``tensor`` (made on the caller's stream) is read on the
    backend's, so its memory must not be reused on the caller's stream before that work is done."""
    if caller is not None:
        tensor.record_stream(torch.cuda.current_stream(tensor.device))


def _hand_over(tensor: torch.Tensor, caller: torch.cuda.Stream | None) -> None:
    """Tell the allocator the caller's stream uses ``tensor`` (made on the backend's stream), so its
    memory is not reused by the backend while the caller's work on it may still be pending."""
    if caller is not None:
        tensor.record_stream(caller)

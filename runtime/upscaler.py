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

Length: over 350 lines because it is the whole public surface of ``Upscaler`` (load with
``auto``'s fallbacks, upscale, decode, the checks each call makes before any work, close); the
rules it applies live in the modules it imports (inputs, selection, upscale_pass, tiling, checkset).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from engines.errors import FlowUpscalerError
from engines.manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest

from . import inputs
from .backends import COMPILE_MODES, TORCH_PRECISIONS, Backend, DecoderElsewhere
from .backends.onnxruntime import CPU_GRAPHS
from .backends.registry import OpenRequest
from .errors import BackendUnavailable, InvalidArgumentError, NonFiniteOutputError, UpscalerClosedError
from .inputs import DECODER, MAIN_INPUTS, PIXELS_PER_LATENT, check_seeds, resolve_device
from .checkset import verify_first_use
from .latents import (LATENT_CHANNELS, SCALES, InvalidLatentsError, LatentStats, denormalise, pack,
                      validate_latents, value_range)
from .noise import NOISE_MODES, CpuNoise, DeviceNoise, Noise, Seeds, chain_noise_shapes
from .progress import ProgressCallback, Steps
from .selection import auto_order, check_load_options, open_backend, open_decoder, runs_on
from .tiling import decode_tile, decode_tiled, tile_count, tile_overlap
from .upscale_pass import PASS_COMPONENTS, run_pass

logger = logging.getLogger(__name__)

LOAD_ATTEMPTS = 3  # loads of a folder whose manifest a finishing build replaced meanwhile


def _manifest_stamp(folder: Path) -> tuple[int, int, int] | None:
    """What changes when a build replaces the folder's manifest (a new file renamed into place)."""
    try:
        stat = os.stat(folder / MANIFEST_NAME)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


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
        missing = [c for c in PASS_COMPONENTS if c not in manifest.components]
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
        check_load_options(backend, noise, precision, compile_mode)
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
            order, precision = auto_order(device, manifest, precision)
        # auto never downloads weights: a folder copied without them falls back to its graphs at once
        torch_options = {"precision": precision or "fp32", "compile_mode": compile_mode, "offline": backend == "auto"}
        skipped = {}
        if backend == "auto" and not runs_on("tensorrt", device) and any(c.engine.built for c in manifest.components.values()):
            # said, not warned: a CPU machine loading a folder built for a GPU is the normal case here
            skipped["tensorrt"] = "the folder's engines need a CUDA GPU; this machine runs on the CPU"
            logger.info("backend auto: skipped tensorrt on %s: %s", device, skipped["tensorrt"])
        request = OpenRequest(folder, manifest, device, torch_options)
        for index, kind in enumerate(order):
            rest = order[index + 1:]
            try:
                if kind == CPU_GRAPHS and rest and DECODER in manifest.components:
                    # auto: the pass on the CPU graphs, decoding on the path that follows, opened when first used
                    opened = DecoderElsewhere(
                        open_backend(kind, replace(request, only=PASS_COMPONENTS)),
                        lambda rest=rest: open_decoder(rest, replace(request, only=(DECODER,))))
                else:
                    opened = open_backend(kind, request)
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

    # -- input checks (runtime.inputs) ------------------------------------------------------

    def _unpacked(self, latents: object, latent_format: str) -> torch.Tensor:
        return inputs.unpacked(latents, latent_format, self.device, lambda: self.latent_stats)

    def _check_decode(self, batch: int, height: int, width: int, new_latents: bool) -> None:
        """Whether the folder and backend decode these latents, and the device's memory holds the images.
        Reads the shape only. ``new_latents``: the call makes the fp32 latents it decodes."""
        if DECODER in self.manifest.components:
            try:
                self.backend.check(DECODER)
            except BackendUnavailable:
                self._require_open()  # closed meanwhile by another thread: say so
                raise
        inputs.check_decode_shape(self.folder, self.manifest, batch, height, width)
        self._check_decode_memory(batch, height, width, new_latents)

    def _decode_tile(self) -> int:
        return decode_tile(self.manifest.components[DECODER])

    def decode_memory_bytes(self, batch: int, height: int, width: int, new_latents: bool = False) -> tuple[int, int]:
        """(bytes the decode's images take, bytes one tile's decode works in): ``runtime.inputs.decode_memory_bytes``."""
        return inputs.decode_memory_bytes(self.manifest, batch, height, width, new_latents)

    def _check_decode_memory(self, batch: int, height: int, width: int, new_latents: bool = False) -> None:
        inputs.check_decode_memory(self.manifest, self.device, batch, height, width, new_latents)

    def check_input(
        self, latents: torch.Tensor | np.ndarray, scale: int = 2, decode: bool = False, latent_format: str = "flux2"
    ) -> torch.Tensor:
        """Validate everything before any work; returns the unpacked 32-channel latents."""
        self._require_open()
        if isinstance(scale, bool) or scale not in SCALES:
            raise InvalidLatentsError(f"scale must be one of {SCALES}, got {scale!r}")
        if not isinstance(decode, (bool, np.bool_)):  # "no" would decode: a flag is True or False
            raise InvalidArgumentError(f"decode must be True or False, got {type(decode).__name__} {decode!r:.40}")
        x = self._unpacked(latents, latent_format)
        inputs.require_batch(x)
        validate_latents(x)
        b, _, h, w = x.shape
        for component, name, shape, what in inputs.pass_inputs(b, h, w, scale):
            inputs.check_range(self.folder, self.manifest, component, name, shape, what)
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

    def _require_finite(self, out: torch.Tensor, what: str, seeds: Seeds | None = None) -> None:
        """Never hand back NaN or Inf: the input passed every check, so a non-finite result is the
        backend's (an engine's overflow, a broken build), and the caller must hear it."""
        if all(math.isfinite(v) for v in value_range(out)):
            return
        seed = "" if seeds is None else f", seed {seeds}"
        raise NonFiniteOutputError(
            f"the {self.backend_name} backend returned NaN or Inf in the {what} (shape {tuple(out.shape)}{seed}) "
            f"for latents within the accepted range; check the folder with `python -m runtime.check {self.folder}`, "
            "or load it with backend='torch'"
        )

    def decode_tiles(self, height: int, width: int) -> int:
        """How many tiles the decode of [B, 32, height, width] latents runs (the progress steps it reports)."""
        tile = self._decode_tile()
        return tile_count(height, width, tile, tile_overlap(tile))

    def _decode(self, latents: torch.Tensor, steps: Steps) -> torch.Tensor:
        tile = self._decode_tile()

        def run(tile_latents: torch.Tensor) -> torch.Tensor:
            return self.backend.run(DECODER, {"latents": tile_latents.contiguous()})["image"]

        return decode_tiled(run, latents, tile, tile_overlap(tile), PIXELS_PER_LATENT, steps.advance)

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
        inputs.check_progress(progress)
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
            self._require_finite(out, "decoded images" if decode else f"{scale}x upscaled latents", seeds)
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
        inputs.check_progress(progress)
        x = self._unpacked(latents, latent_format)
        inputs.require_batch(x)
        if x.dim() == 4 and x.shape[1] == LATENT_CHANNELS:  # before the NaN scan, which allocates a
            # flag per value (expanded latents included): a decode too large is refused from its shape
            self._check_decode(x.shape[0], x.shape[2], x.shape[3], new_latents=x.dtype != torch.float32)
        validate_latents(x)  # refuses any other shape
        x = x.float()
        with self._lock, self.backend.on_stream() as caller:
            self._require_open()  # closed by another thread while this call waited
            _used_here(x, caller)
            images = self._decode(x, Steps(progress, self.decode_tiles(x.shape[2], x.shape[3])))
            self._require_finite(images, "decoded images")
            _hand_over(images, caller)
        return images.numpy() if isinstance(latents, np.ndarray) else images


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

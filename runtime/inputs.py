"""Every check ``Upscaler`` makes before any work: arguments (seeds, device, progress), latents (type,
device, form, size against the folder's profiles) and decodes (the decoder, its profile, the memory
the images need). Refusals say what was given and what is accepted."""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from engines.cli import SEED_RANGE
from engines.manifest import Manifest
from engines.profiles import admitting_profile

from .errors import BackendUnavailable, InvalidArgumentError, SizeOutOfRangeError
from .latents import (
    LATENT_CHANNELS,
    OTHER_LATENTS,
    PACKED_CHANNELS,
    InvalidLatentsError,
    LatentStats,
    normalise,
    unpack,
    validate_latents,
)
from .noise import Seeds
from .tiling import decode_bytes, decode_tile

DECODER = "vae_decoder"
MAIN_INPUTS = {"cond_encoder": "latents_small", "unet": "sample", DECODER: "latents"}
PIXELS_PER_LATENT = 8
# flux2: normalised [B, 32, H/8, W/8]; flux2_packed: ComfyUI's and the diffusers pipelines' `latents=`
# form [B, 128, H/16, W/16]; flux2_vae: raw VAE latents [B, 32, H/8, W/8], what Flux2KleinPipeline
# returns and vae.decode takes (normalised with the folder's BN statistics, `latent_stats`).
LATENT_FORMATS = ("flux2", "flux2_packed", "flux2_vae")
# What torch.Generator.manual_seed takes without wrapping: it also takes -2**63..-1, as the same
# generators as seed + 2**64; refusing negatives keeps one spelling per noise.
SEED_MAX = SEED_RANGE[1]


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


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def side_range(manifest: Manifest, component: str, name: str) -> tuple[int, int, int]:
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



def check_progress(progress: object) -> None:
    if progress is not None and not callable(progress):
        raise InvalidArgumentError(f"progress must be a callable (done, total) or None, got {type(progress).__name__}")


def as_tensor(latents: object, device: torch.device) -> torch.Tensor:
    """The latents as a tensor on ``device`` (numpy on the CPU only), detached."""
    if isinstance(latents, np.ndarray):
        if device.type != "cpu":
            raise InvalidLatentsError(
                f"numpy input is accepted on the CPU only; this upscaler runs on {device}: "
                "pass a torch tensor on that device"
            )
        return _from_numpy(latents)
    if not isinstance(latents, torch.Tensor):
        raise InvalidLatentsError(f"latents must be a torch.Tensor or numpy array, got {type(latents).__name__}")
    if latents.device != device:
        raise InvalidLatentsError(
            f"latents are on {latents.device} but this upscaler runs on {device}; move them with .to('{device}')"
        )
    # An upscaler does not backpropagate: a tensor that requires grad is read as its values.
    return latents.detach()


def _from_numpy(latents: np.ndarray) -> torch.Tensor:
    """A tensor of the array's values. Views torch cannot share (negative or unaligned strides, as
    ``x[:, :, ::-1]`` makes; another byte order, as big-endian files load) are copied first."""
    if latents.dtype.kind not in "fiub":
        raise InvalidLatentsError(f"latents must be a floating-point array, got numpy dtype {latents.dtype}")
    if not latents.dtype.isnative:
        latents = latents.astype(latents.dtype.newbyteorder("="))
    if any(stride < 0 or stride % latents.itemsize for stride in latents.strides):
        latents = np.ascontiguousarray(latents)
    return torch.from_numpy(latents)


def require_batch(x: torch.Tensor) -> None:
    if x.dim() >= 1 and x.shape[0] == 0:
        raise InvalidLatentsError(
            f"latents are an empty batch (shape {tuple(x.shape)}): pass at least one latent [1.., 32, h, w]"
        )


def unpacked(latents: object, latent_format: str, device: torch.device,
             stats: Callable[[], LatentStats]) -> torch.Tensor:
    """The latents in the runtime's own form (normalised, 32 channels); ``stats``: the folder's VAE
    statistics, asked for only by ``flux2_vae``. Other families' latents are refused by name."""
    if latent_format not in LATENT_FORMATS:
        raise InvalidLatentsError(f"latent_format must be one of {LATENT_FORMATS}, got {latent_format!r}")
    x = as_tensor(latents, device)
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
        folder_stats = stats()
        validate_latents(x, limit=None)  # raw: the bound holds for the normalised values, checked after
        x = normalise(x.float(), folder_stats)
    return x


def check_range(folder: Path, manifest: Manifest, component: str, name: str, shape: tuple[int, ...], what: str) -> None:
    """Refuse a shape no profile of ``component`` admits, saying the folder's range and how to rebuild."""
    if admitting_profile(manifest.components[component].profiles, name, shape) is not None:
        return
    lo, hi, batch = side_range(manifest, component, name)
    px = PIXELS_PER_LATENT
    raise SizeOutOfRangeError(
        f"{what} of {shape[2]}x{shape[3]} latent pixels ({shape[2] * px}x{shape[3] * px} px) at batch "
        f"{shape[0]} is outside what {folder} was built for: {component} takes sides {lo}..{hi} "
        f"({lo * px}..{hi * px} px), batch up to {batch}. Rebuild with other --min-px/--max-px/--max-batch: "
        f"{manifest.rebuild_command}"
    )


def decode_memory_bytes(manifest: Manifest, batch: int, height: int, width: int,
                        new_latents: bool = False) -> tuple[int, int]:
    """(bytes the decode of [batch, 32, height, width] latents allocates for its images,
    bytes one tile's decode works in): the images' from their size (with the fp32 latents when
    the call makes them: an upscale's output, a conversion to fp32), the tile's from the
    folder's memory estimate of the vae_decoder profile (at its largest tile and batch)."""
    estimates = manifest.components[DECODER].memory_estimate_bytes
    latents = 4 * batch * LATENT_CHANNELS * height * width if new_latents else 0
    return latents + decode_bytes(batch, height, width, decode_tile(manifest.components[DECODER])), max(estimates, default=0)


def check_decode_shape(folder: Path, manifest: Manifest, batch: int, height: int, width: int) -> None:
    """Whether the folder has a decoder whose profile takes these latents (the shape only)."""
    if DECODER not in manifest.components:
        raise BackendUnavailable(
            f"decoding needs a vae_decoder in {folder}; rebuild with --components cond_encoder unet vae_decoder"
        )
    lo, _, max_batch = side_range(manifest, DECODER, "latents")
    if min(height, width) < lo or batch > max_batch:
        raise SizeOutOfRangeError(
            f"decoding {batch}x{height}x{width} latents needs sides of at least {lo} and batch up to "
            f"{max_batch} (the vae_decoder profile of {folder})"
        )


def check_decode_memory(manifest: Manifest, device: torch.device, batch: int, height: int, width: int,
                        new_latents: bool = False) -> None:
    """Refuse, before any work, a decode whose images and tile work exceed the free memory."""
    image, work = decode_memory_bytes(manifest, batch, height, width, new_latents)
    available = available_memory(device)
    if available is None or image + work <= available:
        return
    side, step = 0, 1 << 20  # the largest square decode that fits, at this batch
    while step:
        if sum(decode_memory_bytes(manifest, batch, side + step, side + step, new_latents)) <= available:
            side += step
        step //= 2
    side -= side % 2
    px = PIXELS_PER_LATENT
    fits = (f"at batch {batch} it decodes up to about {side}x{side} latents ({side * px}x{side * px} px) now"
            if side >= 2 else "not even the smallest decode fits now")
    raise SizeOutOfRangeError(
        f"decoding {batch}x{height}x{width} latents ({height * px}x{width * px} px) needs about "
        f"{_gib(image + work)} ({_gib(image)} for the fp32 images and their blending, {_gib(work)} for a "
        f"tile's decode) but {device} has about {_gib(available)} free: {fits}; decode smaller "
        "latents or fewer at once, or free memory"
    )

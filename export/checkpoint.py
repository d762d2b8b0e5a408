"""Loading the Flow Upscaler weights and the FLUX.2 VAE, or seeded random stand-ins.

Weights come only from safetensors files (a local path or a Hugging Face repo); pickled
checkpoints are refused because unpickling runs arbitrary code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import struct
from pathlib import Path

import torch
from torch import nn

from engines.errors import FlowUpscalerError

from .models.upscaler_unet import UpscalerUNet

DEFAULT_UNET_REPO = "TensorForger/FlowUpscaler"
DEFAULT_UNET_FILE = "flow_upscaler.safetensors"
DEFAULT_VAE_REPO = "black-forest-labs/FLUX.2-dev"

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHOWN_KEYS = 5
_MAX_HEADER = 100_000_000  # the safetensors library refuses longer headers
_UNET_HINT = "pass a local file with --checkpoint PATH, or use --random-weights for seeded random weights"
_VAE_HINT = "pass a local diffusers folder with --vae PATH, or use --random-weights for seeded random weights"


class CheckpointError(FlowUpscalerError, RuntimeError):
    """Weights could not be found, read or matched to the model."""


def add_weight_arguments(parser: argparse.ArgumentParser, with_vae: bool = False) -> None:
    """``--checkpoint`` / ``--random-weights`` (and ``--vae``), shared by every command."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint",
        help=f"Flow Upscaler .safetensors file or Hugging Face repo id (default: {DEFAULT_UNET_REPO})",
    )
    source.add_argument(
        "--random-weights",
        action="store_true",
        help="seeded random weights" + (" for the U-Net and the VAE" if with_vae else "") + " (no download)",
    )
    if with_vae:
        parser.add_argument(
            "--vae",
            help=f"FLUX.2 VAE: local diffusers folder or Hub repo id (default: {DEFAULT_VAE_REPO})",
        )


def _looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not source.endswith(".safetensors")


def _download(repo_id: str, filename: str, offline: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=offline))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"{filename} from Hugging Face repo {repo_id!r} is not in the local cache and the Hub "
            f"cannot be reached (offline?); {_UNET_HINT}"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"could not download {filename} from Hugging Face repo {repo_id!r} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); {_UNET_HINT}"
        ) from exc


def resolve_checkpoint(source: str | Path | None = None, *, offline: bool = False) -> Path:
    """A local ``.safetensors`` path, or ``owner/name`` (default file) / ``owner/name/file``."""
    source = DEFAULT_UNET_REPO if source is None else source
    path = Path(source)
    if path.is_file():
        return path
    text = str(source)
    if _looks_like_repo_id(text):
        return _download(text, DEFAULT_UNET_FILE, offline)
    parts = text.split("/")
    if not path.exists() and len(parts) >= 3 and _looks_like_repo_id("/".join(parts[:2])):
        return _download("/".join(parts[:2]), "/".join(parts[2:]), offline)
    raise CheckpointError(
        f"checkpoint {text!r} is neither an existing file nor a Hugging Face repo id "
        f"(owner/name or owner/name/file.safetensors); {_UNET_HINT}"
    )


def _safetensors_header_problem(path: Path) -> str | None:
    """Why ``path`` is not a safetensors file (None when it is one, as far as its header goes).

    A safetensors file is an 8-byte little-endian header length N, then N bytes of JSON object,
    then the tensor bytes. This is what identifies the format: any first byte is possible (the
    low byte of N), so no magic number can tell safetensors from other formats.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than the 8-byte header length"
        length = struct.unpack("<Q", head)[0]
        if length > min(size - 8, _MAX_HEADER):
            return f"header length {length} bytes, but the file has only {size} bytes"
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "header is not JSON"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    return None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; any other format is refused without being parsed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    problem = _safetensors_header_problem(path)
    if problem is not None:
        with open(path, "rb") as handle:
            head = handle.read(4)
        # pickle protocol 2+ (PROTO opcode and version), or a zip archive (torch.save since 1.6)
        if (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head == b"PK\x03\x04":
            raise CheckpointError(
                f"{path} is a pickled PyTorch checkpoint; it is not loaded because unpickling can run "
                "arbitrary code. Convert it once, in an environment you trust, with "
                "safetensors.torch.save_file(state_dict, 'flow_upscaler.safetensors') and pass that file"
            )
        raise CheckpointError(
            f"{path} is not a safetensors file ({problem}); it is truncated, corrupt or of another "
            "format: download or convert it again"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} could not be read as safetensors ({exc}); the file is probably truncated or "
            "corrupt: download it again"
        ) from exc


def _shown(keys: list[str]) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOWN_KEYS else f" ({len(keys)})"
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise a ``CheckpointError`` listing missing, unexpected and wrong-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    problems = [
        f"{label}: {_shown(keys)}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape (file != model)", wrong_shape),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"{source} does not match the model configuration {getattr(model, 'config', '')}:\n  "
            + "\n  ".join(problems)
        )


def seeded_init(build, seed: int):
    """Build a module with PyTorch's default initialisation drawn from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def load_unet(
    checkpoint: str | Path | None = None,
    *,
    random_weights: bool = False,
    seed: int = 0,
    offline: bool = False,
    **config,
) -> UpscalerUNet:
    """The U-Net in fp32 eval mode, from a checkpoint or (``random_weights``) seeded random init.

    ``checkpoint`` None means the published default on the Hugging Face Hub.
    """
    model = seeded_init(lambda: UpscalerUNet(**config), seed)
    if not random_weights:
        path = resolve_checkpoint(checkpoint, offline=offline)
        state = read_safetensors(path)
        check_state_dict(model, state, source=str(path))
        model.load_state_dict(state, strict=True)
    return model.float().eval()


def random_vae(seed: int = 0, **config) -> nn.Module:
    """A FLUX.2-shaped VAE with seeded weights and non-trivial BN statistics (for parity work)."""
    from diffusers import AutoencoderKLFlux2

    def build() -> nn.Module:
        vae = AutoencoderKLFlux2(**config)
        channels = vae.bn.running_mean.numel()
        vae.bn.running_mean.copy_(0.2 * torch.randn(channels))
        vae.bn.running_var.copy_(0.5 + torch.rand(channels))
        return vae

    with torch.no_grad():
        return seeded_init(build, seed).float().eval()


def load_vae(
    source: str | Path | None = None,
    *,
    random_weights: bool = False,
    seed: int = 0,
    offline: bool = False,
) -> nn.Module:
    """A diffusers ``AutoencoderKLFlux2`` from a local diffusers folder (the VAE's own folder or a
    pipeline folder with ``vae/``) or a FLUX.2 Hub repo's ``vae`` folder; safetensors only."""
    if random_weights:
        return random_vae(seed)
    from diffusers import AutoencoderKLFlux2

    source = DEFAULT_VAE_REPO if source is None else str(source)
    path = Path(source)
    if path.is_dir():
        subfolder = None if (path / "config.json").is_file() else "vae"
        if subfolder and not (path / "vae" / "config.json").is_file():
            raise CheckpointError(
                f"{path} holds neither a diffusers VAE (config.json) nor a pipeline with vae/config.json"
            )
    elif _looks_like_repo_id(source):
        subfolder = "vae"
    else:
        raise CheckpointError(f"VAE source {source!r} is neither a folder nor a Hugging Face repo id; {_VAE_HINT}")
    try:
        vae = AutoencoderKLFlux2.from_pretrained(
            source,
            subfolder=subfolder,
            use_safetensors=True,
            local_files_only=offline,
            low_cpu_mem_usage=False,
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"could not load the FLUX.2 VAE from {source!r} ({str(exc).splitlines()[0]}); {_VAE_HINT}"
        ) from exc
    return vae.float().eval()


def weights_digest(module: nn.Module) -> str:
    """sha256 over every state-dict entry's name, dtype, shape and bytes: identifies the weights
    a graph was exported from, whatever file or seed they came from."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

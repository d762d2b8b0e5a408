"""Tiled VAE decoding: overlapping latent tiles, decoded one at a time, blended with linear ramps.

Memory stays bounded by one tile's decode plus the output image, whatever the output size. Tiles
never extend past the image: the last tile of a row or column is aligned to the edge (so its
overlap with the previous one can be larger), and an image no larger than a tile is one tile.
Where tiles overlap, each pixel is the weighted mean of the tiles covering it, with weights that
ramp linearly from the tile's inner edge, so seams fade instead of cutting.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from engines.manifest import ComponentRecord

OVERLAP_DIVISOR = 4  # neighbouring tiles share a quarter of a tile: ramps long enough for seams to fade


def decode_tile(decoder: ComponentRecord) -> int:
    """The decode's tile side in latent pixels: the largest the decoder's first profile takes (every
    build has a first profile), so each tile runs on a profile the folder holds."""
    return max(decoder.profiles[0].max["latents"][2:])


def tile_overlap(tile: int) -> int:
    """How many latent pixels neighbouring tiles of side ``tile`` share."""
    return tile // OVERLAP_DIVISOR


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``size``, stepping by ``tile - overlap``."""
    if size <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, {tile}), got {overlap}")
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _ramp(length: int, start: int, total: int, fade: int, device: torch.device) -> torch.Tensor:
    """1-D weights of a tile: rising over ``fade`` pixels on sides that are inside the image."""
    position = torch.arange(length, device=device, dtype=torch.float32) + 0.5
    weight = torch.ones(length, device=device)
    if fade > 0 and start > 0:
        weight = torch.minimum(weight, position / fade)
    if fade > 0 and start + length < total:
        weight = torch.minimum(weight, (length - position) / fade)
    return weight


def tile_count(height: int, width: int, tile: int, overlap: int) -> int:
    """How many tiles ``decode_tiled`` decodes for latents of ``height`` x ``width``."""
    return len(tile_starts(height, tile, overlap)) * len(tile_starts(width, tile, overlap))


def decode_tiled(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    tile: int,
    overlap: int,
    scale: int = 8,
    on_tile: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Decode ``latents`` [B, C, H, W] in tiles of at most ``tile`` latent pixels a side.

    ``decode`` maps a latent tile to an image ``scale`` times larger. Returns the blended image,
    always a new fp32 tensor: ``decode`` may hand back a buffer its backend reuses. ``on_tile`` is
    called after each tile (progress; an exception it raises stops the decode between tiles).
    """
    batch, _, height, width = latents.shape
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    if len(rows) == len(cols) == 1:
        image = decode(latents).to(torch.float32, copy=True)
        if on_tile is not None:
            on_tile()
        return image
    fade = overlap * scale
    image = weights = None
    for top in rows:
        for left in cols:
            h, w = min(tile, height), min(tile, width)
            piece = decode(latents[:, :, top : top + h, left : left + w]).float()
            if image is None:
                image = torch.zeros((batch, piece.shape[1], height * scale, width * scale), device=piece.device)
                weights = torch.zeros((1, 1, height * scale, width * scale), device=piece.device)
            ramp = _ramp(h * scale, top * scale, height * scale, fade, piece.device)[:, None] * _ramp(
                w * scale, left * scale, width * scale, fade, piece.device
            )[None, :]
            rows_px = slice(top * scale, (top + h) * scale)
            cols_px = slice(left * scale, (left + w) * scale)
            image[:, :, rows_px, cols_px] += piece * ramp
            weights[:, :, rows_px, cols_px] += ramp
            if on_tile is not None:
                on_tile()
    return image.div_(weights)  # in place: a second full-size image would double the decode's peak


def decode_bytes(batch: int, height: int, width: int, tile: int, channels: int = 3, scale: int = 8) -> int:
    """Bytes ``decode_tiled`` allocates for latents [batch, C, height, width], beyond what each
    tile's decode needs inside the backend: the fp32 image and, when tiled, its blend weights (one
    channel) and a tile's blended piece (the piece, its ramp-weighted copy, the ramp)."""
    pixels = height * scale * width * scale
    image = 4 * batch * channels * pixels
    if height <= tile and width <= tile:
        return 2 * image  # the backend's output and the copy handed out
    piece = 4 * batch * channels * min(tile, height) * scale * min(tile, width) * scale
    return image + 4 * pixels + 3 * piece


def rgb8(images: torch.Tensor) -> np.ndarray:
    """Decoded images [B, 3, H, W] in about [-1, 1] -> [B, H, W, 3] uint8 RGB (PNG files, image clients):
    -1 -> 0, 0 -> 128 (127.5 rounded half to even), +1 -> 255, values outside [-1, 1] clamped.
    One fp32 working copy (in place after the clamp), so a large image does not need several."""
    pixels = images.detach().float().clamp(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()

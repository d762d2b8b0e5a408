"""What the served model does with one batch of requests, apart from Triton's types.

Each request is checked alone, so a bad one gets its own error and never fails the requests
Triton's dynamic batcher put beside it. Good requests that share a pass (scale, size, decode) run
as one batch with one seed per item, which ``Upscaler`` makes equal to each item run alone: a
request's result does not depend on what it was batched with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from engines.errors import FlowUpscalerError

from ..latents import LATENT_CHANNELS
from ..tiling import rgb8
from ..errors import InvalidArgumentError
from ..inputs import check_seed
from ..latents import SCALES
from ..upscaler import Upscaler

logger = logging.getLogger(__name__)

# The served model's tensors (KServe v2 names and types); the batch is Triton's first dimension.
LATENTS, SCALE, SEED, DECODE = "latents", "scale", "seed", "decode"
UPSCALED, IMAGE = "upscaled", "image"


@dataclass
class Request:
    """One request's inputs as arrays: latents [b, 32, h, w], scale [b, 1], seed [b, 1], decode [b, 1] or None."""

    latents: np.ndarray
    scale: np.ndarray
    seed: np.ndarray
    decode: np.ndarray | None = None


@dataclass
class Result:
    """One request's outputs: upscaled latents [b, 32, h*s, w*s] fp32; RGB images [b, 8h*s, 8w*s, 3] uint8 when decoded."""

    upscaled: np.ndarray
    image: np.ndarray | None = None


@dataclass
class _Checked:
    latents: torch.Tensor
    scale: int
    seeds: list[int]
    decode: bool

    @property
    def pass_key(self) -> tuple[int, int, int, bool]:
        """Requests with equal keys can run as one batch."""
        return (self.scale, self.latents.shape[2], self.latents.shape[3], self.decode)


def _one_value(values: np.ndarray, name: str, accepted: str) -> object:
    """The single value every item of a request gives for ``name`` (a request has one output shape)."""
    distinct = np.unique(values)
    if distinct.size != 1:
        raise InvalidArgumentError(
            f"{name} must be the same for every item of one request ({accepted}), got {distinct.tolist()}; "
            "send items with different values as separate requests"
        )
    return distinct.item()


def check_request(upscaler: Upscaler, request: Request) -> _Checked:
    """Every refusal for ``request``, before any work: shapes, values, and the folder's range."""
    latents = request.latents
    batch = latents.shape[0] if latents.ndim else 0
    for name, array in ((SCALE, request.scale), (SEED, request.seed), (DECODE, request.decode)):
        if array is not None and array.shape != (batch, 1):
            raise InvalidArgumentError(
                f"{name} must have shape [batch, 1] = [{batch}, 1] (one value per latent), got {list(array.shape)}"
            )
    scale = _one_value(request.scale, SCALE, f"one of {', '.join(map(str, SCALES))}")
    if scale not in SCALES:
        raise InvalidArgumentError(f"scale must be one of {', '.join(map(str, SCALES))}, got {scale}")
    decode = bool(_one_value(request.decode, DECODE, "true or false")) if request.decode is not None else False
    seeds = [int(s) for s in request.seed[:, 0]]
    for i, s in enumerate(seeds):
        if s < 0:  # the served seed is INT64: 2**63.. are out of its reach, negatives are refused
            raise InvalidArgumentError(f"seed[{i}] must be in 0..{2**63 - 1} (a non-negative INT64), got {s}")
        check_seed(s, f"seed[{i}]")
    x = torch.from_numpy(np.ascontiguousarray(latents)).to(upscaler.device)
    return _Checked(upscaler.check_input(x, int(scale), decode=decode), int(scale), seeds, decode)


def _run(upscaler: Upscaler, members: list[_Checked]) -> list[Result]:
    first = members[0]
    x = torch.cat([m.latents for m in members]) if len(members) > 1 else first.latents
    seeds = [s for m in members for s in m.seeds]
    out = upscaler.upscale(x, scale=first.scale, seed=seeds)
    images = rgb8(upscaler.decode(out)) if first.decode else None
    upscaled = out.cpu().numpy()  # one copy to the host for the whole group
    results, start = [], 0
    for m in members:
        end = start + m.latents.shape[0]
        results.append(Result(upscaled[start:end], None if images is None else images[start:end]))
        start = end
    return results


def serve_batch(upscaler: Upscaler, requests: list[Request]) -> list[Result | FlowUpscalerError]:
    """One result or one error per request, in order.

    An error of the project (a refusal) is the answer of its request only; any other exception
    (a bug, the device out of memory) propagates and fails the whole batch.
    """
    answers: list[Result | FlowUpscalerError | None] = [None] * len(requests)
    groups: dict[tuple, list[tuple[int, _Checked]]] = {}
    for index, request in enumerate(requests):
        try:
            checked = check_request(upscaler, request)
        except FlowUpscalerError as exc:
            answers[index] = exc
            continue
        groups.setdefault(checked.pass_key, []).append((index, checked))
    for members in groups.values():
        for (index, _), answer in zip(members, _run_group(upscaler, [checked for _, checked in members])):
            answers[index] = answer
    return answers


def _run_group(upscaler: Upscaler, members: list[_Checked]) -> list[Result | FlowUpscalerError]:
    """Run requests that share a pass together; if the folder refuses them together (a batch no
    profile admits at this size), each alone, so each gets its own result or error."""
    try:
        return _run(upscaler, members)
    except FlowUpscalerError as exc:
        if len(members) == 1:
            return [exc]
        logger.info("%d requests refused as one batch (%s); running them one by one", len(members), exc)
        return [answer for member in members for answer in _run_group(upscaler, [member])]


def smallest_side(upscaler: Upscaler) -> int:
    """The smallest low-res latent side the folder takes (square, batch 1, 2x): the warm-up's and
    the ready check's size."""
    return min(min(p.min["latents_small"][2:]) for p in upscaler.manifest.components["cond_encoder"].profiles)


def warm_up(upscaler: Upscaler) -> None:
    """One 2x pass at the smallest size the folder takes, so the first request is not the one that
    pays for lazy initialisation (and a folder that cannot run fails before the server is ready)."""
    side = smallest_side(upscaler)
    latents = torch.zeros(1, LATENT_CHANNELS, side, side, device=upscaler.device)
    upscaler.upscale(latents, scale=2, seed=0)

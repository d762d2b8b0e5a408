"""The ready check: one real request through a started server, its answer compared with
``Upscaler``'s for the same latents and seed.

Triton's readiness says the model loaded and warmed up inside its own process; it does not say
that answers come back right (a Python backend stub on another Python's numpy reports ready, then
returns empty outputs for every request). So ``python -m runtime.serve`` and
``python -m benchmarks.serving`` send this request before they call a server ready, and stop it if
the answer is wrong. The request uses Triton's binary tensor extension over plain HTTP (no client
library: the command's process stays free of gevent).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch

from ..latents import LATENT_CHANNELS
from ..upscaler import Upscaler
from .repository import MODEL_NAME, ServedModel
from .requests import LATENTS, SCALE, SEED, UPSCALED, smallest_side
from .server import ServeError

CHECK_SEED = 20_251_205  # any fixed seed: the check's latents and noise
CHECK_SCALE = 2
RTOL = ATOL = 1e-3  # same backend, device and input: equal in practice; a broken transport is off by far more
_HEADER_LENGTH = "Inference-Header-Content-Length"
_NUMPY_TYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64,
                "UINT8": np.uint8, "BOOL": np.bool_}


@dataclass(frozen=True)
class ReadyCheck:
    """One 2x request of ``latents`` with ``seed``; ``expected``: Upscaler's answer, or None to check
    only the output's name, type, shape and that its values are finite (a server on another machine)."""

    latents: np.ndarray
    seed: int = CHECK_SEED
    expected: np.ndarray | None = None

    @classmethod
    def against_upscaler(cls, model: ServedModel) -> ReadyCheck:
        """The expected answer computed here, by an ``Upscaler`` on the served folder with the served
        backend, device and noise mode, at the smallest size the folder takes (loaded, run once, closed)."""
        with Upscaler.load(model.artifacts, backend=model.backend, device="cuda" if model.gpu else "cpu",
                           noise=model.noise) as upscaler:
            latents = _latents(smallest_side(upscaler))
            x = torch.from_numpy(latents).to(upscaler.device)  # numpy goes in on the CPU only
            expected = upscaler.upscale(x, scale=CHECK_SCALE, seed=CHECK_SEED).cpu().numpy()
        return cls(latents, CHECK_SEED, expected)

    @classmethod
    def shapes_only(cls, side: int) -> ReadyCheck:
        """A request of ``side`` x ``side`` latents whose answer is checked for its form only."""
        return cls(_latents(side))

    @property
    def expected_shape(self) -> tuple[int, ...]:
        batch, channels, height, width = self.latents.shape
        return (batch, channels, height * CHECK_SCALE, width * CHECK_SCALE)

    def describe(self) -> str:
        side = self.latents.shape[-1]
        against = "equal to Upscaler's" if self.expected is not None else "of the right form"
        return f"one {CHECK_SCALE}x request of {side}x{side} latents (seed {self.seed}) answered {against}"

    def run(self, address: str, timeout_s: float) -> None:
        """Send the request to the server at ``address`` (host:port of its HTTP endpoint); raises
        ``ServeError`` saying what came back if it is not the expected answer."""
        problem = self._problem(address, timeout_s)
        if problem is not None:
            side = self.latents.shape[-1]
            raise ServeError(
                f"the ready check failed: a {CHECK_SCALE}x request of {side}x{side} latents (seed {self.seed}) "
                f"got {problem}; expected '{UPSCALED}' FP32 {list(self.expected_shape)}"
                + (" equal to Upscaler's answer here" if self.expected is not None else "")
                + " (run with --verbose for Triton's log)"
            )

    def _problem(self, address: str, timeout_s: float) -> str | None:
        try:
            outputs = infer_binary(address, {
                LATENTS: self.latents,
                SCALE: np.full((1, 1), CHECK_SCALE, np.int32),
                SEED: np.full((1, 1), self.seed, np.int64),
            }, [UPSCALED], timeout_s)
        except ServeError as exc:
            return str(exc)
        if UPSCALED not in outputs:
            return f"outputs {sorted(outputs)}, no '{UPSCALED}'"
        got = outputs[UPSCALED]
        if got.dtype != np.float32 or got.shape != self.expected_shape:
            return f"'{UPSCALED}' {got.dtype} {list(got.shape)}"
        if not np.isfinite(got).all():
            return f"'{UPSCALED}' with NaN or Inf values"
        if self.expected is not None and not np.allclose(got, self.expected, rtol=RTOL, atol=ATOL):
            difference = float(np.abs(got.astype(np.float64) - self.expected).max())
            return f"values that differ from Upscaler's by up to {difference:.3g} (tolerance {ATOL:g} + {RTOL:g} x |value|)"
        return None


def _latents(side: int) -> np.ndarray:
    return np.random.default_rng(CHECK_SEED).standard_normal((1, LATENT_CHANNELS, side, side), dtype=np.float32)


def infer_binary(address: str, inputs: dict[str, np.ndarray], outputs: list[str], timeout_s: float) -> dict[str, np.ndarray]:
    """One KServe v2 inference with binary tensors (Triton's binary data extension) over HTTP;
    raises ``ServeError`` with the server's error or the transport's."""
    tensors = [{"name": name, "shape": list(array.shape), "datatype": _datatype(array),
                "parameters": {"binary_data_size": array.nbytes}} for name, array in inputs.items()]
    header = json.dumps({"inputs": tensors, "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in outputs]})
    body = header.encode() + b"".join(np.ascontiguousarray(a).tobytes() for a in inputs.values())
    request = urllib.request.Request(
        f"http://{address}/v2/models/{MODEL_NAME}/infer", data=body, method="POST",
        headers={_HEADER_LENGTH: str(len(header.encode())), "Content-Type": "application/octet-stream"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            length = int(response.headers.get(_HEADER_LENGTH) or 0)
            answer = response.read()
    except urllib.error.HTTPError as exc:
        raise ServeError(f"HTTP {exc.code} {_error_text(exc.read())}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ServeError(f"no answer ({getattr(exc, 'reason', exc)})") from None
    return _outputs(answer, length)


def _datatype(array: np.ndarray) -> str:
    for name, kind in _NUMPY_TYPES.items():
        if array.dtype == kind:
            return name
    raise TypeError(f"no KServe datatype for {array.dtype}")


def _error_text(body: bytes) -> str:
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


def _outputs(answer: bytes, header_length: int) -> dict[str, np.ndarray]:
    """The response's output tensors: binary ones from after the JSON header, in order; JSON ones from ``data``."""
    try:
        header = json.loads(answer[:header_length] if header_length else answer)
        found, offset = {}, header_length
        for output in header.get("outputs", []):
            kind = _NUMPY_TYPES.get(output["datatype"])
            if kind is None:
                found[output["name"]] = np.empty(0)
                continue
            size = output.get("parameters", {}).get("binary_data_size")
            if size is None:
                values = np.asarray(output.get("data", []), dtype=kind)
            else:
                values = np.frombuffer(answer[offset:offset + size], dtype=kind)
                offset += size
            shape = tuple(output["shape"])
            if values.size != int(np.prod(shape)):
                raise ServeError(f"'{output['name']}' of shape {list(shape)} with {values.nbytes} bytes of values")
            found[output["name"]] = values.reshape(shape)
        return found
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ServeError(f"an answer that is no KServe v2 inference response ({exc})") from None

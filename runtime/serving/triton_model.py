"""The model ``flow_upscaler`` as Triton's Python backend runs it (``model.py`` of the repository
that ``runtime.serving.repository`` writes delegates here).

Triton calls ``initialize`` once per model instance, in that instance's own process; the server
reports the model ready only after it returned, so the folder is loaded and one warm-up pass has
run before any request is accepted. ``execute`` gets the requests the dynamic batcher gathered and
answers each with its outputs or its own error.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend, not pip

from engines.errors import FlowUpscalerError

from ..upscaler import Upscaler
from .requests import (
    DECODE,
    IMAGE,
    LATENTS,
    SCALE,
    SEED,
    UPSCALED,
    Request,
    Result,
    serve_batch,
    warm_up,
)


def model_parameters(model_config: dict) -> dict[str, str]:
    """``parameters`` of config.pbtxt as plain strings."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


class FlowUpscalerModel:
    """One model instance: one ``Upscaler`` on the instance's device (KIND_GPU: its GPU; KIND_CPU: the CPU)."""

    def __init__(self, args: dict):
        parameters = model_parameters(json.loads(args["model_config"]))
        device = f"cuda:{args['model_instance_device_id']}" if args["model_instance_kind"] == "GPU" else "cpu"
        # a relative folder is one copied into the model's version folder (--copy-artifacts)
        artifacts = Path(args["model_repository"]) / args["model_version"] / parameters["artifacts"]
        where = f"{args['model_instance_name']}: folder {artifacts}"
        start = time.perf_counter()
        try:
            self.upscaler = Upscaler.load(
                artifacts, backend=parameters["backend"], device=device, noise=parameters["noise"]
            )
            warm_up(self.upscaler)
        except FlowUpscalerError as exc:  # Triton shows this message as the reason the model did not load
            raise pb_utils.TritonModelException(f"{where}: {exc}") from None
        skipped = "".join(f"; auto skipped {k}: {v}" for k, v in self.upscaler.skipped_backends.items())
        pb_utils.Logger.log_info(
            f"flow_upscaler ready ({where}, backend {self.upscaler.backend_name} on {self.upscaler.device}, "
            f"noise {self.upscaler.noise_mode}, loaded and warmed up in {time.perf_counter() - start:.1f} s{skipped})"
        )

    def execute(self, requests: list) -> list:
        inputs = [_request(r) for r in requests]
        try:
            answers = serve_batch(self.upscaler, inputs)
        except Exception as exc:  # noqa: BLE001 - a bug or the device out of memory: every request of the batch fails, the server stays up
            pb_utils.Logger.log_error(f"flow_upscaler: a batch of {len(requests)} requests failed:\n{traceback.format_exc()}")
            error = pb_utils.TritonError(f"flow_upscaler failed on this batch ({type(exc).__name__}: {exc}); see the server log")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        return [_response(answer) for answer in answers]

    def finalize(self) -> None:
        self.upscaler.close()


def _request(request) -> Request:
    def tensor(name: str):
        found = pb_utils.get_input_tensor_by_name(request, name)
        return None if found is None else found.as_numpy()

    return Request(tensor(LATENTS), tensor(SCALE), tensor(SEED), tensor(DECODE))


def _response(answer: Result | FlowUpscalerError):
    if isinstance(answer, FlowUpscalerError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(answer), pb_utils.TritonError.INVALID_ARG))
    outputs = [pb_utils.Tensor(UPSCALED, answer.upscaled)]
    if answer.image is not None:
        outputs.append(pb_utils.Tensor(IMAGE, answer.image))
    return pb_utils.InferenceResponse(output_tensors=outputs)

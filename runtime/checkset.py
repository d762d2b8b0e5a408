"""An artifact folder's check set, run through a backend: engines built where they could not run
(TensorRT-RTX ahead of time) are trusted only after their outputs matched the fp32 eager ones the
build stored (``export.pipeline.checkset``; DESIGN.md "Trust for engines built where they cannot run").

- ``run_check_set``: every component on each stored case (the smallest and largest shape of every
  profile, or the largest that fit the build's budget), three calls in a row so that a replayed
  CUDA graph is compared too (``CALLS``), and one whole 2x pass on the stored input and noise, each
  compared with the stored fp32 eager outputs (``runtime.metrics.difference``: rel-L2, max-abs)
  against the limits the build stored beside them. What ``python -m runtime.check`` prints.
- ``verify_first_use``: what ``Upscaler.load`` does with a backend whose ``verification_identity``
  is not None: the check runs once per identity (engines, GPU, driver, runtime version) and check
  set, its verdict is cached in the user cache folder (``runtime.cache``), and engines that fail
  are refused with ``EngineCheckFailed`` (a ``BackendUnavailable``: ``auto`` moves on to the next
  backend, an explicit backend raises it).

Length: over 350 lines because running the check set (read, feed, compare against limits, the
three calls) and the verdict cache are one procedure: what a cached verdict vouches for is
decided by how the check ran.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from engines.errors import FlowUpscalerError
from engines.files import atomic_output
from engines.manifest import CheckSetRecord, Manifest, sha256_file

from .backends import Backend, BackendUnavailable
from .cache import cache_dir
from .noise import Noise
from .metrics import difference
from .upscale_pass import PASS_COMPONENTS, run_pass

logger = logging.getLogger(__name__)

PASS = "pass"  # the whole pass's entry in the results, beside the components
# Every stored case runs this many times in a row, each call compared. TensorRT's backend runs a
# shape's first call plainly, its second plainly and then captures a CUDA graph, and replays the
# graph from the third (runtime.backends.tensorrt); torch.compile's reduce-overhead mode records on
# the second call and replays from the third too. Elsewhere the later calls show that repeated
# calls at one shape agree with the first (the third keeps its name). The replayed call gets its
# batch in reverse order where it holds more than one item (the items are independent), so a
# replay that computes on the previous call's inputs fails too.
CALLS = ("first call", "second call", "replayed call")
WHOLE_PASS = "whole pass"  # the pass runs once, on launches its cases already replayed
VERDICTS = "verdicts"  # under the user cache folder


class CheckSetError(FlowUpscalerError, RuntimeError):
    """A folder whose check set is missing or not the one its manifest names; says how to rebuild."""


class EngineCheckFailed(BackendUnavailable):
    """A backend whose engines failed the folder's check set here (or could not run it)."""


@dataclass
class CallCheck:
    """One call's output against its stored fp32 eager value."""

    call: str  # one of CALLS, or WHOLE_PASS
    rel_l2: float = float("nan")
    max_abs: float = float("nan")
    finite: bool = True
    shape_error: str | None = None

    def failures(self, limits: dict[str, float]) -> list[str]:
        if self.shape_error:
            return [self.shape_error]
        failures = [] if self.finite else ["non-finite values"]
        if not self.rel_l2 <= limits["rel_l2"]:
            failures.append(f"rel-L2 {self.rel_l2:.3g} > {limits['rel_l2']:.3g}")
        if not self.max_abs <= limits["max_abs"]:
            failures.append(f"max-abs {self.max_abs:.3g} > {limits['max_abs']:.3g}")
        return failures


@dataclass
class OutputCheck:
    """One output of one stored case (``case``: its main input and shape) against its stored fp32
    eager value on every call, with the limits; its figures are the worst call's."""

    component: str  # or PASS
    output: str
    precision: str
    limits: dict[str, float]
    case: str
    calls: list[CallCheck] = field(default_factory=list)

    @property
    def rel_l2(self) -> float:
        return max((c.rel_l2 for c in self.calls), default=float("nan"))

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.calls), default=float("nan"))

    @property
    def failures(self) -> list[str]:
        """One phrase per failed call, naming the call."""
        return [f"{c.call} ({', '.join(f)})" for c in self.calls if (f := c.failures(self.limits))]

    @property
    def passed(self) -> bool:
        return not self.failures

    def line(self) -> str:
        shape_errors = [c.shape_error for c in self.calls if c.shape_error]
        if shape_errors:
            figures = shape_errors[0]
        else:
            figures = (f"rel-L2 {self.rel_l2:.2e} (limit {self.limits['rel_l2']:.2e})  "
                       f"max-abs {self.max_abs:.2e} (limit {self.limits['max_abs']:.2e})")
            figures += "" if all(c.finite for c in self.calls) else "  non-finite values"
        failed = [c.call for c in self.calls if c.failures(self.limits)]
        verdict = f"FAIL on the {', '.join(failed)}" if failed else "PASS"
        return (f"{self.component:<13} {self.precision:<5} {self.output:<9} {self.case:<26} {figures}  "
                f"{len(self.calls)} call{'s' if len(self.calls) > 1 else ''}  {verdict}")


@dataclass
class CheckResult:
    """The check set run through one backend: every output's figures, and the components (or the
    pass) that did not run, with why. Passed only when everything ran and every output is within
    its limits on every call."""

    backend: str
    device: str
    check_set: str  # the file, relative to the folder
    outputs: list[OutputCheck] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)  # component -> why it cannot run here
    errors: dict[str, str] = field(default_factory=dict)  # component -> the error its run raised
    notes: list[str] = field(default_factory=list)  # limits that could not follow the precision run
    coverage: list[str] = field(default_factory=list)  # profiles' largest shapes checked smaller, or not

    @property
    def complete(self) -> bool:
        """Whether every component and the pass ran (the figures are a verdict on the engines)."""
        return not self.not_run and not self.errors

    @property
    def passed(self) -> bool:
        return self.complete and all(o.passed for o in self.outputs)

    @property
    def failures(self) -> list[str]:
        """One phrase per failed call of an output, component not run or run that raised."""
        failed = [f"{o.component} {o.output} at {o.case}, {why}" for o in self.outputs for why in o.failures]
        failed += [f"{c} raised: {why}" for c, why in self.errors.items()]
        return failed + [f"{c} cannot run here: {why}" for c, why in self.not_run.items()]

    def lines(self) -> list[str]:
        """The table ``runtime.check`` prints: one line per output of each case, then what did not run."""
        lines = [o.line() for o in self.outputs]
        lines += [f"{c:<13} {'':<5} {'-':<9} ERROR: {why}" for c, why in self.errors.items()]
        return lines + [f"{c:<13} {'':<5} {'-':<9} NOT RUN: {why}" for c, why in self.not_run.items()]

    def to_dict(self) -> dict:
        return {"backend": self.backend, "device": self.device, "check_set": self.check_set, "passed": self.passed,
                "failures": self.failures,
                "outputs": [{**asdict(o), "rel_l2": o.rel_l2, "max_abs": o.max_abs, "passed": o.passed}
                            for o in self.outputs],
                "not_run": self.not_run, "errors": self.errors, "notes": self.notes, "coverage": self.coverage}


class _StoredNoise(Noise):
    """The pass's noise as the build drew and stored it (the runtime's CPU convention)."""

    def __init__(self, noise: torch.Tensor):
        self._noise = noise

    def next_pass(self, latents_small: torch.Tensor) -> torch.Tensor:
        return self._noise.to(latents_small.device)


def _refuse_other_layout(folder: Path, manifest: Manifest) -> None:
    """Raise ``CheckSetError`` unless the folder's check set has the layout this runtime reads: an
    older one holds too little (the first profile's smallest shape) to vouch for the engines."""
    record = manifest.check_set
    if record is not None and record.version != CheckSetRecord.VERSION:
        raise CheckSetError(f"the check set {record.file} of {folder} has layout version {record.version}; this "
                            f"runtime reads version {CheckSetRecord.VERSION} (every profile's smallest and largest shapes); "
                            f"rebuild with: {manifest.rebuild_command}")


def read_check_set(folder: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The check set's tensors, refused unless the file is the one the manifest names (sha256), in
    the layout this runtime reads."""
    record = manifest.check_set
    rebuild = manifest.rebuild_command
    if record is None:
        raise CheckSetError(f"{folder} has no check set (built before check sets were stored); rebuild with: {rebuild}")
    _refuse_other_layout(folder, manifest)
    path = Path(folder) / record.file
    if not path.is_file():
        raise CheckSetError(f"the check set {record.file} named in the manifest is missing from {folder}; "
                            f"rebuild with: {rebuild}")
    if sha256_file(path) != record.sha256:
        raise CheckSetError(f"the check set {record.file} does not match the manifest (sha256): it was changed after "
                            f"the build; rebuild with: {rebuild}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckSetError(f"the check set {record.file} cannot be read ({exc}); rebuild with: {rebuild}") from exc


def _compare(call: str, got: torch.Tensor, expected: torch.Tensor) -> CallCheck:
    if tuple(got.shape) != tuple(expected.shape):
        return CallCheck(call, shape_error=f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    figures = difference(got, expected)
    return CallCheck(call, figures.rel_l2, figures.max_abs, figures.finite)


def _limits(entry: dict, run_precision: str | None, notes: list[str], what: str) -> tuple[str, dict]:
    """The precision and limits to hold ``what`` to: the stored ones, or those of the float precision
    the backend runs it in when that differs (fp32 runs are held to the graph's, looser, limits)."""
    if run_precision in (None, "fp32", entry["precision"]):
        return entry["precision"], entry["limits"]
    limits = entry["precision_limits"].get(run_precision)
    if limits is None:
        notes.append(f"{what} runs in {run_precision} here; the check set holds no {run_precision} limits for it; "
                     f"held to the {entry['precision']} limits")
        return entry["precision"], entry["limits"]
    return run_precision, limits


def _fed(tensor: torch.Tensor, name: str, produced: dict[str, torch.dtype], device: torch.device) -> torch.Tensor:
    """A stored input as this backend takes it: in the type the backend's own component produces
    under that name (the U-Net's encoder-fed inputs: fp32 in the torch backend's fp32 mode, the
    graph's type elsewhere), else as stored (the graph's type)."""
    return tensor.to(device=device, dtype=produced.get(name, tensor.dtype))


def _shape(name: str, shape: list[int]) -> str:
    return f"{name} {'x'.join(str(s) for s in shape)}"


def _coverage(component: str, entry: dict) -> list[str]:
    """What the check set says it could not hold of ``component``'s profiles' largest shapes."""
    lines = []
    for case in entry["cases"]:
        if reduced := case.get("reduced"):
            main, shape = next(iter(case["inputs"].items()))
            lines.append(f"{component} {reduced['profile']}: checked at {_shape(main, shape)}, smaller than its "
                         f"largest {_shape(main, reduced['largest'])}, which does not fit the check set's budget")
    return lines + [f"{component} {profile}: largest shape not checked: {why}"
                    for profile, why in entry["not_stored"].items()]


def _stored_case(tensors: dict[str, torch.Tensor], component: str, case: dict,
                 outputs: list[str]) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One case of ``component`` as the file holds it: its main input and shape (for messages), its
    inputs and its expected outputs; a ``KeyError`` names what the file lacks."""
    prefix = f"{component}/{case['name']}"
    return (_shape(*next(iter(case["inputs"].items()))),
            {n: tensors[f"{prefix}/inputs/{n}"] for n in case["inputs"]},
            {n: tensors[f"{prefix}/outputs/{n}"] for n in outputs})


def _batch(inputs: dict[str, torch.Tensor]) -> int:
    """The batch every input shares (1 where they do not agree: nothing to reorder)."""
    sizes = {t.shape[0] if t.dim() else 1 for t in inputs.values()}
    return sizes.pop() if len(sizes) == 1 else 1


def _spoil(outputs: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
    """Fill outputs already compared with NaN. A backend may hand back the same buffers on every
    call at a shape (TensorRT's launches do); a later call that writes nothing into them (a
    replayed CUDA graph that recorded no work) would otherwise pass on the previous call's values.
    An output sharing memory with an input is left alone: it feeds the next call."""
    fed = {t.untyped_storage().data_ptr() for t in inputs.values()}
    for tensor in outputs.values():
        if tensor.is_floating_point() and tensor.untyped_storage().data_ptr() not in fed:
            tensor.fill_(float("nan"))


@torch.inference_mode()
def run_check_set(backend: Backend, folder: str | Path, manifest: Manifest) -> CheckResult:
    """Run the folder's check set through ``backend`` (see the module docstring): every case of
    every component once per ``CALLS``, each call compared before the next (a backend may reuse
    its output buffers), then the whole pass. Components the backend cannot run are recorded as
    not run, with why; errors of a run as errors."""
    folder = Path(folder)
    tensors = read_check_set(folder, manifest)
    record = manifest.check_set
    result = CheckResult(backend.name, str(backend.device), record.file)
    produced: dict[str, torch.dtype] = {}
    device = backend.device
    with backend.on_stream():
        for component, entry in record.components.items():
            try:
                backend.check(component)
            except BackendUnavailable as exc:
                result.not_run[component] = str(exc)
                continue
            try:
                result.coverage += _coverage(component, entry)
                precision, limits = _limits(entry, backend.run_precision(component), result.notes, component)
                limits = {n: limits[n] for n in entry["outputs"]}
                stored = [_stored_case(tensors, component, case, entry["outputs"]) for case in entry["cases"]]
            except KeyError as exc:
                raise CheckSetError(f"the check set {record.file} lacks {exc} for {component}; rebuild with: "
                                    f"{manifest.rebuild_command}") from exc
            at = "its first case"
            try:
                for where, inputs, expected in stored:
                    inputs = {n: _fed(t, n, produced, device) for n, t in inputs.items()}
                    checks = {n: OutputCheck(component, n, precision, limits[n], where) for n in limits}
                    for call in CALLS:
                        at = f"{where}, {call}"
                        reverse = call == CALLS[-1] and _batch(inputs) > 1
                        fed = {n: t.flip(0) for n, t in inputs.items()} if reverse else inputs
                        outputs = backend.run(component, fed)
                        for name, check in checks.items():
                            if name not in outputs:
                                raise RuntimeError(f"the backend returned no output {name}")
                            produced[name] = outputs[name].dtype
                            got = outputs[name].float()
                            check.calls.append(_compare(call, got.flip(0) if reverse else got, expected[name]))
                        _spoil(outputs, fed)
                    result.outputs += checks.values()
            except (RuntimeError, ValueError, TypeError) as exc:  # the backend's own failures
                result.errors[component] = f"at {at}: " + (" ".join(str(exc).split())[:300] or type(exc).__name__)
        whole = record.whole_pass
        ran = {c for c in record.components if c not in result.not_run and c not in result.errors}
        if whole and set(PASS_COMPONENTS) <= ran:
            try:
                names = whole["tensors"]
                latents_small, noise, x0 = (tensors[names[n]] for n in ("latents_small", "noise", "x0"))
            except KeyError as exc:
                raise CheckSetError(f"the check set {record.file} lacks {exc} for the pass; rebuild with: "
                                    f"{manifest.rebuild_command}") from exc
            try:
                got = run_pass(backend.run, latents_small.to(device), _StoredNoise(noise))
                precision, limits = _limits(whole, backend.run_precision("unet"), result.notes, PASS)
                check = OutputCheck(PASS, "x0", precision, limits, _shape("latents_small", whole["latents_small"]))
                check.calls.append(_compare(WHOLE_PASS, got, x0))
                result.outputs.append(check)
            except (RuntimeError, ValueError, TypeError) as exc:
                result.errors[PASS] = " ".join(str(exc).split())[:300] or type(exc).__name__
        elif whole:
            result.not_run[PASS] = "cond_encoder and unet did not both run"
    return result


def verdict_path(identity: dict, check_set_sha256: str, folder: Path) -> Path:
    """Where the verdict for ``identity`` and this check set is cached (``runtime.cache``)."""
    text = json.dumps({"identity": identity, "check_set": check_set_sha256}, sort_keys=True, default=str)
    return cache_dir(VERDICTS, folder) / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"


def _cached_verdict(path: Path, identity: dict, check_set_sha256: str) -> dict | None:
    """The verdict stored at ``path`` for exactly this identity and check set, else None."""
    try:
        verdict = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("ignoring the unreadable check verdict %s (%s); checking again", path, exc)
        return None
    same = (isinstance(verdict, dict) and isinstance(verdict.get("passed"), bool)
            and verdict.get("check_set_sha256") == check_set_sha256
            and verdict.get("identity") == json.loads(json.dumps(identity, default=str)))
    return verdict if same else None


def _store_verdict(path: Path, verdict: dict) -> None:
    try:
        with atomic_output(path, shared=True) as partial:
            partial.write_text(json.dumps(verdict, indent=2) + "\n")
    except OSError as exc:  # a read-only home: the check then runs on every load, nothing breaks
        logger.warning("could not cache the check verdict in %s (%s); the check runs again on the next load",
                       path, exc.strerror or exc)


def verify_first_use(backend: Backend, folder: str | Path, manifest: Manifest) -> None:
    """Check ``backend``'s engines against the folder's check set once per identity; refuse them
    (closing the backend) with ``EngineCheckFailed`` when they fail or cannot be checked."""
    identity = backend.verification_identity()
    if identity is None:
        return
    folder = Path(folder)
    try:
        _verify(backend, folder, manifest, identity)
    except BaseException:
        backend.close()
        raise


def _verify(backend: Backend, folder: Path, manifest: Manifest, identity: dict) -> None:
    record = manifest.check_set
    if record is None:
        logger.warning("%s has no check set (built before check sets were stored): the %s engines are used "
                       "unchecked; rebuild to add one: %s", folder, backend.name, manifest.rebuild_command)
        return
    try:  # before the cache: a verdict an older layout gave covers too little to be trusted now
        _refuse_other_layout(folder, manifest)
    except CheckSetError as exc:
        raise EngineCheckFailed(f"the {backend.name} engines cannot be checked: {exc}") from exc
    path = verdict_path(identity, record.sha256, folder)
    verdict = _cached_verdict(path, identity, record.sha256)
    where = f"cached verdict {path}; delete it to check again"
    if verdict is None:
        try:
            result = run_check_set(backend, folder, manifest)
        except CheckSetError as exc:
            raise EngineCheckFailed(f"the {backend.name} engines cannot be checked: {exc}") from exc
        if not result.complete:  # not a verdict on the engines (a component could not run): not cached
            raise EngineCheckFailed(f"the {backend.name} engines could not run their check set here: "
                                    f"{'; '.join(result.failures)}")
        verdict = {"passed": result.passed, "failures": result.failures, "identity": identity,
                   "check_set_sha256": record.sha256, "folder": str(folder.resolve()),
                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "result": result.to_dict()}
        _store_verdict(path, verdict)
        logger.info("%s engines of %s checked on first use: %s", backend.name, folder,
                    "passed" if result.passed else "FAILED")
        for line in result.coverage:
            logger.info("check set coverage: %s", line)
        where = f"verdict cached in {path}"
    if not verdict["passed"]:
        raise EngineCheckFailed(
            f"the {backend.name} engines of {folder} failed their check set here (against the fp32 eager outputs "
            f"stored at build time): {'; '.join(verdict.get('failures') or ['see the verdict'])} ({where}). Rebuild "
            f"with: {manifest.rebuild_command}, or use another backend (onnxruntime)"
        )

"""Optional packages: whether they are here, and what to install when they are not.

Kept apart from the modules that use them (``engines.memory`` imports onnx), so the runtime can
ask without loading the build side.
"""

from __future__ import annotations

ONNXRUNTIME_EXTRAS = (
    "install exactly one ONNX Runtime through the project's extras: pip install -e '.[cpu]' "
    "(onnxruntime) or pip install -e '.[gpu]' (onnxruntime-gpu); not both, they write the same "
    "onnxruntime package"
)


def onnxruntime_missing() -> str | None:
    """What to install when ONNX Runtime is missing (None when it imports): the CLIs check this
    before any work, since it comes only through the cpu or gpu extra."""
    try:
        import onnxruntime  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "onnxruntime":
            raise
        return f"ONNX Runtime is not installed; {ONNXRUNTIME_EXTRAS}"
    return None

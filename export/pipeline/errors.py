"""The build's error, in a module of its own so that a stage raising it imports nothing more."""

from engines.errors import FlowUpscalerError


class BuildError(FlowUpscalerError, RuntimeError):
    """A stage failed; the message says which and what to do."""

"""The toolkit's one base exception, at the bottom layer so every package can raise its kinds."""

from __future__ import annotations


class FlowUpscalerError(Exception):
    """Base of every error this toolkit raises on purpose. Its message names the problem and what to
    do about it; a CLI prints it as one line and exits 1. Each kind also derives from the built-in
    it refines (ValueError for bad input, RuntimeError for what cannot run), so code written
    against those keeps working. Catch this to handle any refusal of the toolkit."""

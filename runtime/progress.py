"""Progress and cancellation for long calls: a callback told after each unit of work.

``Upscaler.upscale`` and ``Upscaler.decode`` take ``progress(done, total)``: called once with
``done = 0`` before any work, then after each 2x pass and each decoded tile. A host shows it (a
progress bar) and cancels by raising from it: the call stops there, between two units, and the
exception reaches the caller unchanged. Nothing of the upscaler is left half-done (its lock and
stream scope are released, no state carries over), so the next call runs as on a fresh one.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[int, int], None]


class Steps:
    """The units of work of one call, reported to an optional ``progress`` callback."""

    def __init__(self, progress: ProgressCallback | None, total: int):
        self._progress, self.total, self.done = progress, total, 0
        if progress is not None:
            progress(0, total)

    def advance(self) -> None:
        self.done += 1
        if self._progress is not None:
            self._progress(self.done, self.total)

"""The stages' progress lines and timings: what the user sees and what ``report.json`` lists."""

from __future__ import annotations

import time
from collections.abc import Callable


class StageLog:
    """Passes progress lines to ``log`` and keeps one entry per finished stage for the report."""

    def __init__(self, log: Callable[[str], object]):
        self.log = log
        self.stages: list[dict] = []

    def __call__(self, line: str) -> None:
        self.log(line)

    def finished(self, component: str, stage: str, start: float, reused: bool, **facts) -> None:
        """Record a stage begun at ``start`` (``time.perf_counter``) and say how it went."""
        seconds = round(time.perf_counter() - start, 2)
        self.stages.append(dict(component=component, stage=stage, seconds=seconds, reused=reused, **facts))
        self.log(f"  {stage}: {'reused (unchanged inputs)' if reused else f'done in {seconds:.1f} s'}")

"""Logging helpers for library code: it never configures logging globally (only the CLIs do)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class _BelowLevel(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


@contextmanager
def quiet_logger(name: str | None, level: int = logging.ERROR) -> Iterator[None]:
    """Drop a third-party library's records below ``level`` during one call of ours.

    ``None``: records logged on the root logger itself (``logging.warning(...)``), by a filter, so
    the app's own loggers are untouched. A name: that library's logger subtree, by raising its
    level for the block (children logging through it inherit it). Both are undone afterwards.
    """
    logger = logging.getLogger(name)
    if name is None:
        drop = _BelowLevel(level)
        logger.addFilter(drop)
        try:
            yield
        finally:
            logger.removeFilter(drop)
        return
    previous = logger.level
    logger.setLevel(max(level, previous))
    try:
        yield
    finally:
        logger.setLevel(previous)

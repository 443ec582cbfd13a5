"""Library loggers quieted for a while: what the Genesis user cannot act on stays out of the output, and the
logger's own level comes back afterwards."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quieted(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Within the block, logger `name` passes only records at `level` or above."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)

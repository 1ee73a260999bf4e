"""Log lines an operator on call can read: UTC time, level, node, component, message."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any


class _Formatter(logging.Formatter):
    converter = staticmethod(time.gmtime)

    def __init__(self, node: str) -> None:
        super().__init__(
            f"%(asctime)s.%(msecs)03dZ %(levelname)-7s {node} %(name)s: %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )


def setup(node: str = "-", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(node))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiohttp.access", "sqlalchemy", "psycopg"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class LogBudget:
    """At most ``per_minute`` lines a minute about clients' mistakes (a flood of bad requests
    must not flood the log); the rest are counted and reported in one line a minute later."""

    def __init__(self, logger: logging.Logger, per_minute: int = 120) -> None:
        self.logger = logger
        self.per_minute = per_minute
        self.window_start = 0.0
        self.used = 0
        self.suppressed = 0

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        if now - self.window_start >= 60:
            if self.suppressed:
                self.logger.info(
                    "%d more refused requests in the last minute were not logged", self.suppressed
                )
            self.window_start, self.used, self.suppressed = now, 0, 0
        if self.used < self.per_minute:
            self.used += 1
            self.logger.log(level, fmt, *args)
        else:
            self.suppressed += 1

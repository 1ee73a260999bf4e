"""Log lines an operator on call can read: UTC time, level, node, component, message."""

from __future__ import annotations

import logging
import sys
import time


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

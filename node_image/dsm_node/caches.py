"""In-process caches of a node. Clearing them is the specification's example of a local job."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from dsm_node import metrics

T = TypeVar("T")


class Caches:
    """Named values with a time to live, cleared all at once by the ``clear_caches`` job."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[float, Any]] = {}
        self.clears = 0

    async def get(self, name: str, ttl: float, load: Callable[[], Awaitable[T]]) -> T:
        hit = self._values.get(name)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]  # type: ignore[no-any-return]
        value = await load()
        self._values[name] = (now + ttl, value)
        return value

    def clear_entry(self, name: str) -> None:
        self._values.pop(name, None)

    def clear(self) -> int:
        n = len(self._values)
        self._values.clear()
        self.clears += 1
        metrics.CACHE_CLEARS.inc()
        return n

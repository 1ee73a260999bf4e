"""The error a client caused, answered as a 4xx with a JSON body naming the problem."""

from __future__ import annotations

from collections.abc import Mapping


class ClientError(Exception):
    """A request the client got wrong: answered with ``status`` and a JSON ``{"error": ...}``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


__all__ = ["ClientError"]

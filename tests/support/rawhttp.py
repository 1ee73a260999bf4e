"""A raw HTTPS client for hostile-input tests: sends exactly the bytes given (NUL characters,
undecodable header bytes, lying Content-Length, slow dribbles), which ordinary clients refuse."""

from __future__ import annotations

import functools
import json
import socket
import ssl
from dataclasses import dataclass
from typing import Any


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One client context for every connection, without the system's CA store: nothing is
    verified, and ``ssl.create_default_context()`` parses the whole store (tens of ms of CPU a
    call, far more on a loaded machine) -- per connection, that alone made a crowd of clients
    in one event loop seconds late with their requests."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect(
    address: str, port: int, timeout: float = 30, source: str | None = None
) -> ssl.SSLSocket:
    sock = socket.create_connection(
        (address, port), timeout=timeout, source_address=(source, 0) if source else None
    )
    return tls_context().wrap_socket(sock, server_hostname=address)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: Any  # parsed JSON when it is JSON, else the text

    @property
    def error(self) -> str:
        return str(self.body.get("error", "")) if isinstance(self.body, dict) else str(self.body)


def request(
    address: str,
    port: int,
    method: str,
    target: bytes | str,
    headers: list[tuple[bytes | str, bytes | str]] | None = None,
    body: bytes | None = None,
    send_body: bool = True,
    timeout: float = 30,
    source: str | None = None,
) -> Response:
    """One request on its own connection (``Connection: close``). With ``send_body=False`` only
    the head is sent (with the body's Content-Length): the server must answer from the head.
    ``source``: the loopback address to connect from (a client of its own)."""
    head = [b"%s %s HTTP/1.1" % (method.encode(), _b(target)), b"Host: " + address.encode()]
    names = set()
    for name, value in headers or []:
        head.append(_b(name) + b": " + _b(value))
        names.add(_b(name).lower())
    if body is not None and b"content-length" not in names:
        head.append(b"Content-Length: %d" % len(body))
    if b"content-type" not in names:
        head.append(b"Content-Type: application/json")
    head.append(b"Connection: close")
    data = b"\r\n".join(head) + b"\r\n\r\n"
    with connect(address, port, timeout, source) as s:
        s.sendall(data + (body if body is not None and send_body else b""))
        raw = b""
        while chunk := _recv(s):
            raw += chunk
    return parse_response(raw)


def _recv(s: ssl.SSLSocket) -> bytes:
    try:
        return s.recv(65536)
    except (ConnectionResetError, ssl.SSLError):
        return b""


def parse_response(raw: bytes) -> Response:
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        raise AssertionError(f"no HTTP response: {raw[:200]!r}")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    text = payload.decode("utf-8", "replace")
    try:
        parsed: Any = json.loads(text)
    except json.JSONDecodeError:
        parsed = text
    return Response(status, headers, parsed)


def _b(v: bytes | str) -> bytes:
    return v if isinstance(v, bytes) else v.encode()

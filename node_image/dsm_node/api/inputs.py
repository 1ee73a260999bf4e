"""Reading what a client sends, strictly, before anything else sees it.

Everything a request carries is hostile until proven otherwise: the body (its size, its encoding,
its nesting, every string in it), path and query values, and the credentials header. Each reader
here either returns a clean Python value or raises a ``ClientError`` (4xx) that names the problem;
no malformed input may reach the database (PostgreSQL refuses NUL characters and lone surrogates
with an error that would surface as a 5xx) or a recursive parser.

Decisions, where HTTP and JSON leave room:

- A body is UTF-8 JSON. Its size is bounded per route (``Route.max_body``), and reading it is
  bounded in time (a slow body ends in 408 and a closed connection).
- Nesting is bounded at ``MAX_DEPTH`` levels, checked on the raw text *before* parsing, so no
  parser ever recurses on a client's behalf.
- ``NaN``, ``Infinity`` and numbers that overflow a double are refused, and so are integers longer
  than ``MAX_INTEGER_DIGITS`` digits (Python's own conversion limit is a CPU hazard).
- No string anywhere (keys included) may contain NUL or a lone UTF-16 surrogate.
- Numbers in paths and query strings are ASCII digits only (``str.isdigit`` accepts ``²``).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from aiohttp import web

from dsm_node.api.errors import ClientError

MAX_DEPTH = 32
MAX_INTEGER_DIGITS = 100
MAX_NUMBER_CHARS = 100

# A JSON string, or an unterminated one running to the end: every match attempt that starts at a
# quote succeeds, so the scan stays linear whatever the input (possessive loop, Python 3.11+).
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST_PAIR = re.compile(r"\[\]|\{\}")
_BAD_CHARACTER = re.compile("[\x00\ud800-\udfff]")
_ASCII_INTEGER = re.compile(r"[0-9]{1,18}")
_ASCII_DECIMAL = re.compile(r"[0-9]{1,15}(\.[0-9]{1,15})?")
_TOKEN = re.compile(r"[\x21-\x7e]{1,512}")


# -- bodies ---------------------------------------------------------------------------------


async def read_body(request: web.Request, max_bytes: int, seconds: float) -> bytes:
    """The raw body, at most ``max_bytes`` (413 beyond), within ``seconds`` (408)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise ClientError(413, _too_large(max_bytes))
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(seconds):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > max_bytes:
                    raise ClientError(413, _too_large(max_bytes))
                chunks.append(chunk)
    except TimeoutError:
        raise ClientError(408, f"request body not received within {seconds:g} s") from None
    return b"".join(chunks)


def _too_large(max_bytes: int) -> str:
    return f"request body is larger than this endpoint accepts ({max_bytes} bytes)"


def parse_json(raw: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Parses a JSON document under the rules in the module docstring."""
    if not raw.strip():
        raise ClientError(400, "request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ClientError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
    check_depth(text, max_depth)
    try:
        value = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except json.JSONDecodeError as e:
        raise ClientError(400, f"request body is not valid JSON: {e}") from None
    check_strings(value)
    return value


def check_depth(text: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuses JSON text nested deeper than ``max_depth`` without parsing it: strings are cut
    out, then each pass removes the innermost bracket pairs (C-speed regular expressions; the
    number of passes is the nesting depth)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = 0
    while brackets:
        if depth >= max_depth:
            raise ClientError(400, f"request body is nested deeper than {max_depth} levels")
        shorter = _INNERMOST_PAIR.sub("", brackets)
        if len(shorter) == len(brackets):
            raise ClientError(400, "request body is not valid JSON: brackets do not match")
        brackets = shorter
        depth += 1


def _refuse_constant(name: str) -> Any:
    raise ClientError(400, f"request body is not valid JSON: {name} is not a number")


def _finite_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise ClientError(400, f"a number in the request body is longer than {MAX_NUMBER_CHARS}")
    value = float(literal)
    if not math.isfinite(value):
        raise ClientError(400, f"number {literal[:40]} is out of range")
    return value


def _bounded_int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise ClientError(
            400, f"an integer in the request body has more than {MAX_INTEGER_DIGITS} digits"
        )
    return int(literal)


def check_strings(value: Any, where: str = "body") -> None:
    """Refuses NUL characters and lone surrogates in every string, keys included."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            _check_text(v, path)
        elif isinstance(v, dict):
            for k, item in v.items():
                _check_text(k, f"{path} key {k[:40]!r}")
                stack.append((item, f"{path}.{k[:40]}"))
        elif isinstance(v, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(v))


def _check_text(s: str, where: str) -> None:
    if m := _BAD_CHARACTER.search(s):
        what = "a NUL character" if m.group() == "\x00" else "a lone UTF-16 surrogate"
        raise ClientError(400, f"{where} contains {what}")


def clean_text(s: str, what: str) -> str:
    """A path or query value: no NUL, no lone surrogate (undecodable bytes become those)."""
    _check_text(s, what)
    return s


# -- path and query values ------------------------------------------------------------------


def ascii_integer(raw: str, what: str, low: int, high: int, rule: str | None = None) -> int:
    """ASCII digits only, within [low, high]; ``rule`` words the refusal (default: the range)."""
    if not _ASCII_INTEGER.fullmatch(raw) or not low <= int(raw) <= high:
        rule = rule or f"an integer between {low} and {high}"
        raise ClientError(400, f"{what} must be {rule}, got {raw[:40]!r}")
    return int(raw)


def ascii_decimal(raw: str, what: str, low: float, high: float) -> float:
    """A plain positive decimal (``3600``, ``0.5``): no sign, exponent, ``nan`` or ``inf``."""
    if not _ASCII_DECIMAL.fullmatch(raw) or not low < float(raw) <= high:
        raise ClientError(
            400, f"{what} must be a number greater than {low:g} and at most {high:g}, got {raw!r}"
        )
    return float(raw)


def flag(raw: str | None, what: str) -> bool:
    if raw is None:
        return False
    value = raw.lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise ClientError(400, f"{what} must be true or false, got {raw!r}")


# -- credentials ----------------------------------------------------------------------------


def bearer_token(header: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>``, or None when the header does not carry one
    in that exact form (printable ASCII, no spaces, at most 512 characters)."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip(" ")
    if scheme.lower() != "bearer" or not _TOKEN.fullmatch(token):
        return None
    return token

"""The console's half of the API's guard middleware (``api.app.guard`` hands every console
request here): one place where a console request is judged before any page handler runs.

In order: the request target is clean; a POST comes from one of our own pages (Origin); the
session cookie names a live session (pages without one redirect to sign-in, POSTs and live
refreshes are answered 401); a POST's form is read under the route's size bound and carries the
session's CSRF token; the user's role is at least the route's. Every answer, refusals included,
is an HTML page carrying the security headers of ``console.security``.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl, quote

import psycopg
import sqlalchemy.exc
from aiohttp import web

from dsm_node import auth, roles
from dsm_node.api import inputs, listeners, paths
from dsm_node.api.common import (
    LIMITS_KEY,
    PRINCIPAL_KEY,
    ROUTE_KEY,
    ClientError,
    Handler,
    Route,
    ready,
    source,
)
from dsm_node.console import pages, security

log = logging.getLogger("dsm.console")
MAX_FORM_FIELDS = 8
REFRESH_HEADER = "X-DSM-Refresh"  # the console's script sets it when it refreshes a page
_API_PREFIXES = ("/api/", "/healthz", "/readyz", "/metrics")
_REASONS = {
    400: "Bad request",
    401: "Sign-in required",
    403: "Refused",
    404: "Not found",
    405: "Method not allowed",
    408: "Too slow",
    409: "Refused",
    413: "Too large",
    415: "Unsupported form",
    503: "Unavailable",
}


def serves(request: web.Request, route: Route | None) -> bool:
    """True for console routes, and for unknown paths outside the API (a person typed them)."""
    if route is not None:
        return route.surface == pages.CONSOLE
    return request.path != "/api" and not request.path.startswith(_API_PREFIXES)


async def guarded(
    request: web.Request, route: Route | None, handler: Handler
) -> web.StreamResponse:
    try:
        response = await _judge_and_handle(request, route, handler)
    except ClientError as e:
        response = await _refusal(request, e.status, str(e), e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        response = await _refusal(request, e.status, e.reason, {})
    except (
        OSError,
        psycopg.OperationalError,
        sqlalchemy.exc.OperationalError,
        sqlalchemy.exc.InterfaceError,
        TimeoutError,
    ) as e:
        listeners.REFUSALS.log(
            logging.WARNING,
            "console %s %s: database unavailable: %s",
            request.method,
            _printable(request),
            str(e).splitlines()[0][:300] if str(e) else type(e).__name__,
        )
        request.pop(PRINCIPAL_KEY, None)  # the page is drawn without the database
        response = await _refusal(
            request, 503, "The database is unreachable; retry shortly.", {"Retry-After": "2"}
        )
    for name, value in security.HEADERS.items():
        response.headers.setdefault(name, value)
    if "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = "no-store"
    return response


async def _judge_and_handle(
    request: web.Request, route: Route | None, handler: Handler
) -> web.StreamResponse:
    inputs.clean_text(request.path, "the request path")
    for key, value in request.query.items():
        inputs.clean_text(key, "a query parameter name")
        inputs.clean_text(value, f"query parameter {key!r}")
    if request.method == "POST":
        problem = security.origin_problem(
            request.headers.get("Origin"), request.headers.get("Referer"), request.host
        )
        if problem is not None:
            raise ClientError(
                403, f"Refused: {problem}. Submit forms from the console's own pages."
            )
    if route is None:  # an unknown path or method: sign-in first, then say so
        if await _session(request) is None:
            return _to_sign_in(request)
        failure = getattr(request.match_info, "http_exception", None)
        status = failure.status if failure is not None else 404
        raise ClientError(
            status,
            "There is no such page."
            if status == 404
            else f"This page does not accept {request.method}.",
        )
    request[ROUTE_KEY] = route
    if route.role is None:
        if route.path == paths.CONSOLE_SIGN_IN and request.method == "GET":
            await _session(request)  # a signed-in user is sent on
        if request.method == "POST":
            await _read_form(request, route)
        return await handler(request)
    who = await _session(request)
    if who is None:
        if request.method == "GET" and not request.headers.get(REFRESH_HEADER):
            return _to_sign_in(request)
        raise ClientError(401, "Your session has ended or you are not signed in. Sign in again.")
    if request.method == "POST":
        await _read_form(request, route)
        if not security.csrf_valid(
            request[pages.SESSION_TOKEN_KEY], pages.form(request).get(security.CSRF_FIELD)
        ):
            raise ClientError(
                403,
                "The form's security token does not match your session. Reload the page and "
                "try again.",
            )
    if not roles.allows(who.role, route.role):
        raise ClientError(
            403, f"You are signed in as {roles.article(who.role)}; this needs {route.role}."
        )
    return await handler(request)


async def _session(request: web.Request) -> auth.Principal | None:
    """The user whose live session the cookie names (API keys do not sign a browser in)."""
    token = request.cookies.get(security.SESSION_COOKIE)
    if not token or len(token) > 200 or not token.isascii():
        return None
    who = await auth.authenticate(ready(request).engine, token)
    if who is None or who.kind is not auth.PrincipalKind.USER:
        return None
    request[PRINCIPAL_KEY] = who
    request[pages.SESSION_TOKEN_KEY] = token
    return who


async def _read_form(request: web.Request, route: Route) -> None:
    if request.content_type != "application/x-www-form-urlencoded":
        raise ClientError(
            415,
            f"Expected a form (application/x-www-form-urlencoded), got {request.content_type!r}.",
        )
    raw = await inputs.read_body(
        request, route.max_body, request.app[LIMITS_KEY].body_timeout_seconds
    )
    try:
        text = raw.decode("utf-8")
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=MAX_FORM_FIELDS,
            errors="strict",
        )
    except (UnicodeDecodeError, ValueError):
        raise ClientError(400, "The form could not be read.") from None
    fields: dict[str, str] = {}
    for key, value in pairs:
        inputs.clean_text(key, "a form field name")
        inputs.clean_text(value, f"form field {key!r}")
        if key in fields:
            raise ClientError(400, f"The form field {key!r} was sent twice.")
        fields[key] = value
    request[pages.FORM_KEY] = fields


def _to_sign_in(request: web.Request) -> web.Response:
    target = request.path_qs if request.path != paths.CONSOLE_HOME else ""
    location = paths.CONSOLE_SIGN_IN + (f"?next={quote(target, safe='/')}" if target else "")
    return pages.see_other(location)


async def _refusal(
    request: web.Request, status: int, message: str, headers: dict[str, str]
) -> web.Response:
    level = logging.INFO if status in (400, 403, 408, 413, 415) else logging.DEBUG
    listeners.REFUSALS.log(
        level,
        "console %s %s from %s: %d %s",
        request.method,
        _printable(request),
        source(request),
        status,
        message[:300].replace("\n", " "),
    )
    if request.get(PRINCIPAL_KEY) is not None:
        back_href, back_label = _same_site_path(request) or paths.CONSOLE_MANAGER_NODES, "Back"
    else:
        back_href, back_label = paths.CONSOLE_SIGN_IN, "Sign in"
    try:
        return await pages.render(
            request,
            "error.html",
            status=status,
            headers=headers,
            title=_REASONS.get(status, "Error"),
            page="error",
            code=status,
            reason=_REASONS.get(status, "Error"),
            message=message,
            back_href=back_href,
            back_label=back_label,
        )
    except (OSError, sqlalchemy.exc.SQLAlchemyError, psycopg.Error, ClientError):
        request.pop(PRINCIPAL_KEY, None)
        return web.Response(text=f"{status} {message}", status=status, headers=headers)


def _same_site_path(request: web.Request) -> str | None:
    referer = request.headers.get("Referer", "")
    prefix = f"https://{request.host}"
    if referer.startswith(prefix + "/"):
        return referer[len(prefix) :]
    return None


def _printable(request: web.Request) -> str:
    return request.raw_path[:200].encode("ascii", "backslashreplace").decode()

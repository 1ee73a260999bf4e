"""The console's browser-security rules, pure: the session cookie, the CSRF token, the Origin
check and the response headers.

- **Session cookie** ``__Host-dsm-session``: the same session token the API hands out, in a
  cookie that is ``HttpOnly`` (no script reads it), ``Secure`` (HTTPS only), ``SameSite=Strict``
  (never sent on a request another site starts) and, by its ``__Host-`` prefix, bound to the
  host that set it with ``Path=/`` and no ``Domain``. Behind a load balancer that host is the
  balancer's name, so the cookie follows the administrator to whichever node answers; the
  session itself is in the shared database.
- **CSRF token**: every state-changing form carries a synchronizer token bound to the session:
  an HMAC of a fixed label keyed by the session token. Every node computes the same token for the
  same session without shared state, nobody can compute it without the session token (which
  script cannot read), and it reveals nothing about the session token. Compared in constant time.
- **Origin**: every console POST must come from a page of the same origin: ``Origin`` (which
  browsers send on every POST) must equal ``https://`` + the ``Host`` the browser addressed.
  This also covers sign-in, where there is no session yet to bind a token to (login CSRF).
- **Headers** on every console response: a Content-Security-Policy allowing only this origin's
  files (no inline script or style, no framing, forms post only here), ``X-Frame-Options: DENY``
  for older browsers, ``nosniff``, a same-origin referrer, and no caching of pages that show data.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import urlsplit

SESSION_COOKIE = "__Host-dsm-session"
CSRF_FIELD = "csrf_token"
_CSRF_LABEL = b"dsm-console-csrf-v1"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "font-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    ]
)
HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
    "Strict-Transport-Security": "max-age=31536000",
}


def csrf_token(session_token: str) -> str:
    return hmac.new(session_token.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def csrf_valid(session_token: str, sent: str | None) -> bool:
    return sent is not None and hmac.compare_digest(
        csrf_token(session_token).encode(), sent.encode("utf-8", "replace")
    )


def session_cookie(token: str, max_age_seconds: int) -> str:
    """The ``Set-Cookie`` value that signs a browser in."""
    return (
        f"{SESSION_COOKIE}={token}; Max-Age={max(0, max_age_seconds)}; Path=/; Secure; HttpOnly; "
        "SameSite=Strict"
    )


def cleared_cookie() -> str:
    return f"{SESSION_COOKIE}=; Max-Age=0; Path=/; Secure; HttpOnly; SameSite=Strict"


def origin_problem(origin: str | None, referer: str | None, host: str | None) -> str | None:
    """Why a POST is not from one of our own pages, or None when it is. ``Origin`` decides; a
    browser that sends none (some send none on same-origin requests of old) is judged by the
    ``Referer``'s origin; a request with neither is refused."""
    if not host:
        return "the request names no Host"
    expected = f"https://{host.lower()}"
    if origin is not None and origin != "":
        if origin == "null":
            return "the request comes from an opaque origin"
        return None if origin.lower() == expected else f"cross-origin request from {origin}"
    if referer:
        parts = urlsplit(referer)
        seen = f"{parts.scheme}://{parts.netloc}".lower()
        return None if seen == expected else f"cross-origin request from {seen}"
    return "the request says neither where it comes from (Origin) nor which page sent it"


def safe_next(target: str | None, default: str) -> str:
    """Where to go after sign-in: a path on this site, never another site (``//evil``,
    ``https://evil``, ``/\\evil``) and never back to sign-in."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return default
    if any(c in target for c in "\\\r\n\t") or not target.isascii():
        return default
    if urlsplit(target).path in ("/sign-in", "/sign-out"):
        return default
    return target

"""Who may call what: the expected status of every principal on every route the node serves.

Offers :data:`TABLE` (one :class:`Row` per route: how to call it and the status administrators,
auditors and callers without credentials get), :data:`PRINCIPALS` (an administrator and an
auditor, each by session and by API key, and nobody), :func:`expected`, and the credentials the
table's calls use. Written here by hand, not derived from the code: tests/integration/
test_access.py calls every route as every principal against a real node, and tests/unit/
test_access_table.py checks that the table covers every route the node declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ADMIN_PASSWORD = "correct horse battery staple"
AUDITOR_PASSWORD = "auditor horse battery staple"
AUDITOR_KEY = "access-test-auditor-key-0123456789"
PRINCIPALS = ("admin-session", "admin-key", "auditor-session", "auditor-key", "nobody")
ADMINS = ("admin-session", "admin-key")
AUDITORS = ("auditor-session", "auditor-key")


@dataclass(frozen=True)
class Row:
    """One route: how to call it, and the status each principal gets."""

    method: str
    path: str  # the route's pattern, as the node declares it
    call: str  # a concrete path
    body: Any = None
    admin: int = 200  # status for administrators (session and key alike)
    auditor: int = 403
    nobody: int = 401
    key_differs: int | None = None  # status for API keys where it differs from sessions


TABLE = [
    Row("GET", "/healthz", "/healthz", admin=200, auditor=200, nobody=200),
    Row("GET", "/readyz", "/readyz", admin=200, auditor=200, nobody=200),
    Row("GET", "/metrics", "/metrics", admin=200, auditor=200, nobody=200),
    Row("GET", "/api/nodes", "/api/nodes", auditor=200),
    Row("GET", "/api/jobs/stats", "/api/jobs/stats", auditor=200),
    Row("GET", "/api/jobs/{id}", "/api/jobs/{job}", auditor=200),
    # enqueue: the route admits both roles; each job type decides (test below)
    Row("POST", "/api/jobs", "/api/jobs", {"type": "report_for_auditors"}, 201, 201),
    # sign-in needs no credentials: whoever calls, right credentials in the body sign in
    Row(
        "POST",
        "/api/sessions",
        "/api/sessions",
        {"username": "admin", "password": ADMIN_PASSWORD},
        admin=201,
        auditor=201,
        nobody=201,
    ),
    Row("DELETE", "/api/sessions", "/api/sessions", auditor=200, key_differs=400),
    Row(
        "POST", "/api/nodes/{name}/decommission", "/api/nodes/no-such-node/decommission", admin=404
    ),
    Row("GET", "/api/settings", "/api/settings", auditor=200),
    Row("PATCH", "/api/settings", "/api/settings", {"jobHistoryRetentionSeconds": 604800}),
    Row("GET", "/api/settings/secrets/{key}", "/api/settings/secrets/access_secret"),
    Row(
        "PUT", "/api/settings/secrets/{key}", "/api/settings/secrets/access_secret", {"value": "v"}
    ),
    Row("POST", "/api/master-key/rotate", "/api/master-key/rotate", admin=202),
    Row("GET", "/api/users", "/api/users"),
    Row("POST", "/api/users", "/api/users", "new-user", admin=201),
    Row("GET", "/api/audit", "/api/audit", auditor=200),
    Row("GET", "/api/alerts", "/api/alerts", auditor=200),
    Row("GET", "/api/agents/managers", "/api/agents/managers", auditor=200),
    # agents (issue 11): reading is for auditors too, tokens and deactivation for administrators
    Row("GET", "/api/agents/tokens", "/api/agents/tokens", auditor=200),
    Row("POST", "/api/agents/tokens", "/api/agents/tokens", {"maxUses": 1}, admin=201),
    Row("DELETE", "/api/agents/tokens/{id}", "/api/agents/tokens/999999", admin=404),
    Row("GET", "/api/agents/alerts", "/api/agents/alerts", auditor=200),
    Row("GET", "/api/agents", "/api/agents", auditor=200),
    Row("GET", "/api/agents/{id}", "/api/agents/999999", admin=404, auditor=404),
    Row("GET", "/api/agents/{id}/events", "/api/agents/999999/events", admin=404, auditor=404),
    Row("POST", "/api/agents/{id}/deactivate", "/api/agents/999999/deactivate", admin=404),
]


def expected(row: Row, principal: str) -> int:
    """The status ``principal`` gets on ``row``'s route."""
    if principal == "nobody":
        return row.nobody
    status = row.admin if principal in ADMINS else row.auditor
    if principal.endswith("-key") and row.key_differs is not None and status < 400:
        return row.key_differs
    return status

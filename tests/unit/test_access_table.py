"""The access table (tests/support/access.py) that tests/integration/test_access.py plays against
a real node names every route the node serves, and only those: a new route cannot arrive without
a row saying who may call it."""

from __future__ import annotations

from dsm_node.api.app import ROUTES
from tests.support.access import TABLE, Row, expected


def test_the_table_covers_every_route_the_node_serves() -> None:
    # the console's routes have their own table (tests/console/test_console_access.py)
    served = {(r.method, r.path) for r in ROUTES if r.surface == "api"}
    tabled = {(r.method, r.path) for r in TABLE}
    assert served == tabled, (sorted(served - tabled), sorted(tabled - served))


def test_api_keys_get_their_own_status_only_where_sessions_succeed() -> None:
    sign_out = Row("DELETE", "/api/sessions", "/api/sessions", auditor=200, key_differs=400)
    assert [expected(sign_out, p) for p in ("admin-session", "admin-key", "nobody")] == [
        200,
        400,
        401,
    ]
    refused = Row("GET", "/api/users", "/api/users", key_differs=400)
    assert expected(refused, "auditor-key") == 403  # a refusal stays a refusal

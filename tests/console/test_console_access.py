"""The console's route policy over plain HTTPS (no browser): every console route, for an
administrator's session, an auditor's session, no session, and credentials that must not open a
console page (an API key as a cookie, a session as a Bearer header). The table must list every
console route, so a new page cannot be added without deciding who may see it."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest

from dsm_node import auth
from dsm_node.api.app import ROUTES
from dsm_node.console import pages, security
from tests.console.helpers import ADMIN_PASSWORD, AUDITOR_PASSWORD, create_auditor
from tests.support import rawhttp
from tests.support.loopback import next_address
from tests.support.nodes import API_KEY, Cluster, NodeProcess
from tests.support.postgres import Server

pytestmark = pytest.mark.integration
NODE = "access-node"


@dataclass(frozen=True)
class Row:
    method: str
    path: str  # as in the route table
    call: str
    admin: int
    auditor: int
    nobody: int


TABLE = [
    Row("GET", "/", "/", 303, 303, 303),
    Row("GET", "/static/{name}", "/static/console.css", 200, 200, 200),
    Row("GET", "/sign-in", "/sign-in", 303, 303, 200),
    Row("POST", "/sign-in", "/sign-in", 401, 401, 401),  # a wrong password, for anyone
    Row("POST", "/sign-out", "/sign-out", 303, 303, 401),
    Row("GET", "/manager-nodes", "/manager-nodes", 200, 200, 303),
    Row("GET", "/manager-nodes/{name}", f"/manager-nodes/{NODE}", 200, 200, 303),
    # the node is Online: refused with the reason (409) for an administrator
    Row(
        "POST",
        "/manager-nodes/{name}/decommission",
        f"/manager-nodes/{NODE}/decommission",
        409,
        403,
        401,
    ),
    Row("GET", "/system-information", "/system-information", 200, 200, 303),
    Row("GET", "/alerts", "/alerts", 200, 200, 303),
    Row("GET", "/audit-log", "/audit-log", 200, 200, 303),
    Row("GET", "/agents", "/agents", 200, 200, 303),
]
_fresh = itertools.count()


@dataclass
class Setup:
    node: NodeProcess

    def session(self, who: str) -> str:
        """A new session (sign-out ends the one it is given)."""
        user, password = {
            "admin": ("admin", ADMIN_PASSWORD),
            "auditor": ("audrey", AUDITOR_PASSWORD),
        }[who]
        status, body = self.node.request(
            "POST",
            "/api/sessions",
            {"username": user, "password": password},
            headers={"Authorization": None},
        )
        assert status == 201, body
        return str(body["token"])

    def call(
        self,
        method: str,
        target: str,
        cookie: str | None,
        form: dict[str, str] | None = None,
        extra: list[tuple[str, str]] | None = None,
    ) -> rawhttp.Response:
        n = self.node
        headers: list[tuple[bytes | str, bytes | str]] = [("Origin", f"https://{n.address}")]
        if cookie is not None:
            headers.append(("Cookie", f"{security.SESSION_COOKIE}={cookie}"))
        headers += extra or []
        body = None
        if method == "POST":
            headers.append(("Content-Type", "application/x-www-form-urlencoded"))
            body = urlencode(form or {}).encode()
        return rawhttp.request(n.address, n.port, method, target, headers, body)


@pytest.fixture(scope="module")
def setup(
    pg_server: Server, pg_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    url = pg_server.create("console_access_tests", template=pg_template)
    cluster = Cluster(url, Path(tmp_path_factory.mktemp("console-access")))
    try:
        node = cluster.start(NODE, DSM_ADMIN_PASSWORD=ADMIN_PASSWORD)
        create_auditor(node)
        yield Setup(node)
    finally:
        cluster.close()
        pg_server.drop("console_access_tests")


def test_the_table_lists_every_console_route() -> None:
    served = {(r.method, r.path) for r in ROUTES if r.surface == pages.CONSOLE}
    assert served == {(r.method, r.path) for r in TABLE}


@pytest.mark.parametrize("who", ["admin", "auditor", "nobody", "api-key-cookie", "bearer"])
@pytest.mark.parametrize("row", TABLE, ids=[f"{r.method} {r.path}" for r in TABLE])
def test_every_principal_on_every_console_route(setup: Setup, row: Row, who: str) -> None:
    cookie = None
    extra: list[tuple[str, str]] = []
    if who in ("admin", "auditor"):
        cookie = setup.session(who)
    elif who == "api-key-cookie":
        cookie = API_KEY  # an API key opens the API, never a browser's pages
    elif who == "bearer":
        extra = [("Authorization", f"Bearer {setup.session('admin')}")]  # the API's way, not ours
    form: dict[str, str] = {}
    if row.path == "/sign-in" and row.method == "POST":
        form = {"username": "admin", "password": f"wrong {next(_fresh)}"}
    elif cookie is not None:
        form = {security.CSRF_FIELD: security.csrf_token(cookie)}
    r = setup.call(row.method, row.call, cookie, form, extra)
    expected = {"admin": row.admin, "auditor": row.auditor}.get(who, row.nobody)
    assert r.status == expected, r.body
    for name, value in security.HEADERS.items():
        assert r.headers.get(name.lower()) == value, name
    if r.status == 303 and expected == row.nobody and who not in ("admin", "auditor"):
        assert r.headers["location"].startswith("/sign-in")
    if r.status >= 400:
        assert "text/html" in r.headers["content-type"]


def test_sign_in_sets_a_strict_cookie_and_refuses_foreign_origins(setup: Setup) -> None:
    n = setup.node
    form = {"username": "admin", "password": ADMIN_PASSWORD, "next": "/alerts"}
    r = setup.call("POST", "/sign-in", None, form)
    assert r.status == 303 and r.headers["location"] == "/alerts"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(security.SESSION_COOKIE + "=")
    for attribute in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"):
        assert attribute in cookie
    token = cookie.split(";")[0].split("=", 1)[1]
    assert setup.call("GET", "/alerts", token).status == 200
    # a sign-in form posted from another site is refused before any password is checked
    body = urlencode(form).encode()
    r = rawhttp.request(
        n.address,
        n.port,
        "POST",
        "/sign-in",
        [("Origin", "https://evil.example"), ("Content-Type", "application/x-www-form-urlencoded")],
        body,
    )
    assert r.status == 403 and "set-cookie" not in r.headers
    # an open redirect after sign-in is not possible
    r = setup.call("POST", "/sign-in", None, {**form, "next": "//evil.example/"})
    assert r.status == 303 and r.headers["location"] == "/manager-nodes"


def test_sign_in_failures_are_limited_like_the_apis(setup: Setup) -> None:
    """The console signs in through the same cluster-wide limit as ``POST /api/sessions``: after
    ``MAX_FAILURES`` wrong passwords for a user name even the right one is refused (429, with
    Retry-After and words saying so), on the console and on the API alike."""
    n = setup.node
    status, body = n.request(
        "POST", "/api/users", {"username": "lou", "password": AUDITOR_PASSWORD, "role": "auditor"}
    )
    assert status == 201, body
    own = next_address()  # a client of its own: the per-address limit spares the other tests

    def sign_in(password: str) -> rawhttp.Response:
        form = urlencode({"username": "lou", "password": password}).encode()
        headers: list[tuple[bytes | str, bytes | str]] = [
            ("Origin", f"https://{n.address}"),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ]
        return rawhttp.request(n.address, n.port, "POST", "/sign-in", headers, form, source=own)

    for _ in range(auth.MAX_FAILURES):
        r = sign_in("not the password")
        assert r.status == 401 and "Wrong user name or password." in r.body
        assert "set-cookie" not in r.headers
    r = sign_in(AUDITOR_PASSWORD)
    assert r.status == 429 and "set-cookie" not in r.headers
    assert "Too many failed sign-ins" in r.body and int(r.headers["retry-after"]) >= 1
    status, body = n.request(
        "POST",
        "/api/sessions",
        {"username": "lou", "password": AUDITOR_PASSWORD},
        headers={"Authorization": None},
    )
    assert status == 429, body


@pytest.mark.parametrize(
    ("what", "headers", "body", "status"),
    [
        ("a JSON body", [("Content-Type", "application/json")], b"{}", 415),
        ("a multipart body", [("Content-Type", "multipart/form-data; boundary=x")], b"--x--", 415),
        ("bytes that are not UTF-8", [], b"csrf_token=%FF%FE\xff", 400),
        ("a field twice", [], b"csrf_token=a&csrf_token=b", 400),
        ("too many fields", [], b"&".join(b"f%d=1" % i for i in range(20)), 400),
        ("a NUL in a field", [], b"csrf_token=%00", 400),
        ("a body over the bound", [], b"csrf_token=" + b"a" * 5000, 413),
    ],
)
def test_malformed_forms_are_4xx(
    setup: Setup, what: str, headers: list[tuple[str, str]], body: bytes, status: int
) -> None:
    n = setup.node
    token = setup.session("admin")
    base = [("Origin", f"https://{n.address}"), ("Cookie", f"{security.SESSION_COOKIE}={token}")]
    if not any(h[0] == "Content-Type" for h in headers):
        base.append(("Content-Type", "application/x-www-form-urlencoded"))
    r = rawhttp.request(
        n.address, n.port, "POST", f"/manager-nodes/{NODE}/decommission", base + headers, body
    )
    assert r.status == status, (what, r.body)


def test_pages_escape_what_they_show(setup: Setup) -> None:
    """A hostile name in the audit log (here: a user name tried at sign-in) is shown as text."""
    hostile = '<script>alert("x")</script>'
    setup.node.request(
        "POST",
        "/api/sessions",
        {"username": hostile, "password": "x"},
        headers={"Authorization": None},
    )
    from tests.support.nodes import query

    query(
        setup.node.database_url,
        "INSERT INTO audit_log (actor, node, action, target, detail, source) "
        "VALUES (%s, %s, 'test', %s, '{}', 'test')",
        (hostile, NODE, hostile),
    )
    r = setup.call("GET", "/audit-log", setup.session("auditor"))
    assert r.status == 200
    assert hostile not in r.body
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in r.body


def test_the_agents_page_escapes_what_agents_report(setup: Setup) -> None:
    """An agent chooses its host name, status message and version: all shown as text."""
    from tests.support.nodes import query

    hostile = '<img src=x onerror="alert(1)">'
    query(
        setup.node.database_url,
        "WITH a AS (INSERT INTO agents (hostname, status, cert_serial, cert_not_after,"
        " activated_on, last_heartbeat, heartbeats, status_message, agent_version,"
        " clock_skew_seconds) VALUES (%s, 'online', 424242, now() + interval '1 day', %s, now(),"
        " 1, %s, %s, 0.2) RETURNING id) "
        "INSERT INTO agent_alerts (type, agent_id, message) SELECT %s, id, %s FROM a",
        (hostile, NODE, hostile, hostile, hostile, hostile),
    )
    r = setup.call("GET", "/agents", setup.session("auditor"))
    assert r.status == 200, r.body
    assert "<img" not in r.body
    # host name (twice: the row and the alert), message, version, alert type (twice), details
    assert r.body.count("&lt;img src=x onerror=&#34;alert(1)&#34;&gt;") >= 7
    assert "0.2 s ahead of the database" in r.body


def test_static_assets_are_revalidated_by_etag(setup: Setup) -> None:
    r = setup.call("GET", "/static/console.js", None)
    assert r.status == 200 and r.headers["content-type"].startswith("text/javascript")
    etag = r.headers["etag"]
    again = setup.call("GET", "/static/console.js", None, extra=[("If-None-Match", etag)])
    assert again.status == 304
    assert setup.call("GET", "/static/..%2Fpages.py", None).status == 404
    expected = hashlib.sha256(pages.asset("console.js").body).hexdigest()[:16]  # type: ignore[union-attr]
    assert etag == f'"{expected}"'

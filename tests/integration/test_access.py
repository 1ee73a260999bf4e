"""Who may do what, for every route and every job type, against a real node: an administrator and
an auditor each by session and by API key, and a caller without credentials.

The expectations are a table written in tests/support/access.py, not derived from the code; a unit
test (tests/unit/test_access_table.py) checks that the table covers every route the node serves,
so a new route cannot arrive without its row.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dsm_node.jobs import builtin  # noqa: F401  (registers the built-in job types)
from dsm_node.jobs.registry import REGISTRY
from tests.support import (
    jobtypes,  # noqa: F401  (registers the test job types)
    rawhttp,
)
from tests.support.access import (
    ADMIN_PASSWORD,
    ADMINS,
    AUDITOR_KEY,
    AUDITOR_PASSWORD,
    AUDITORS,
    PRINCIPALS,
    TABLE,
    Row,
    expected,
)
from tests.support.jobtypes import CREATE_EFFECTS
from tests.support.nodes import API_KEY, Cluster, NodeProcess, query
from tests.support.postgres import Server

pytestmark = pytest.mark.integration

_names = itertools.count()


@dataclass
class Setup:
    node: NodeProcess
    tokens: dict[str, str | None]
    job_id: int

    def headers(self, principal: str) -> dict[str, str | None]:
        token = self.tokens[principal]
        return {"Authorization": f"Bearer {token}" if token else None}

    def fresh_session(self, role: str) -> str:
        user, password = ("admin", ADMIN_PASSWORD) if role == "admin" else ("ann", AUDITOR_PASSWORD)
        status, body = self.node.request(
            "POST", "/api/sessions", {"username": user, "password": password}, headers=NO_AUTH
        )
        assert status == 201, body
        return str(body["token"])


NO_AUTH: dict[str, str | None] = {"Authorization": None}


@pytest.fixture(scope="module")
def setup(
    pg_server: Server, pg_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    url = pg_server.create("access_tests", template=pg_template)
    query(url, CREATE_EFFECTS)
    cluster = Cluster(url, Path(tmp_path_factory.mktemp("access")))
    try:
        node = cluster.start("access-node", DSM_ADMIN_PASSWORD=ADMIN_PASSWORD)
        query(
            url,
            "INSERT INTO api_keys (name, key_hash, role) VALUES ('auditor-key', %s, 'auditor')",
            (hashlib.sha256(AUDITOR_KEY.encode()).digest(),),
        )
        status, body = node.request(
            "POST",
            "/api/users",
            {"username": "ann", "password": AUDITOR_PASSWORD, "role": "auditor"},
        )
        assert status == 201, body
        status, body = node.request("PUT", "/api/settings/secrets/access_secret", {"value": "v"})
        assert status == 200, body
        status, body = node.request("POST", "/api/jobs", {"type": "noop", "delaySeconds": 3600})
        assert status == 201, body
        s = Setup(node, {}, body["ids"][0])
        s.tokens = {
            "admin-session": s.fresh_session("admin"),
            "admin-key": API_KEY,
            "auditor-session": s.fresh_session("auditor"),
            "auditor-key": AUDITOR_KEY,
            "nobody": None,
        }
        yield s
    finally:
        cluster.close()
        pg_server.drop("access_tests")


# Runs first: nothing has enqueued or rotated anything yet.
def test_an_auditor_cannot_rotate_the_master_key_through_the_job_pool(setup: Setup) -> None:
    """The escalation of issue 9: POST /api/jobs {"type": "rotate_master_key"} as an auditor."""
    url = setup.node.database_url
    versions = query(url, "SELECT version, state FROM master_keys ORDER BY version")
    for principal in AUDITORS:
        for job_type in ("rotate_master_key", "prune_job_history"):
            status, _ = setup.node.request(
                "POST", "/api/jobs", {"type": job_type}, headers=setup.headers(principal)
            )
            assert status == 403
        status, _ = setup.node.request(
            "POST",
            "/api/jobs",
            {"jobs": [{"type": "report_for_auditors"}, {"type": "rotate_master_key"}]},
            headers=setup.headers(principal),
        )
        assert status == 403  # one forbidden job refuses the whole batch
    assert query(url, "SELECT count(*) FROM jobs WHERE type = 'rotate_master_key'")[0][0] == 0
    assert query(url, "SELECT version, state FROM master_keys ORDER BY version") == versions
    refusals = query(
        url, "SELECT actor, detail::text FROM audit_log WHERE action = 'enqueue-refused'"
    )
    assert len(refusals) == 6 and {r[0] for r in refusals} == {"ann", "api-key:auditor-key"}


@pytest.mark.parametrize("principal", PRINCIPALS)
@pytest.mark.parametrize("row", TABLE, ids=[f"{r.method} {r.path}" for r in TABLE])
def test_every_principal_on_every_route(setup: Setup, row: Row, principal: str) -> None:
    headers = setup.headers(principal)
    if row.method == "DELETE" and principal.endswith("-session"):
        # signing out ends the session: use one made for this call
        headers = {"Authorization": f"Bearer {setup.fresh_session(principal.split('-')[0])}"}
    body = row.body
    if body == "new-user":
        body = {"username": f"user{next(_names)}", "password": "p" * 12, "role": "auditor"}
    path = row.call.format(job=setup.job_id)
    auth = [("Authorization", v) for v in headers.values() if v is not None]
    data = json.dumps(body).encode() if body is not None else None
    r = rawhttp.request(setup.node.address, setup.node.port, row.method, path, auth, data)
    assert r.status == expected(row, principal), r.body
    if r.status in (401, 403):
        assert r.error, r.body


def job_body(job_type: str) -> dict[str, Any]:
    body: dict[str, Any] = {"type": job_type, "delaySeconds": 3600}  # stored, never run
    if job_type == "sleep":
        body["payload"] = {"seconds": 1}
    return body


def audit_entries(setup: Setup, action: str) -> list[tuple[Any, ...]]:
    return query(
        setup.node.database_url,
        "SELECT actor, detail::text FROM audit_log WHERE action = %s ORDER BY id",
        (action,),
    )


@pytest.mark.parametrize("principal", PRINCIPALS)
@pytest.mark.parametrize("job_type", sorted(REGISTRY.types))
def test_every_principal_and_every_job_type(setup: Setup, job_type: str, principal: str) -> None:
    """The job type's required role decides; refusals and enqueues are both audited."""
    required = REGISTRY.types[job_type].required_role
    url = setup.node.database_url
    refused_before = len(audit_entries(setup, "enqueue-refused"))
    enqueued_before = len(audit_entries(setup, "enqueue-jobs"))
    # Only jobs like the test's own (due in an hour): the node's periodic jobs come and go.
    count_sql = "SELECT count(*) FROM jobs WHERE type = %s AND run_at > now() + interval '30 min'"
    jobs_before = query(url, count_sql, (job_type,))[0][0]
    status, answer = setup.node.request(
        "POST", "/api/jobs", job_body(job_type), headers=setup.headers(principal)
    )
    jobs_after = query(url, count_sql, (job_type,))[0][0]
    if principal == "nobody":
        assert status == 401, answer
        assert jobs_after == jobs_before
    elif principal in ADMINS or required == "auditor":
        assert status in (200, 201), answer
        entries = audit_entries(setup, "enqueue-jobs")
        assert len(entries) == enqueued_before + 1
        assert job_type in entries[-1][1]
    else:
        assert status == 403, answer
        assert job_type in answer["error"] and required in answer["error"]
        assert jobs_after == jobs_before
        entries = audit_entries(setup, "enqueue-refused")
        assert len(entries) == refused_before + 1 and job_type in entries[-1][1]

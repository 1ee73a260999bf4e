"""Every hostile input at every endpoint of a real node: each is refused with a 4xx naming the
problem (never a 5xx), nothing is stored, and nothing is logged as an error.

The catalogue holds the twelve requests that used to end in a 5xx (issue 9), the types that used
to be accepted (``priority: true``, ``"7"``, ``maxAttempts: true``, ``managerPort: true``), and a
generated grid: every JSON field of every request body crossed with values of every JSON type at
its edges (NUL, lone surrogates, deep nesting, wrong types, huge numbers, 1e308 and overflow,
NaN/Infinity literals, negative zero, empty and huge strings), every body-level malformation at
every endpoint that reads a body, and hostile path, query and header values.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import rawhttp
from tests.support.nodes import API_KEY, Cluster, NodeProcess, query
from tests.support.postgres import Server

pytestmark = pytest.mark.integration

AUDITOR_KEY = "hostile-auditor-key-0123456789"

# Values that JSON can carry but json.dumps cannot write: spliced into the body text.
RAW_LITERALS = {
    "NaN": "NaN",
    "Infinity": "Infinity",
    "-Infinity": "-Infinity",
    "1e309": "1e309",
    "-1e309": "-1e309",
    "5000 digits": "9" * 5000,
    "150 digits": "1" * 150,
}


@dataclass(frozen=True)
class Raw:
    """JSON text written as is into the body (literals json.dumps cannot write, and nesting
    too deep for a recursive encoder)."""

    text: str


def deep(levels: int) -> Raw:
    return Raw("[" * levels + "1" + "]" * levels)


# Values of every JSON type at its edges (the grid): name -> value.
EDGE_VALUES: dict[str, Any] = {
    "null": None,
    "true": True,
    "false": False,
    "zero": 0,
    "minus one": -1,
    "negative zero": -0.0,
    "one": 1,
    "half": 0.5,
    "1e308": 1e308,
    "-1e308": -1e308,
    "2**63": 2**63,
    "10**30": 10**30,
    "empty string": "",
    "digit string": "7",
    "decimal string": "0.5",
    "huge string": "x" * 100_000,
    "NUL string": "a\x00b",
    "lone surrogate": "a\ud800b",
    "superscript two": "²",
    "empty array": [],
    "array": [1],
    "empty object": {},
    "object": {"a": 1},
    "nested 40": deep(40),
    **{name: Raw(text) for name, text in RAW_LITERALS.items()},
}


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def clean_str(v: Any, low: int, high: int) -> bool:
    return isinstance(v, str) and low <= len(v) <= high and "\x00" not in v and "\ud800" not in v


# For each body field: which edge values are *valid* there (they are skipped: the grid holds
# only inputs the node must refuse).
FIELD_RULES: dict[tuple[str, str], Any] = {
    ("sessions", "username"): lambda v: clean_str(v, 1, 200),
    ("sessions", "password"): lambda v: clean_str(v, 1, 1000),
    ("jobs", "type"): lambda v: v == "noop",
    ("jobs", "payload"): lambda v: isinstance(v, dict) and v in ({}, {"a": 1}),
    ("jobs", "priority"): lambda v: v is None or (type(v) is int and -32768 <= v <= 32767),
    ("jobs", "runAt"): lambda v: v is None,
    ("jobs", "delaySeconds"): lambda v: is_number(v) and 0 <= v <= 366 * 86400,
    ("jobs", "maxAttempts"): lambda v: v is None or (type(v) is int and 1 <= v <= 1000),
    ("jobs", "timeoutSeconds"): lambda v: v is None or (is_number(v) and 0 < v <= 86400),
    ("jobs", "uniqueKey"): lambda v: v is None or clean_str(v, 1, 500),
    ("settings", "heartbeatIntervalSeconds"): lambda v: is_number(v) and 0.5 <= v <= 60,
    ("settings", "offlineThresholdSeconds"): lambda v: is_number(v) and 30 <= v <= 86400,
    ("settings", "jobHistoryRetentionSeconds"): lambda v: is_number(v) and 60 <= v <= 3650 * 86400,
    ("settings", "jobCountsRetentionSeconds"): lambda v: is_number(v) and 3600 <= v <= 3650 * 86400,
    ("settings", "managerAddress"): lambda v: v is None,
    ("settings", "managerPort"): lambda v: v is None,
    ("settings", "heartbeatAddress"): lambda v: v is None,
    ("settings", "heartbeatPort"): lambda v: v is None,
    ("settings", "relayAddress"): lambda v: v is None,
    ("settings", "relayPort"): lambda v: v is None,
    ("secret", "value"): lambda v: clean_str(v, 0, 65536),
    ("users", "username"): lambda v: (
        isinstance(v, str) and re.fullmatch(r"[a-zA-Z0-9_.@-]{1,100}", v)
    ),
    ("users", "password"): lambda v: clean_str(v, 12, 1000),
    ("users", "role"): lambda v: v in ("administrator", "auditor"),
    ("users", "fullName"): lambda v: v is None or clean_str(v, 0, 500),
    ("users", "email"): lambda v: v is None or clean_str(v, 0, 500),
}

ENDPOINTS = {
    # name: (method, path, credentials, a valid body the grid varies one field of)
    "sessions": ("POST", "/api/sessions", None, {"username": "someone", "password": "x" * 12}),
    "jobs": ("POST", "/api/jobs", "admin", {"type": "noop"}),
    "settings": ("PATCH", "/api/settings", "admin", {}),
    "secret": ("PUT", "/api/settings/secrets/hostile_secret", "admin", {"value": "v"}),
    "users": (
        "POST",
        "/api/users",
        "admin",
        {"username": "hostile-user", "password": "p" * 12, "role": "auditor"},
    ),
}


@dataclass
class Case:
    id: str
    method: str
    target: bytes | str
    credentials: str | None = "admin"
    body: bytes | None = None
    headers: list[tuple[bytes | str, bytes | str]] = field(default_factory=list)
    status: int | None = None  # the exact 4xx expected, when one is
    words: str = ""  # words the error must contain
    send_body: bool = True
    parser_level: bool = False  # refused by the HTTP parser itself (plain-text 400)

    def send(self, node: NodeProcess) -> rawhttp.Response:
        headers = list(self.headers)
        if self.credentials == "admin":
            headers.append(("Authorization", f"Bearer {API_KEY}"))
        return rawhttp.request(
            node.address,
            node.port,
            self.method,
            self.target,
            headers,
            self.body,
            send_body=self.send_body,
        )


def encode(value: Any) -> bytes:
    """JSON text with Raw literals spliced in (strings keep lone surrogates as escapes)."""
    marks: dict[str, str] = {}

    def mark(v: Any) -> Any:
        if isinstance(v, Raw):
            key = f"@@raw{len(marks)}@@"
            marks[f'"{key}"'] = v.text
            return key
        if isinstance(v, dict):
            return {k: mark(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x) for x in v]
        return v

    text = json.dumps(mark(value))
    for k, literal in marks.items():
        text = text.replace(k, literal)
    return text.encode()


BATCHED = ("true", "digit string", "NUL string", "lone surrogate", "1e309")


def grid() -> Iterator[Case]:
    for (endpoint, fieldname), valid in FIELD_RULES.items():
        method, path, creds, base = ENDPOINTS[endpoint]
        for vname, value in EDGE_VALUES.items():
            if not isinstance(value, Raw) and valid(value):
                continue
            body = {**base, fieldname: value}
            yield Case(f"{endpoint}.{fieldname}={vname}", method, path, creds, encode(body))
            if endpoint == "jobs" and vname in BATCHED:  # the same inside a batch
                body = {"jobs": [{"type": "noop"}, {**base, fieldname: value}]}
                yield Case(f"jobs[1].{fieldname}={vname}", method, path, creds, encode(body))


def payload_cases() -> Iterator[Case]:
    """Hostile payloads of a valid job: their strings, keys, numbers, nesting and size."""
    payloads = {
        "NUL in a value": {"a": "x\x00y"},
        "NUL in a key": {"a\x00b": 1},
        "NUL deep inside": {"a": [{"b": ["c", "d\x00"]}]},
        "lone surrogate in a value": {"a": "\udc80"},
        "lone surrogate in a key": {"\ud800": 1},
        "nested 5000": {"a": deep(5000)},
        "nested 40": {"a": deep(40)},
        "NaN": {"a": Raw("NaN")},
        "Infinity": {"a": Raw("Infinity")},
        "1e309": {"a": Raw("1e309")},
        "5000 digits": {"a": Raw("9" * 5000)},
        "over 64 KiB": {"a": "x" * (65 * 1024)},
    }
    for name, payload in payloads.items():
        yield Case(
            f"payload {name}",
            "POST",
            "/api/jobs",
            body=encode({"type": "noop", "payload": payload}),
        )
    yield Case(
        "NUL in uniqueKey",
        "POST",
        "/api/jobs",
        body=encode({"type": "noop", "uniqueKey": "k\x00"}),
    )
    yield Case(
        "sleep payload seconds as a string",
        "POST",
        "/api/jobs",
        body=encode({"type": "sleep", "payload": {"seconds": "5"}}),
    )
    yield Case(
        "sleep payload seconds true",
        "POST",
        "/api/jobs",
        body=encode({"type": "sleep", "payload": {"seconds": True}}),
    )


def body_cases() -> Iterator[Case]:
    """Malformed bodies at every endpoint that reads one."""
    bodies: dict[str, tuple[bytes, int | None]] = {
        "not JSON": (b"{not json", 400),
        "empty": (b"", 400),
        "whitespace": (b"  \n ", 400),
        "array": (b"[1, 2]", 400),
        "string": (b'"text"', 400),
        "number": (b"7", 400),
        "null": (b"null", 400),
        "true": (b"true", 400),
        "NaN": (b"NaN", 400),
        # 400 (nested) where the body fits the endpoint's limit, 413 where it does not
        "nested 100000 arrays": (b"[" * 100_000 + b"]" * 100_000, None),
        "nested 100000 objects": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, None),
        "nested 100000 unclosed": (b"[" * 100_000, None),
        "nested 600 objects": (b'{"a":' * 600 + b"1" + b"}" * 600, 400),
        "nested 33": (deep(33).text.encode(), 400),
        "brackets mismatched deep": (b"[" * 3000 + b"}", 400),
        "not UTF-8": (b'{"a": "\xff\xfe"}', 400),
        "UTF-16": ('{"a": 1}'.encode("utf-16"), 400),
        "UTF-8 BOM": (b'\xef\xbb\xbf{"a": 1}', 400),
        "unterminated string": (b'{"a": "' + b'\\"' * 1000, 400),
        "trailing garbage": (b'{"a": 1} x', 400),
        "duplicate-free but extra field": (b'{"zzz": 1}', 400),
    }
    for endpoint, (method, path, creds, _) in ENDPOINTS.items():
        for name, (body, status) in bodies.items():
            yield Case(f"{endpoint} body {name}", method, path, creds, body, status=status)
        yield Case(
            f"{endpoint} content type text/plain",
            method,
            path,
            creds,
            b"{}",
            [("Content-Type", "text/plain")],
            status=415,
        )
        yield Case(
            f"{endpoint} charset latin-1",
            method,
            path,
            creds,
            b"{}",
            [("Content-Type", "application/json; charset=latin-1")],
            status=415,
        )
        yield Case(
            f"{endpoint} declared 10 MB",
            method,
            path,
            creds,
            b"x" * (10 * 1024 * 1024),
            status=413,
            send_body=False,
        )


def target_cases() -> Iterator[Case]:
    """Hostile path and query values."""
    for raw in [
        "%C2%B2",
        "%C2%B3",
        "%D9%A1",
        "%EF%BC%91",
        "-1",
        "0",
        "+1",
        "1e3",
        "0x10",
        "%20%31",
        "%00",
        "1%00",
        "%ED%A0%80",
        "%FF",
        "9" * 19,
        "99999999999999999999999",
        "1.0",
    ]:
        yield Case(f"job id {raw!r}", "GET", f"/api/jobs/{raw}", status=400)
    for raw in ["%C2%B3", "0", "-1", "1e3", "10001", "%00", "1%00", "%205", "%20", "", "%EF%BC%91"]:
        yield Case(f"audit limit {raw!r}", "GET", f"/api/audit?limit={raw}", status=400)
    for raw in ["%C2%B2", "nan", "inf", "-0", "0", "1e3", "1_000", "%00", "-1", "2678401", "0x10"]:
        yield Case(
            f"stats window {raw!r}", "GET", f"/api/jobs/stats?windowSeconds={raw}", status=400
        )
    for raw in ["maybe", "%00", "%FF", "tru"]:
        yield Case(f"nodes all={raw!r}", "GET", f"/api/nodes?all={raw}", status=400)
        yield Case(f"alerts all={raw!r}", "GET", f"/api/alerts?all={raw}", status=400)
    yield Case("query name with NUL", "GET", "/api/nodes?a%00b=1", status=400)
    # (an undecodable %ED%A0%80 stays as typed: a name nobody has, 404)
    for raw in ["%00", "a%00b", "x" * 300]:
        yield Case(
            f"decommission {raw[:20]!r}", "POST", f"/api/nodes/{raw}/decommission", status=400
        )
    for raw in ["A", "%00", "a" * 64, "a%0A", "a-b", "1a", "%FF"]:
        yield Case(f"secret key {raw[:20]!r}", "GET", f"/api/settings/secrets/{raw}", status=400)


def header_cases() -> Iterator[Case]:
    """Credentials that are not credentials: 401, never a 5xx (no credentials needed)."""
    for name, value in {
        "non-UTF-8": b"Bearer \xff\xfe\xfd",
        "non-UTF-8 scheme": b"\xffearer abc",
        "too long": b"Bearer " + b"a" * 600,
        "basic": b"Basic YWRtaW46cGFzcw==",
        "no token": b"Bearer",
        "two tokens": b"Bearer a b",
        "empty": b"",
    }.items():
        yield Case(
            f"Authorization {name}",
            "GET",
            "/api/nodes",
            credentials=None,
            headers=[("Authorization", value)],
            status=401,
        )
    yield Case(
        "sign-in with non-UTF-8 content type",
        "POST",
        "/api/sessions",
        credentials=None,
        body=b"{}",
        headers=[("Content-Type", b"application/json\xff")],
        status=415,
    )


def parser_cases() -> Iterator[Case]:
    """Bytes HTTP does not allow where they are: aiohttp's parser answers 400 before the
    application sees the request."""
    for target in ["/api/jobs/²", "/api/jobs/\u0661", "/api/audit?limit=³", "/api/jobs/1\x00"]:
        yield Case(f"raw {target!r}", "GET", target.encode(), status=400, parser_level=True)
    yield Case(
        "Authorization with NUL",
        "GET",
        "/api/nodes",
        credentials=None,
        headers=[("Authorization", b"Bearer abc\x00def")],
        status=400,
        parser_level=True,
    )


def issue_cases() -> Iterator[Case]:
    """The twelve 5xx of issue 9 and the strict types it lists, with the exact answers."""
    yield Case(
        "NUL in sign-in user name",
        "POST",
        "/api/sessions",
        None,
        encode({"username": "ad\x00min", "password": "x"}),
        status=400,
        words="NUL",
    )
    yield Case(
        "non-UTF-8 Authorization",
        "GET",
        "/api/nodes",
        None,
        headers=[("Authorization", b"Bearer \xc3\x28\xa0\xa1")],
        status=401,
    )
    yield Case(  # sign-in bodies are small: refused by size before anything parses them
        "sign-in JSON nested 100000",
        "POST",
        "/api/sessions",
        None,
        b"[" * 100_000 + b"]" * 100_000,
        status=413,
    )
    yield Case(  # as deep as fits in a sign-in body: far beyond the recursion limit
        "sign-in JSON nested 2000",
        "POST",
        "/api/sessions",
        None,
        b"[" * 2000 + b"]" * 2000,
        status=400,
        words="nested",
    )
    yield Case(
        "payload nested 5000",
        "POST",
        "/api/jobs",
        body=encode({"type": "noop", "payload": {"a": deep(5000)}}),
        status=400,
        words="nested",
    )
    yield Case(
        "NUL in payload string",
        "POST",
        "/api/jobs",
        body=encode({"type": "noop", "payload": {"a": "\x00"}}),
        status=400,
        words="NUL",
    )
    yield Case(
        "NUL in payload key",
        "POST",
        "/api/jobs",
        body=encode({"type": "noop", "payload": {"\x00": 1}}),
        status=400,
        words="NUL",
    )
    yield Case(
        "NUL in uniqueKey",
        "POST",
        "/api/jobs",
        body=encode({"type": "noop", "uniqueKey": "\x00"}),
        status=400,
        words="NUL",
    )
    yield Case(
        "lone surrogate",
        "POST",
        "/api/jobs",
        body=encode({"type": "noop", "payload": {"a": "\ud83d"}}),
        status=400,
        words="surrogate",
    )
    yield Case("job id ²", "GET", "/api/jobs/%C2%B2", status=400, words="job id")
    yield Case("audit limit ³", "GET", "/api/audit?limit=%C2%B3", status=400, words="limit")
    yield Case(
        "heartbeat interval as a string",
        "PATCH",
        "/api/settings",
        body=b'{"heartbeatIntervalSeconds": "0.5"}',
        status=400,
        words="heartbeatIntervalSeconds",
    )
    yield Case(
        "NUL in managerAddress",
        "PATCH",
        "/api/settings",
        body=encode({"managerAddress": "lb\x00.example.com"}),
        status=400,
        words="managerAddress",
    )
    yield Case(
        "priority true",
        "POST",
        "/api/jobs",
        body=b'{"type": "noop", "priority": true}',
        status=400,
        words="priority",
    )
    yield Case(
        "priority string",
        "POST",
        "/api/jobs",
        body=b'{"type": "noop", "priority": "7"}',
        status=400,
        words="priority",
    )
    yield Case(
        "maxAttempts true",
        "POST",
        "/api/jobs",
        body=b'{"type": "noop", "maxAttempts": true}',
        status=400,
        words="maxAttempts",
    )
    yield Case(
        "managerPort true",
        "PATCH",
        "/api/settings",
        body=b'{"managerAddress": "lb.example.com", "managerPort": true}',
        status=400,
        words="managerPort",
    )
    yield Case(
        "10 MB job payload",
        "POST",
        "/api/jobs",
        body=encode({"type": "noop", "payload": {"a": "x" * (10 * 1024 * 1024)}}),
        status=413,
    )
    yield Case(
        "offline threshold 1e308",
        "PATCH",
        "/api/settings",
        body=b'{"offlineThresholdSeconds": 1e308}',
        status=400,
        words="offlineThresholdSeconds",
    )
    yield Case(
        "heartbeat interval 1e-6",
        "PATCH",
        "/api/settings",
        body=b'{"heartbeatIntervalSeconds": 1e-6}',
        status=400,
        words="heartbeatIntervalSeconds",
    )


# The catalogue by family: each family is its own test (a few hundred requests at most), so no
# test comes near the suite's per-test timeout on a busy machine.
def by_target(cases: list[Case]) -> dict[str, list[Case]]:
    out: dict[str, list[Case]] = {}
    for c in cases:
        out.setdefault(str(c.target), []).append(c)
    return out


FAMILIES = {
    "parser": list(parser_cases()),
    "issue 9": list(issue_cases()),
    **{f"grid {target}": cases for target, cases in by_target(list(grid())).items()},
    "payload": list(payload_cases()),
    "body": list(body_cases()),
    "target": list(target_cases()),
    "header": list(header_cases()),
}
CASES = [c for cases in FAMILIES.values() for c in cases]


@pytest.fixture(scope="module")
def node(
    pg_server: Server, pg_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeProcess]:
    url = pg_server.create("hostile_tests", template=pg_template)
    cluster = Cluster(url, Path(tmp_path_factory.mktemp("hostile")))
    try:
        n = cluster.start("hostile-node")
        query(
            url,
            "INSERT INTO api_keys (name, key_hash, role) VALUES ('auditor-key', %s, 'auditor')",
            (hashlib.sha256(AUDITOR_KEY.encode()).digest(),),
        )
        yield n
    finally:
        cluster.close()
        pg_server.drop("hostile_tests")


def _periodic_job_types() -> list[str]:
    """Every job type the node schedules on its own (the agents' too), read from the registry
    the node fills: they run during the test whatever it sends."""
    from dsm_node import node as _node  # noqa: F401  (registers every built-in job type)
    from dsm_node.jobs.registry import REGISTRY

    return sorted({p.job_type for p in REGISTRY.periodic.values()})


PERIODIC = _periodic_job_types()


def snapshot(url: str) -> dict[str, Any]:
    counts = {
        t: query(url, f"SELECT count(*) FROM {t}")[0][0]
        for t in (
            "users",
            "sessions",
            "api_keys",
            "secret_settings",
            "sign_in_failures",
            "master_keys",
            "audit_log",
            "alerts",
        )
    }
    for t in ("jobs", "job_history"):  # the node's own periodic jobs come and go
        counts[t] = query(
            url, f"SELECT count(*) FROM {t} WHERE type <> ALL(%(p)s)", {"p": PERIODIC}
        )[0][0]
    counts["settings"] = query(url, "SELECT key, value::text FROM settings ORDER BY key")
    return counts


def problem(case: Case, r: rawhttp.Response) -> str | None:
    """What is wrong with the node's answer to a hostile case, or None."""
    if not 400 <= r.status < 500:
        return f"status {r.status}: {r.body!r:.200}"
    if case.status is not None and r.status != case.status:
        return f"status {r.status}, expected {case.status}: {r.body!r:.200}"
    if case.parser_level:
        return None
    if not isinstance(r.body, dict) or not r.error:
        return f"no JSON error: {r.body!r:.200}"
    if case.words.lower() not in r.error.lower():
        return f"error does not say {case.words!r}: {r.error:.200}"
    return None


ISSUE_CASES = list(issue_cases())


@pytest.mark.parametrize("case", ISSUE_CASES, ids=[c.id for c in ISSUE_CASES])
def test_the_requests_of_issue_9_get_a_4xx_naming_the_problem(
    node: NodeProcess, case: Case
) -> None:
    assert problem(case, case.send(node)) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_every_hostile_input_gets_a_4xx_stores_nothing_and_logs_no_error(
    node: NodeProcess, family: str
) -> None:
    """All cases of a family (all families: over a thousand cases), eight at a time; every wrong
    answer is reported."""
    cases = FAMILIES[family]
    before = snapshot(node.database_url)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: (c, problem(c, c.send(node))), cases))
    wrong = [f"{c.id}: {p}" for c, p in answers if p is not None]
    assert not wrong, f"{len(wrong)} of {len(cases)} wrong:\n" + "\n".join(wrong[:60])
    assert snapshot(node.database_url) == before
    log = node.log_text()
    assert "Traceback" not in log and " ERROR " not in log, node.log_tail(40)
    if family == "issue 9":  # early in the run: within the log's per-minute budget
        # a malformed request is one line in the log, naming the request and the problem
        assert any(
            "POST /api/jobs from" in line and "400" in line and "NUL" in line
            for line in log.splitlines()
        )


def test_the_node_still_serves_after_the_barrage(node: NodeProcess) -> None:
    status, body = node.request("POST", "/api/jobs", {"type": "noop", "priority": 7})
    assert status == 201, body
    assert node.request("GET", "/readyz")[0] == 200

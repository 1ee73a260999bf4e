"""Malformed and hostile heartbeats and activations on the heartbeat port of a real node: each
gets a clear 4xx or a refused handshake, stores nothing, and the node keeps serving others.

The catalogue (issue 11): no certificate, another CA's certificate, a revoked or expired
certificate, a certificate of the agent CA that names no agent, a used-up, expired, revoked or
forged token, sequence numbers going backwards, repeating or jumping, an oversized batch, a clock
years off, unknown fields, a non-JSON body, and the HTTP-level mistakes of the strict parser.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import text

from dsm_node import crypto, keys
from dsm_node.agents import agent as agent_mod
from dsm_node.agents import pki
from dsm_node.db.engine import create_engine
from tests.support.agents import (
    AgentCerts,
    agent_settings,
    heartbeat_port,
    post,
    raw_request,
    start_node,
    token,
    wait_serving,
)
from tests.support.nodes import LOCAL_SECRET, Cluster, NodeProcess, query

pytestmark = pytest.mark.integration

HB = "/agent/v1/heartbeat"
ACT = "/agent/v1/activate"


def _authority(url: str) -> pki.Authority:
    async def go() -> pki.Authority:
        engine = create_engine(url, pool_size=1)
        try:
            async with engine.connect() as conn:
                ring = await keys.unlock(conn, crypto.LocalSecretWrapper(LOCAL_SECRET.encode()))
                row = (await conn.execute(text("SELECT * FROM agent_ca"))).one()
        finally:
            await engine.dispose()
        assert ring is not None
        return pki.load_authority(
            row.certificate, ring.decrypt(row.private_key, keys.AGENT_CA_KEY_CONTEXT)
        )

    return asyncio.run(go())


def _activate(node: NodeProcess, hostname: str) -> agent_mod.Identity:
    tok, pin = token(node)
    ident, _ = asyncio.run(
        agent_mod.activate([(node.address, heartbeat_port(node))], tok, pin, hostname)
    )
    return ident


def _snapshot(url: str) -> tuple[Any, ...]:
    return tuple(
        query(url, sql)[0]
        for sql in (
            "SELECT count(*) FROM agents",
            "SELECT count(*) FROM agent_events",
            "SELECT coalesce(sum(heartbeats), 0), coalesce(sum(acked_seq), 0) FROM agents",
            "SELECT coalesce(sum(uses), 0) FROM activation_tokens",
            "SELECT count(*) FROM agent_alerts",
            "SELECT string_agg(status, ',' ORDER BY id) FROM agents",
        )
    )


def _heartbeat(agent_id: int, seq0: int = 1, n: int = 1, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "protocol": 1,
        "agentId": agent_id,
        "status": "ok",
        "clock": time.time(),
        "events": [
            {"seq": seq0 + i, "at": time.time(), "type": "test.event", "data": {"i": i}}
            for i in range(n)
        ],
    }
    doc.update(over)
    return doc


def test_hostile_heartbeats_and_activations_are_refused_and_store_nothing(
    dsm_cluster: Cluster, tmp_path: Path
) -> None:
    url = dsm_cluster.database_url
    # a long interval: the watch job must not turn the agents Offline while the catalogue runs
    agent_settings(url, interval=600.0)
    node = start_node(dsm_cluster, "a")
    wait_serving(node)
    port = heartbeat_port(node)
    good = _activate(node, "good")
    revoked = _activate(node, "revoked")
    status, _ = node.request("POST", f"/api/agents/{revoked.agent_id}/deactivate")
    assert status == 200
    files = AgentCerts(tmp_path / "certs")
    files.directory.mkdir()
    ca = _authority(url)
    good_cert = (files.write("good.crt", good.certificate), files.write("good.key", good.key))
    revoked_cert = (
        files.write("revoked.crt", revoked.certificate),
        files.write("revoked.key", revoked.key),
    )
    # an expired certificate of the right CA, and one of the right CA naming no agent
    key = pki.new_key()
    expired = pki.agent_certificate(
        ca,
        good.agent_id,
        key.public_key(),
        pki.new_serial(),
        days=1,
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=30),
    )
    expired_cert = (
        files.write("expired.crt", pki.pem(expired)),
        files.write("k1", pki.key_pem(key)),
    )
    nameless = pki._leaf(
        ca,
        pki.x509.Name([pki.x509.NameAttribute(pki.NameOID.COMMON_NAME, "mallory")]),
        key.public_key(),
        pki.new_serial(),
        30,
        pki.ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    nameless_cert = (
        files.write("nameless.crt", pki.pem(nameless)),
        files.write("k2", pki.key_pem(key)),
    )
    # a certificate from another CA, for the same agent id
    other = pki.new_authority("other")
    stranger = pki.agent_certificate(other, good.agent_id, key.public_key(), pki.new_serial())
    stranger_cert = (
        files.write("stranger.crt", pki.pem(stranger)),
        files.write("k3", pki.key_pem(key)),
    )
    # one accepted heartbeat first: acked = 1
    status, body = raw_request(
        node.address,
        port,
        post(HB, json.dumps(_heartbeat(good.agent_id)).encode()),
        good.ca,
        good_cert,
    )
    assert status == 200 and body["ackedSequence"] == 1, body  # type: ignore[index]
    # tokens in every refusable state
    used_tok, _ = token(node)
    ident_key = pki.new_key()
    csr = pki.csr_for(ident_key, "x")
    status, _ = raw_request(
        node.address,
        port,
        post(
            ACT,
            json.dumps({"protocol": 1, "token": used_tok, "hostname": "x", "csr": csr}).encode(),
        ),
        good.ca,
    )
    assert status == 201
    expired_tok, _ = token(node)
    query(
        url,
        "UPDATE activation_tokens SET expires_at = now() - interval '1 s' WHERE id = %s",
        (int(expired_tok.split(".")[1]),),
    )
    revoked_tok, _ = token(node)
    assert node.request("DELETE", f"/api/agents/tokens/{revoked_tok.split('.')[1]}")[0] == 200
    live_tok, _ = token(node)
    forged_tok = ".".join([*live_tok.split(".")[:2], "not-the-secret"])
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_csr = (
        pki.x509.CertificateSigningRequestBuilder()
        .subject_name(pki.x509.Name([pki.x509.NameAttribute(pki.NameOID.COMMON_NAME, "r")]))
        .sign(rsa_key, pki.hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )

    def act(**over: Any) -> bytes:
        doc = {"protocol": 1, "token": live_tok, "hostname": "h", "csr": csr, **over}
        return post(ACT, json.dumps(doc).encode())

    def hb(**over: Any) -> bytes:
        return post(HB, json.dumps(_heartbeat(good.agent_id, 2, 1, **over)).encode())

    def hb_events(events: list[dict[str, Any]]) -> bytes:
        return post(HB, json.dumps(_heartbeat(good.agent_id, events=events)).encode())

    def ev(seq: int, **over: Any) -> dict[str, Any]:
        return {"seq": seq, "at": time.time(), "type": "t", "data": {}, **over}

    G, R, E, N, S = good_cert, revoked_cert, expired_cert, nameless_cert, stranger_cert
    HANDSHAKE = -1
    cases: list[tuple[str, bytes, tuple[Path, Path] | None, int]] = [
        ("heartbeat without a certificate", hb(), None, 401),
        ("another CA's certificate", hb(), S, HANDSHAKE),
        (
            "a revoked certificate",
            post(HB, json.dumps(_heartbeat(revoked.agent_id)).encode()),
            R,
            403,
        ),
        ("an expired certificate", hb(), E, HANDSHAKE),
        ("the agent CA's certificate naming no agent", hb(), N, 401),
        (
            "agentId not the certificate's",
            post(HB, json.dumps(_heartbeat(revoked.agent_id)).encode()),
            G,
            403,
        ),
        ("sequence going backwards", hb_events([ev(3), ev(2)]), G, 400),
        ("sequence repeating", hb_events([ev(2), ev(2)]), G, 400),
        ("sequence jumping past the acknowledgement", hb_events([ev(9), ev(10)]), G, 409),
        ("sequence zero", hb_events([ev(0)]), G, 400),
        ("sequence beyond 2^63-1", hb_events([ev(2**63)]), G, 400),
        ("1,001 events", hb_events([ev(2 + i) for i in range(1001)]), G, 400),
        ("a body over 1 MiB", post(HB, b"{" + b" " * (1024 * 1024 + 1) + b"}"), G, 413),
        ("a clock five years ahead", hb(clock=time.time() + 5 * 366 * 86400), G, 400),
        ("a negative clock", hb(clock=-1.0), G, 400),
        (
            "a NaN clock",
            post(
                HB,
                json.dumps(_heartbeat(good.agent_id))
                .replace('"clock": ', '"clock": NaN, "x": ')
                .encode(),
            ),
            G,
            400,
        ),
        ("an unknown field", hb(extra=1), G, 400),
        ("an unknown field in an event", hb_events([ev(2, color="red")]), G, 400),
        ("a non-JSON body", post(HB, b"hello, manager"), G, 400),
        ("a JSON array", post(HB, b"[1, 2]"), G, 400),
        ("truncated JSON", post(HB, json.dumps(_heartbeat(good.agent_id)).encode()[:-5]), G, 400),
        ("deeply nested JSON", post(HB, b"[" * 5000 + b"]" * 5000), G, 400),
        ("protocol version 2", hb(protocol=2), G, 400),
        ("a status outside the list", hb(status="fine"), G, 400),
        ("NUL in statusMessage", hb(statusMessage="a\x00b"), G, 400),
        ("NUL in an event's data", hb_events([ev(2, data={"k": "a\x00b"})]), G, 400),
        ("an event type with spaces", hb_events([ev(2, type="Drop Table")]), G, 400),
        ("nested event data", hb_events([ev(2, data={"k": {"nested": 1}})]), G, 400),
        ("33 counters", hb(counters={f"c{i}": 1 for i in range(33)}), G, 400),
        ("a negative counter", hb(counters={"c": -1}), G, 400),
        ("agentId as a string", hb(agentId=str(good.agent_id)), G, 400),
        ("text/plain", post(HB, b"{}", "text/plain"), G, 415),
        ("no Content-Length", b"POST " + HB.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n{}", G, 411),
        (
            "chunked",
            b"POST " + HB.encode() + b" HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            G,
            411,
        ),
        ("GET on the heartbeat path", b"GET " + HB.encode() + b" HTTP/1.1\r\n\r\n", G, 405),
        ("an API path on the heartbeat port", b"GET /api/nodes HTTP/1.1\r\n\r\n", G, 404),
        ("a malformed request line", b"HELLO\r\n\r\n", G, 400),
        (
            "a 9 KiB request head",
            b"GET /agent/v1/ca HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
            G,
            431,
        ),
        ("activation with a used-up token", act(token=used_tok), None, 403),
        ("activation with an expired token", act(token=expired_tok), None, 403),
        ("activation with a revoked token", act(token=revoked_tok), None, 403),
        ("activation with a forged token", act(token=forged_tok), None, 403),
        ("activation with a garbage token", act(token="hello"), None, 403),
        ("activation with a CSR that is not PEM", act(csr="not a csr"), None, 400),
        ("activation with an RSA key", act(csr=rsa_csr), None, 400),
        ("activation with a hostname holding a space", act(hostname="a b"), None, 400),
        ("activation with an unknown field", act(role="admin"), None, 400),
        ("activation over 16 KiB", act(hostname="h", csr="x" * 20000), None, 413),
    ]
    before = _snapshot(url)
    wrong: list[str] = []
    for name, data, cert, expected in cases:
        try:
            status, body = raw_request(node.address, port, data, good.ca, cert)
        except (ssl.SSLError, ConnectionError, OSError) as e:
            if expected != HANDSHAKE:
                wrong.append(f"{name}: expected {expected}, the connection failed: {e}")
            continue
        if status != expected:
            wrong.append(f"{name}: expected {expected}, got {status} {body}")
        elif not isinstance(body, dict) or not body.get("error"):
            wrong.append(f"{name}: no error message in {body!r}")
    assert not wrong, "\n".join(wrong)
    assert len(cases) >= 30
    assert _snapshot(url) == before, "a refused request stored something"
    # the API port has no agent route either: outside /api/ the console answers, and it refuses a
    # POST that no console page sent (403) before it would look the path up (404)
    status, body = node.request("POST", HB, {"protocol": 1}, headers={"Authorization": None})
    assert status in (401, 403, 404) and "ackedSequence" not in str(body)
    assert _snapshot(url) == before, "the API port stored an agent's heartbeat"
    # and the node keeps serving: the good agent's next heartbeat is accepted
    status, body = raw_request(
        node.address,
        port,
        post(HB, json.dumps(_heartbeat(good.agent_id, 2, 2)).encode()),
        good.ca,
        good_cert,
    )
    assert status == 200 and body["ackedSequence"] == 3, body  # type: ignore[index]
    assert "Traceback" not in node.log_text()
    assert query(
        url, "SELECT seq FROM agent_events WHERE agent_id = %s ORDER BY seq", (good.agent_id,)
    ) == [(1,), (2,), (3,)]

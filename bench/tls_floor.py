"""What TLS alone costs the heartbeat port: mutual-TLS handshakes with the agent CA's certificates
(ECDSA P-256, TLS 1.3, X25519), both ends in this one process over memory buffers, no network,
no event loop, no HTTP, no database. Times the server's side of each handshake (its
``do_handshake`` calls, in CPU time of this thread), full handshakes and resumed ones (a session
ticket offered), so the agent benchmark's node CPU per heartbeat can be compared with the floor
set by OpenSSL (docs/benchmarks.md, "What limits the figure").

    .venv/bin/python -m bench.tls_floor [--handshakes 2000] [--runs 5] [--tickets 1,2]

``--tickets`` compares how many TLS 1.3 session tickets the server issues per handshake (the
node's setting first); runs alternate between the values so the machine's noise falls on all.
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from dsm_node.agents import pki
from dsm_node.agents.agent import trust_ca
from dsm_node.agents.channel import server_context


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> None:
    data = src.read()
    if data:
        dst.write(data)


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[float, ssl.SSLSession | None, bool]:
    """One handshake; returns the server's seconds in it, the client's session, and whether it
    was resumed."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, session=session)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    spent = 0.0
    client_done = server_done = False
    while not (client_done and server_done):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        _pump(c_out, s_in)
        if not server_done:
            t = time.thread_time()
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            spent += time.thread_time() - t
        _pump(s_out, c_in)
    # TLS 1.3 tickets arrive after the handshake: the client reads them with the first data
    client.write(b"x")
    _pump(c_out, s_in)
    t = time.thread_time()
    server.read(1)
    server.write(b"y")
    spent += time.thread_time() - t
    _pump(s_out, c_in)
    client.read(1)
    return spent, client.session, client.session_reused


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--handshakes", type=int, default=2000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tickets", default="", help="e.g. 1,2: tickets per handshake to compare")
    args = p.parse_args()
    ca = pki.new_authority()
    chain, key = pki.node_certificate(ca, "n0", ["127.0.0.1"])
    default = server_context(ca, chain, key).num_tickets
    servers: dict[str, ssl.SSLContext] = {}
    for n in [int(x) for x in args.tickets.split(",") if x] or [default]:
        ctx = server_context(ca, chain, key)
        ctx.num_tickets = n
        servers[f"{n} tickets" + (" (the node's)" if n == default else "")] = ctx
    agent_key = pki.new_key()
    cert = pki.agent_certificate(ca, 1, agent_key.public_key(), pki.new_serial())
    with tempfile.TemporaryDirectory() as d:
        cert_file, key_file = Path(d) / "a.crt", Path(d) / "a.key"
        cert_file.write_text(pki.pem(cert))
        key_file.write_bytes(
            agent_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        client_ctx = trust_ca(ca.certificate_pem, cert_file, key_file)
    print(ssl.OPENSSL_VERSION)
    for mode in ("full", "resumed"):
        per: dict[str, list[float]] = {label: [] for label in servers}
        reused = dict.fromkeys(servers, 0)
        for _ in range(args.runs):
            for label, server_ctx in servers.items():
                session = None
                total = 0.0
                reused[label] = 0
                for _ in range(args.handshakes):
                    spent, got, was_reused = handshake(
                        server_ctx, client_ctx, session if mode == "resumed" else None
                    )
                    total += spent
                    reused[label] += was_reused
                    session = got
                per[label].append(1e6 * total / args.handshakes)
        for label, xs in per.items():
            print(
                f"{mode:8} {label:22} server side: median {statistics.median(xs):.0f} us per "
                f"handshake (runs {min(xs):.0f}-{max(xs):.0f} us; resumed {reused[label]}/"
                f"{args.handshakes} in the last run)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

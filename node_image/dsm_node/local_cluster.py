"""``dsm up``: a local multi-node cluster, one process per node on 127.0.0.x, on an embedded
PostgreSQL when no database URL is given. Nodes start one at a time (the original product warns
against launching two at once), each only after the previous one is ready."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from dsm_node import client
from dsm_node.api import tls


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.nodes <= 50:
        print("error: --nodes must be between 1 and 50", file=sys.stderr)
        return 2
    state = client.state_dir()
    state.mkdir(parents=True, exist_ok=True)
    pg = None
    url = args.database_url
    if not url:
        from dsm_node.embedded_pg import EmbeddedPostgres, PostgresNotFound

        try:
            pg = EmbeddedPostgres(state / "pg")
            print(f"==> starting embedded PostgreSQL in {pg.datadir}")
            pg.start()
        except PostgresNotFound as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        _create_database(pg.admin_url, "dsm")
        url = pg.url("dsm")
    addresses = [f"127.0.0.{i + 1}" for i in range(args.nodes)]
    cert, key = tls.write_pair(*tls.self_signed(["localhost", *addresses]), state / "tls")
    (state / "logs").mkdir(exist_ok=True)
    secrets_dir = state / "secrets"
    local_secret = _secret_file(secrets_dir / "local-secret")
    api_key = _secret_file(secrets_dir / "api-key")
    admin_password = _secret_file(secrets_dir / "admin-password")
    client.context_file().write_text(
        json.dumps(
            {
                "server": f"https://127.0.0.1:{args.port}",
                "caFile": str(cert),
                "apiKey": api_key.read_text().strip(),
            }
        )
    )
    print(
        f"==> sign in as 'admin' with the password in {admin_password}; the dsm command uses "
        f"the API key in {api_key}"
    )
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    interrupted = False

    def on_signal(*_: Any) -> None:
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        for i, addr in enumerate(addresses, 1):
            name = f"node-{i}"
            env = {
                **os.environ,
                "DSM_DATABASE_URL": url,
                "DSM_NODE_NAME": name,
                "DSM_BIND_ADDRESS": addr,
                "DSM_API_PORT": str(args.port),
                "DSM_HEARTBEAT_PORT": str(args.port + 1),
                "DSM_TLS_CERT_FILE": str(cert),
                "DSM_TLS_KEY_FILE": str(key),
                "DSM_LOCAL_SECRET_FILE": str(local_secret),
                "DSM_BOOTSTRAP_API_KEY_FILE": str(api_key),
                "DSM_ADMIN_PASSWORD_FILE": str(admin_password),
            }
            if args.offline_threshold:
                env["DSM_OFFLINE_THRESHOLD_SECONDS"] = str(args.offline_threshold)
            if args.heartbeat_interval:
                env["DSM_HEARTBEAT_INTERVAL_SECONDS"] = str(args.heartbeat_interval)
            log = open(state / "logs" / f"{name}.log", "ab")  # noqa: SIM115 (lives with the child)
            print(f"==> starting {name} on https://{addr}:{args.port} (log: {log.name})")
            proc = subprocess.Popen(
                [sys.executable, "-m", "dsm_node", "node", "run"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            procs.append((name, proc))
            if not _wait_ready(addr, args.port, cert, proc, timeout=120):
                print(f"error: {name} did not become ready; see {log.name}", file=sys.stderr)
                return 1
        print(
            f"==> {len(procs)} nodes online. Try: dsm nodes list | dsm jobs submit noop --count 100"
            " | dsm jobs stats.  Ctrl-C stops the cluster."
        )
        last = ""
        exited: set[str] = set()
        while not interrupted:
            table = _status_table(url)
            # redraw on every change when watching a terminal, else only when a status changes
            shown = table if sys.stdout.isatty() and not args.no_watch else _without_ages(table)
            if shown != last:
                if sys.stdout.isatty() and not args.no_watch:
                    print("\033[2J\033[H", end="")
                stamp = time.strftime("%H:%M:%S")
                print(f"[{stamp}] cluster status (Ctrl-C to stop)\n{table}\n", flush=True)
                last = shown
            for name, proc in procs:
                if proc.poll() is not None and name not in exited:
                    exited.add(name)
                    print(f"warning: {name} exited with {proc.returncode}", file=sys.stderr)
            time.sleep(2)
    except KeyboardInterrupt:
        pass
    finally:
        print("\n==> stopping nodes")
        for _, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            print(f"    {name} stopped ({proc.returncode})")
        if pg is not None:
            print("==> stopping PostgreSQL")
            pg.stop()
    return 0


def _secret_file(path: Path) -> Path:
    """A random secret kept across runs (the cluster's data is encrypted with it)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(24) + "\n")
    return path


def _create_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')


def _wait_ready(
    addr: str, port: int, cert: Path, proc: subprocess.Popen[bytes], timeout: float
) -> bool:
    ctx = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"https://{addr}:{port}/readyz", context=ctx, timeout=2):
                return True
        except Exception:
            time.sleep(0.3)
    return False


def _without_ages(table: str) -> str:
    return "\n".join(line.rstrip().rsplit("  ", 1)[0] for line in table.splitlines())


def _status_table(url: str) -> str:
    from dsm_node.cli import format_nodes
    from dsm_node.cluster.membership import Membership
    from dsm_node.db.engine import create_engine
    from dsm_node.settings_store import read

    async def go() -> list[dict[str, Any]]:
        engine = create_engine(url, pool_size=1)
        try:
            s = await read(engine)
            return await Membership(engine).list_nodes(s.offline_threshold_seconds)
        finally:
            await engine.dispose()

    try:
        return format_nodes(asyncio.run(go()))
    except Exception as e:
        return f"(database unreachable: {str(e).splitlines()[0]})"

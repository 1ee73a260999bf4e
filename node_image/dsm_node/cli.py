"""The ``dsm`` command.

    dsm up                      a local multi-node cluster on an embedded PostgreSQL
    dsm node run                one node (the pod entrypoint)
    dsm nodes list              node statuses
    dsm jobs submit TYPE        enqueue a job
    dsm jobs get ID             one job
    dsm jobs stats              jobs by node and by type over a window
    dsm nodes decommission NAME remove an Offline node
    dsm master-key rotate       re-encrypt secrets under a new master key
    dsm alerts                  open alerts
    dsm db upgrade              create or migrate the schema

Every command that prints takes ``--output json`` for scripts. Errors go to stderr with a non-zero
exit: 2 for bad input or a node that cannot join, 1 for a server or network failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from pydantic import ValidationError

from dsm_node import __version__


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsm", description="Multi-node security manager")
    p.add_argument("--version", action="version", version=f"dsm {__version__}")
    sub = p.add_subparsers(metavar="COMMAND")

    up = sub.add_parser("up", help="run a local multi-node cluster (Ctrl-C stops it)")
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument(
        "--database-url",
        default=os.environ.get("DSM_DATABASE_URL"),
        help="shared database; an embedded PostgreSQL when absent",
    )
    up.add_argument("--port", type=int, default=4119, help="API port of every node")
    up.add_argument(
        "--offline-threshold",
        type=float,
        default=None,
        help="seconds of silence before a node is Offline (default 180)",
    )
    up.add_argument(
        "--heartbeat-interval",
        type=float,
        default=None,
        help="seconds between heartbeats (default 10)",
    )
    up.add_argument("--no-watch", action="store_true", help="print status once per change only")
    up.set_defaults(func=_up)

    node = sub.add_parser("node", help="run a node").add_subparsers(metavar="COMMAND")
    run = node.add_parser("run", help="run one manager node (configuration: flags or DSM_* env)")
    for flag, help_ in (
        ("--database-url", "shared database URL (DSM_DATABASE_URL)"),
        ("--node-name", "unique node name (DSM_NODE_NAME)"),
        ("--bind-address", "listen address (DSM_BIND_ADDRESS)"),
        ("--advertise-address", "address peers and agents use (DSM_ADVERTISE_ADDRESS)"),
        ("--api-port", "HTTPS API port (DSM_API_PORT)"),
        ("--heartbeat-port", "agent heartbeat port, 0 disables (DSM_HEARTBEAT_PORT)"),
        ("--software-version", "version this node runs (DSM_SOFTWARE_VERSION)"),
        ("--tls-cert-file", "PEM certificate (DSM_TLS_CERT_FILE)"),
        ("--tls-key-file", "PEM key (DSM_TLS_KEY_FILE)"),
        (
            "--offline-threshold-seconds",
            "seeds the cluster setting (DSM_OFFLINE_THRESHOLD_SECONDS)",
        ),
        ("--heartbeat-interval-seconds", "seeds the cluster setting"),
        ("--concurrency", "jobs run at once (DSM_CONCURRENCY)"),
        ("--claim-batch", "jobs claimed per statement (DSM_CLAIM_BATCH)"),
        ("--shutdown-grace-seconds", "grace for running jobs on SIGTERM"),
        ("--extra-migrations-dir", "test-only extra migrations"),
        ("--local-secret-file", "file with the local secret (DSM_LOCAL_SECRET_FILE)"),
        ("--admin-password-file", "first administrator's password (DSM_ADMIN_PASSWORD_FILE)"),
        ("--bootstrap-api-key-file", "administrator API key (DSM_BOOTSTRAP_API_KEY_FILE)"),
    ):
        run.add_argument(flag, help=help_)
    run.add_argument("--log-level", default=os.environ.get("DSM_LOG_LEVEL", "INFO"))
    run.set_defaults(func=_node_run)

    db = sub.add_parser("db", help="database").add_subparsers(metavar="COMMAND")
    upg = db.add_parser("upgrade", help="create or migrate the schema, then exit")
    upg.add_argument("--database-url", default=os.environ.get("DSM_DATABASE_URL"))
    upg.add_argument("--software-version", default=__version__)
    upg.add_argument("--output", choices=["text", "json"], default="text")
    upg.set_defaults(func=_db_upgrade)

    nodes = sub.add_parser("nodes", help="manager nodes").add_subparsers(metavar="COMMAND")
    ls = nodes.add_parser("list", help="nodes with status, version and last heartbeat")
    _client_flags(ls)
    ls.set_defaults(func=_nodes_list)

    dec = nodes.add_parser("decommission", help="remove an Offline node from the cluster")
    dec.add_argument("name")
    _client_flags(dec)
    dec.set_defaults(func=_nodes_decommission)

    mk = sub.add_parser("master-key", help="the master key").add_subparsers(metavar="COMMAND")
    rot = mk.add_parser("rotate", help="rotate the master key (a resumable background job)")
    _client_flags(rot)
    rot.set_defaults(func=_master_key_rotate)

    al = sub.add_parser("alerts", help="open alerts (e.g. Manager Time Out of Sync)")
    _client_flags(al)
    al.set_defaults(func=_alerts)

    jobs = sub.add_parser("jobs", help="the job pool").add_subparsers(metavar="COMMAND")
    submit = jobs.add_parser("submit", help="enqueue a job")
    submit.add_argument("type", help="job type, e.g. noop, clear_caches, sleep")
    submit.add_argument("--payload", default="{}", help="JSON object")
    submit.add_argument("--priority", type=int)
    submit.add_argument("--delay", type=float, default=0.0, help="seconds before it may run")
    submit.add_argument("--max-attempts", type=int)
    submit.add_argument("--timeout", type=float, help="seconds per attempt")
    submit.add_argument("--unique-key", help="a second submit with this key is a no-op")
    submit.add_argument("--count", type=int, default=1, help="submit this many copies at once")
    _client_flags(submit)
    submit.set_defaults(func=_jobs_submit)
    get = jobs.add_parser("get", help="one job")
    get.add_argument("id")
    _client_flags(get)
    get.set_defaults(func=_jobs_get)
    stats = jobs.add_parser("stats", help="jobs by node and type over a window")
    stats.add_argument("--window", type=float, default=3600.0, help="seconds (default 3600)")
    _client_flags(stats)
    stats.set_defaults(func=_jobs_stats)
    return p


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="https://HOST:PORT of any node (DSM_SERVER)")
    p.add_argument("--ca-file", help="CA bundle for the node certificate (DSM_CA_FILE)")
    p.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    p.add_argument("--output", choices=["text", "json"], default="text")


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


# -- node and database ---------------------------------------------------------------------


def _node_run(args: argparse.Namespace) -> int:
    from dsm_node import logs, server
    from dsm_node.config import NodeConfig

    flags = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k not in ("func", "log_level") and k in NodeConfig.model_fields
    }
    try:
        config = NodeConfig(**flags)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()
        )
        return _fail(f"invalid node configuration: {problems}")
    logs.setup(config.node_name, args.log_level)
    return asyncio.run(server.serve(config))


def _db_upgrade(args: argparse.Namespace) -> int:
    from dsm_node.db import migrating
    from dsm_node.db.engine import create_engine

    if not args.database_url:
        return _fail("--database-url (or DSM_DATABASE_URL) is required")

    async def go() -> migrating.SchemaState:
        engine = create_engine(args.database_url, pool_size=1)
        try:
            return await migrating.ensure_schema(engine, args.software_version)
        finally:
            await engine.dispose()

    try:
        state = asyncio.run(go())
    except migrating.SchemaTooNew as e:
        return _fail(str(e))
    except Exception as e:
        return _fail(f"cannot upgrade the database: {str(e).splitlines()[0]}", 1)
    if args.output == "json":
        print(json.dumps({"schemaVersion": state.schema_version, "applied": list(state.applied)}))
    else:
        applied = ", ".join(map(str, state.applied)) or "none"
        print(f"schema version {state.schema_version} (migrations applied now: {applied})")
    return 0


# -- API commands --------------------------------------------------------------------------


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    from dsm_node.client import Client

    return Client.from_args(args.server, args.ca_file, args.insecure).request(method, path, body)


def _api(fn: Any) -> Any:
    """Turns API errors into one readable line and an exit code (2: our input, 1: elsewhere)."""

    def wrapped(args: argparse.Namespace) -> int:
        from dsm_node.client import ApiError

        try:
            return int(fn(args))
        except ApiError as e:
            return _fail(str(e), 2 if 400 <= e.status < 500 else 1)

    return wrapped


@_api
def _nodes_list(args: argparse.Namespace) -> int:
    nodes = _call(args, "GET", "/api/nodes")["nodes"]
    if args.output == "json":
        print(json.dumps(nodes, indent=2))
        return 0
    print(format_nodes(nodes))
    return 0


def format_nodes(nodes: list[dict[str, Any]]) -> str:
    rows = [("NAME", "ADDRESS", "VERSION", "STATUS", "LAST HEARTBEAT")]
    for n in nodes:
        rows.append(
            (
                n["name"],
                f"{n['address']}:{n['apiPort']}",
                n["version"],
                n["status"],
                f"{n['secondsSinceHeartbeat']:.0f}s ago",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


@_api
def _nodes_decommission(args: argparse.Namespace) -> int:
    result = _call(args, "POST", f"/api/nodes/{args.name}/decommission")
    print(json.dumps(result) if args.output == "json" else f"{args.name}: decommissioned")
    return 0


@_api
def _master_key_rotate(args: argparse.Namespace) -> int:
    result = _call(args, "POST", "/api/master-key/rotate")
    if args.output == "json":
        print(json.dumps(result))
    elif result["alreadyRunning"]:
        print("a rotation is already under way")
    else:
        print(f"rotation started as job {result['jobIds'][0]}; follow it with dsm jobs get")
    return 0


@_api
def _alerts(args: argparse.Namespace) -> int:
    alerts = _call(args, "GET", "/api/alerts")["alerts"]
    if args.output == "json":
        print(json.dumps(alerts, indent=2))
        return 0
    for a in alerts:
        print(f"{a['raisedAt']}  {a['node']:<16} {a['type']}: {a['message']}")
    if not alerts:
        print("no open alerts")
    return 0


@_api
def _jobs_submit(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as e:
        return _fail(f"--payload is not valid JSON: {e}")
    if not isinstance(payload, dict):
        return _fail("--payload must be a JSON object")
    if args.count < 1:
        return _fail("--count must be at least 1")
    job: dict[str, Any] = {"type": args.type, "payload": payload, "delaySeconds": args.delay}
    for key, value in (
        ("priority", args.priority),
        ("maxAttempts", args.max_attempts),
        ("timeoutSeconds", args.timeout),
        ("uniqueKey", args.unique_key),
    ):
        if value is not None:
            job[key] = value
    body = job if args.count == 1 else {"jobs": [job] * args.count}
    result = _call(args, "POST", "/api/jobs", body)
    if args.output == "json":
        print(json.dumps(result))
    elif result["ids"]:
        shown = ", ".join(map(str, result["ids"][:10])) + (
            " ..." if len(result["ids"]) > 10 else ""
        )
        print(f"submitted {len(result['ids'])} job(s): {shown}")
    else:
        print("duplicate: a job with this unique key is already waiting or running")
    return 0


@_api
def _jobs_get(args: argparse.Namespace) -> int:
    job = _call(args, "GET", f"/api/jobs/{args.id}")
    if args.output == "json":
        print(json.dumps(job, indent=2))
    else:
        for k, v in job.items():
            print(f"{k:>13}: {json.dumps(v) if isinstance(v, dict) else v}")
    return 0


@_api
def _jobs_stats(args: argparse.Namespace) -> int:
    stats = _call(args, "GET", f"/api/jobs/stats?windowSeconds={args.window:g}")
    if args.output == "json":
        print(json.dumps(stats, indent=2))
        return 0
    print(f"Jobs over the last {args.window:g} s")
    print("\nby node:")
    for name, n in sorted(stats["byNode"].items()):
        print(f"  {name:<24} {n:>10}")
    print("\nby type:")
    for name, n in sorted(stats["byType"].items()):
        print(f"  {name:<24} {n:>10}")
    print("\nby node and type:")
    for r in stats["byNodeAndType"]:
        print(f"  {r['node']:<16} {r['type']:<24} {r['outcome']:<10} {r['count']:>10}")
    return 0


def _up(args: argparse.Namespace) -> int:
    from dsm_node import local_cluster

    return local_cluster.run(args)

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
    dsm agent run               one agent (activates once, then heartbeats)
    dsm agents ...              activation tokens, agents, events, simulate
    dsm completion bash         a shell completion script

Every command that prints takes ``--output json`` for scripts, before or after the command name.
Errors go to stderr as one line with a non-zero exit: 2 for bad input or a node that cannot join,
1 for a server or network failure.
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

# Commands import what they need when they run: `dsm nodes list` or `dsm completion bash` should
# not pay for the node runtime (SQLAlchemy, aiohttp, the job pool). No cycle hides behind this:
# `make lint` checks that nothing below the CLI imports it (import-linter).

EXAMPLES = """\
examples:
  dsm up                                    a local 3-node cluster; Ctrl-C stops it
  dsm nodes list                            every node: Online, Offline, Offline (Upgrade Required)
  dsm jobs submit noop --count 1000         enqueue 1000 jobs
  dsm jobs get 42 --output json             one job (its node, state, error), for scripts
  dsm --output json jobs stats              --output goes before or after the command
  dsm nodes decommission node-3             remove a node that is Offline
  DSM_API_KEY=... dsm --server https://10.0.0.5:4119 --ca-file ca.pem nodes list
  source <(dsm completion bash)             tab completion in bash

connection (every command that talks to a node):
  --server URL    https://HOST:PORT of any node              (env DSM_SERVER)
  --ca-file FILE  CA certificate of the nodes' TLS           (env DSM_CA_FILE)
  --api-key KEY   an API key; prefer the environment, which  (env DSM_API_KEY)
                  other users cannot read in the process list
  After `dsm up`, all three come from its context file (STATE_DIR/context.json; STATE_DIR is
  DSM_STATE_DIR, ~/.local/share/dsm, or /var/lib/dsm as root).
"""


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


def output_of(args: argparse.Namespace) -> str:
    return str(getattr(args, "output", None) or "text")


def _output_options() -> argparse.ArgumentParser:
    """``--output``, accepted before the command name and after it (SUPPRESS: an absent flag
    does not overwrite one given earlier)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--output",
        "-o",
        choices=["text", "json"],
        default=argparse.SUPPRESS,
        help="text for people (default) or json for scripts",
    )
    return p


def _connection_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument(
        "--server",
        default=argparse.SUPPRESS,
        help="https://HOST:PORT of any node (env DSM_SERVER; default: from `dsm up`)",
    )
    g.add_argument(
        "--ca-file",
        default=argparse.SUPPRESS,
        help="CA certificate the node's certificate is checked against (env DSM_CA_FILE)",
    )
    g.add_argument(
        "--api-key",
        default=argparse.SUPPRESS,
        help="API key (env DSM_API_KEY, which other users cannot see in the process list)",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        default=argparse.SUPPRESS,
        help="do not check the node's certificate (tests only)",
    )
    return p


def _group(sub: Any, name: str, help_: str, **kwargs: Any) -> Any:
    """A command group (``dsm jobs``): alone, it prints its own help."""
    parser = sub.add_parser(name, help=help_, description=help_, **kwargs)

    def show_help(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=show_help)
    return parser, parser.add_subparsers(metavar="COMMAND", title="commands")


def _parser() -> argparse.ArgumentParser:
    output, connection = _output_options(), _connection_options()
    p = argparse.ArgumentParser(
        prog="dsm",
        description="Multi-node security manager: identical nodes on one PostgreSQL.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[output, connection],
    )
    p.add_argument("--version", action="version", version=f"dsm {__version__}")
    sub = p.add_subparsers(metavar="COMMAND", title="commands")
    client = [output, connection]

    up = sub.add_parser(
        "up",
        help="run a local multi-node cluster (Ctrl-C stops it)",
        description="Runs a local cluster: one process per node on consecutive loopback "
        "addresses, on an embedded PostgreSQL unless --database-url is given. A node that exits "
        "is restarted. State (database, secrets, certificate, logs) lives in DSM_STATE_DIR "
        "(default ~/.local/share/dsm, or /var/lib/dsm as root); one `dsm up` per state directory.",
    )
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument(
        "--database-url",
        default=os.environ.get("DSM_DATABASE_URL"),
        help="shared database, postgresql://USER:PASSWORD@HOST:PORT/DATABASE (env "
        "DSM_DATABASE_URL); an embedded PostgreSQL when absent",
    )
    up.add_argument("--port", type=int, default=4119, help="API port of every node (default 4119)")
    up.add_argument(
        "--first-address",
        default="127.0.0.1",
        help="address of node-1; the others take the next ones (default 127.0.0.1)",
    )
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
    up.add_argument(
        "--agents",
        type=int,
        default=0,
        help="also run this many simulated agents (dsm agents simulate; heartbeat every 10 s)",
    )
    up.set_defaults(func=_up)

    _, node = _group(sub, "node", "run a node")
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

    _, db = _group(sub, "db", "the database schema")
    upg = db.add_parser("upgrade", help="create or migrate the schema, then exit", parents=[output])
    upg.add_argument("--database-url", default=os.environ.get("DSM_DATABASE_URL"))
    upg.add_argument("--software-version", default=__version__)
    upg.set_defaults(func=_db_upgrade)

    _, nodes = _group(sub, "nodes", "manager nodes")
    ls = nodes.add_parser(
        "list", help="nodes with status, version and last heartbeat", parents=client
    )
    ls.set_defaults(func=_nodes_list)
    dec = nodes.add_parser(
        "decommission", help="remove an Offline node from the cluster", parents=client
    )
    dec.add_argument("name", help="the node's name (see dsm nodes list)")
    dec.set_defaults(func=_nodes_decommission)

    _, mk = _group(sub, "master-key", "the master key")
    rot = mk.add_parser(
        "rotate", help="rotate the master key (a resumable background job)", parents=client
    )
    rot.set_defaults(func=_master_key_rotate)

    al = sub.add_parser(
        "alerts", help="open alerts (e.g. Manager Time Out of Sync)", parents=client
    )
    al.set_defaults(func=_alerts)

    _, jobs = _group(sub, "jobs", "the job pool")
    submit = jobs.add_parser("submit", help="enqueue a job", parents=client)
    submit.add_argument("type", help="job type, e.g. noop, clear_caches, sleep")
    submit.add_argument("--payload", default="{}", help="JSON object")
    submit.add_argument("--priority", type=int)
    submit.add_argument("--delay", type=float, default=0.0, help="seconds before it may run")
    submit.add_argument("--max-attempts", type=int)
    submit.add_argument("--timeout", type=float, help="seconds per attempt")
    submit.add_argument("--unique-key", help="a second submit with this key is a no-op")
    submit.add_argument("--count", type=int, default=1, help="submit this many copies at once")
    submit.set_defaults(func=_jobs_submit)
    get = jobs.add_parser("get", help="one job: state, node, attempts, error", parents=client)
    get.add_argument("id")
    get.set_defaults(func=_jobs_get)
    stats = jobs.add_parser("stats", help="jobs by node and type over a window", parents=client)
    stats.add_argument("--window", type=float, default=3600.0, help="seconds (default 3600)")
    stats.set_defaults(func=_jobs_stats)

    # agents (issue 11): dsm agent run/event, dsm agents token/list/show/.../simulate
    from dsm_node import cli_agents

    cli_agents.register(sub, _group, client, output)

    comp = sub.add_parser(
        "completion",
        help="print a shell completion script: source <(dsm completion bash)",
    )
    comp.add_argument("shell", choices=["bash"], help="the shell (bash)")
    comp.set_defaults(func=lambda args: _completion(p, args))
    return p


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
    if output_of(args) == "json":
        print(json.dumps({"schemaVersion": state.schema_version, "applied": list(state.applied)}))
    else:
        applied = ", ".join(map(str, state.applied)) or "none"
        print(f"schema version {state.schema_version} (migrations applied now: {applied})")
    return 0


# -- API commands --------------------------------------------------------------------------


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    from dsm_node.client import Client

    return Client.from_args(
        getattr(args, "server", None),
        getattr(args, "ca_file", None),
        getattr(args, "insecure", False),
        getattr(args, "api_key", None),
    ).request(method, path, body)


def _api(fn: Any) -> Any:
    """Turns API errors into one readable line and an exit code (2: our input, 1: elsewhere)."""

    def wrapped(args: argparse.Namespace) -> int:
        from dsm_node.client import ApiError, ConnectionSettingsError

        try:
            return int(fn(args))
        except ConnectionSettingsError as e:
            return _fail(str(e), 2)
        except ApiError as e:
            return _fail(str(e), 2 if 400 <= e.status < 500 else 1)

    return wrapped


@_api
def _nodes_list(args: argparse.Namespace) -> int:
    nodes = _call(args, "GET", "/api/nodes")["nodes"]
    if output_of(args) == "json":
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
    print(json.dumps(result) if output_of(args) == "json" else f"{args.name}: decommissioned")
    return 0


@_api
def _master_key_rotate(args: argparse.Namespace) -> int:
    result = _call(args, "POST", "/api/master-key/rotate")
    if output_of(args) == "json":
        print(json.dumps(result))
    elif result["alreadyRunning"]:
        print("a rotation is already under way")
    else:
        print(f"rotation started as job {result['jobIds'][0]}; follow it with dsm jobs get")
    return 0


@_api
def _alerts(args: argparse.Namespace) -> int:
    alerts = _call(args, "GET", "/api/alerts")["alerts"]
    if output_of(args) == "json":
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
    if output_of(args) == "json":
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
    if output_of(args) == "json":
        print(json.dumps(job, indent=2))
    else:
        print(format_job(job))
    return 0


def format_job(job: dict[str, Any]) -> str:
    """One job for people: the node by name (its id beside it), then every other field."""
    shown = dict(job)
    for name_key, id_key in (("node", "nodeId"), ("targetNode", "targetNodeId")):
        name, node_id = shown.pop(name_key, None), shown.pop(id_key, None)
        if name is not None or node_id is not None:
            shown[name_key] = f"{name or '?'} (id {node_id})" if node_id is not None else name
    order = ["id", "type", "state", "node", "targetNode", "attempt", "maxAttempts"]
    keys = [k for k in order if k in shown] + [k for k in shown if k not in order]
    return "\n".join(
        f"{k:>13}: {json.dumps(shown[k]) if isinstance(shown[k], dict) else shown[k]}" for k in keys
    )


@_api
def _jobs_stats(args: argparse.Namespace) -> int:
    stats = _call(args, "GET", f"/api/jobs/stats?windowSeconds={args.window:g}")
    if output_of(args) == "json":
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


def _completion(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    print(bash_completion(parser))
    return 0


def command_tree(
    parser: argparse.ArgumentParser, path: str = "dsm"
) -> dict[str, tuple[list[str], list[str], dict[str, list[str]]]]:
    """{command path: (subcommands, options, {option: choices})} from the argparse tree."""
    subs: list[str] = []
    options: list[str] = []
    choices: dict[str, list[str]] = {}
    tree: dict[str, tuple[list[str], list[str], dict[str, list[str]]]] = {}
    for action in parser._actions:  # argparse keeps its tree here; it is stable across versions
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                subs.append(name)
                tree.update(command_tree(child, f"{path} {name}"))
        elif action.option_strings:
            options += [o for o in action.option_strings if o.startswith("--")]
            if action.choices:
                for o in action.option_strings:
                    choices[o] = [str(c) for c in action.choices]
        elif action.choices:  # a positional with choices, e.g. the shell
            subs += [str(c) for c in action.choices]
    tree[path] = (subs, options, choices)
    return tree


def bash_completion(parser: argparse.ArgumentParser) -> str:
    tree = command_tree(parser)
    children = "\n".join(f'  ["{k}"]="{" ".join(v[0])}"' for k, v in sorted(tree.items()))
    options = "\n".join(f'  ["{k}"]="{" ".join(v[1])}"' for k, v in sorted(tree.items()))
    all_choices: dict[str, list[str]] = {}
    for _, _, ch in tree.values():
        all_choices.update(ch)
    choices = "\n".join(f'  ["{k}"]="{" ".join(v)}"' for k, v in sorted(all_choices.items()))
    return f"""# bash completion for dsm, generated by `dsm completion bash` from its own arguments
declare -gA _dsm_children=(
{children}
)
declare -gA _dsm_options=(
{options}
)
declare -gA _dsm_choices=(
{choices}
)
_dsm() {{
  local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}" path=dsm w i
  if [[ -n "${{_dsm_choices[$prev]}}" ]]; then
    COMPREPLY=( $(compgen -W "${{_dsm_choices[$prev]}}" -- "$cur") )
    return
  fi
  for ((i = 1; i < COMP_CWORD; i++)); do
    w="${{COMP_WORDS[i]}}"
    if [[ " ${{_dsm_children[$path]}} " == *" $w "* ]]; then
      path="$path $w"
    fi
  done
  if [[ "$cur" == -* ]]; then
    COMPREPLY=( $(compgen -W "${{_dsm_options[$path]}}" -- "$cur") )
  else
    COMPREPLY=( $(compgen -W "${{_dsm_children[$path]}}" -- "$cur") )
  fi
}}
complete -F _dsm dsm"""

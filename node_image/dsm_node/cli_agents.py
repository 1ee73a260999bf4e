"""The ``dsm agent`` and ``dsm agents`` commands (registered by ``dsm_node.cli``).

dsm agent run --state-dir DIR --manager HOST:PORT [--token T --ca-pin P]
dsm agent event --state-dir DIR TYPE [--data JSON]
dsm agents token create [--uses N] [--expires-in S] [--description TEXT]
dsm agents token list | revoke ID
dsm agents list [--status S] | show ID | events ID | deactivate ID | alerts
dsm agents simulate --manager HOST:PORT --count N [--interval S] [--events E]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

AGENT_EXAMPLES = """\
examples:
  dsm agents token create --uses 10 --expires-in 3600
  dsm agent run --state-dir /var/lib/dsm-agent --manager 10.0.0.5:4120 \\
      --token at1.3.XXXX --ca-pin sha256:...        # activates once, then heartbeats
  dsm agents simulate --manager 127.0.0.1:4120 --count 1000 --interval 10 --events 10 \\
      --token at1.4.XXXX --ca-pin sha256:...
"""


def register(sub: Any, group: Any, client: list[argparse.ArgumentParser], output: Any) -> None:
    _, agent = group(sub, "agent", "run an agent (talks to the managers' heartbeat port)")
    run = agent.add_parser(
        "run",
        help="run one agent: activates once, then heartbeats until stopped",
        epilog=AGENT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--state-dir", required=True, help="its identity, state and events")
    run.add_argument(
        "--manager",
        action="append",
        default=[],
        help="HOST:PORT of a manager's heartbeat port (or a load balancer); repeatable",
    )
    run.add_argument("--token", help="activation token (first start only)")
    run.add_argument("--ca-pin", help="sha256:... of the agent CA (given with the token)")
    run.add_argument("--hostname", help="name shown for this agent (default: this host's)")
    run.add_argument(
        "--events-per-heartbeat", type=int, default=0, help="sample events to record (demos)"
    )
    run.add_argument(
        "--max-heartbeats", type=int, help="stop after this many answered heartbeats (tests)"
    )
    run.add_argument(
        "--clock-offset",
        type=float,
        default=0.0,
        help="seconds added to the clock this agent reports (tests and demos of clock alerts)",
    )
    run.add_argument("--log-level", default="INFO")
    run.set_defaults(func=_agent_run)
    ev = agent.add_parser("event", help="record an event for the agent to send")
    ev.add_argument("--state-dir", required=True)
    ev.add_argument("type", help="event type, e.g. firewall.block")
    ev.add_argument("--data", default="{}", help="JSON object of names to scalars")
    ev.set_defaults(func=_agent_event)

    _, agents = group(sub, "agents", "agents: tokens, status, events, simulation")
    _, token = group(agents, "token", "activation tokens")
    tc = token.add_parser("create", help="a token agents activate with", parents=client)
    tc.add_argument("--uses", type=int, default=1, help="activations allowed (default 1)")
    tc.add_argument("--expires-in", type=float, default=86400.0, help="seconds (default a day)")
    tc.add_argument("--description", default="")
    tc.set_defaults(func=_token_create)
    tl = token.add_parser("list", help="tokens and their state", parents=client)
    tl.set_defaults(func=_token_list)
    tr = token.add_parser("revoke", help="revoke a token", parents=client)
    tr.add_argument("id", help="token id")
    tr.set_defaults(func=_token_revoke)

    ls = agents.add_parser("list", help="agents with status and last heartbeat", parents=client)
    ls.add_argument("--status", choices=["activated", "online", "offline", "deactivated"])
    ls.add_argument("--limit", type=int, default=1000)
    ls.set_defaults(func=_agents_list)
    show = agents.add_parser("show", help="one agent", parents=client)
    show.add_argument("id")
    show.set_defaults(func=_agents_show)
    evs = agents.add_parser("events", help="an agent's events", parents=client)
    evs.add_argument("id")
    evs.add_argument("--after", type=int, default=0, help="events after this sequence")
    evs.add_argument("--limit", type=int, default=100)
    evs.set_defaults(func=_agents_events)
    de = agents.add_parser(
        "deactivate", help="revoke an agent's certificate on every node", parents=client
    )
    de.add_argument("id")
    de.set_defaults(func=_agents_deactivate)
    al = agents.add_parser("alerts", help="open agent alerts", parents=client)
    al.set_defaults(func=_agents_alerts)

    sim = agents.add_parser(
        "simulate",
        help="many agents in one process (load tests, demos), with a live progress line",
        parents=[output],
        epilog=AGENT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim.add_argument("--manager", action="append", default=[], help="HOST:PORT; repeatable")
    sim.add_argument("--count", type=int, default=100)
    sim.add_argument(
        "--interval", type=float, help="seconds between heartbeats (default: as the managers say)"
    )
    sim.add_argument("--events", type=int, default=10, help="events per heartbeat (default 10)")
    sim.add_argument("--token")
    sim.add_argument("--ca-pin")
    sim.add_argument("--state-dir", required=True, help="identities kept for the next run")
    sim.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    sim.add_argument("--status-file", help="JSON totals and per-agent state, every second")
    sim.add_argument("--connections", type=int, default=256, help="connections at once")
    sim.add_argument(
        "--full-handshakes",
        action="store_true",
        help="never resume a TLS session: every heartbeat a full handshake (benchmarks)",
    )
    sim.set_defaults(func=_simulate)


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _agent_run(args: argparse.Namespace) -> int:
    from dsm_node import logs
    from dsm_node.agents import running

    try:
        managers = running.parse_managers(args.manager)
    except ValueError as e:
        return _fail(str(e))
    logs.setup(args.hostname or "agent", args.log_level)
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    return asyncio.run(
        running.run(
            state,
            managers,
            args.token,
            args.ca_pin,
            args.hostname,
            max(0, args.events_per_heartbeat),
            args.max_heartbeats,
            args.clock_offset,
        )
    )


def _agent_event(args: argparse.Namespace) -> int:
    from dsm_node.agents import protocol, running

    try:
        data = json.loads(args.data)
        protocol.Event.model_validate({"seq": 1, "at": 0.0, "type": args.type, "data": data})
    except ValueError as e:
        return _fail(f"invalid event: {str(e).splitlines()[0]}")
    try:
        seq = running.record_event(Path(args.state_dir), args.type, data)
    except ValueError as e:
        return _fail(str(e))
    print(f"recorded event {seq}")
    return 0


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    from dsm_node.cli import _call as call

    return call(args, method, path, body)


def _api(fn: Any) -> Any:
    from dsm_node.cli import _api as api

    return api(fn)


def _json(args: argparse.Namespace) -> bool:
    return str(getattr(args, "output", None) or "text") == "json"


@_api
def _token_create(args: argparse.Namespace) -> int:
    r = _call(
        args,
        "POST",
        "/api/agents/tokens",
        {
            "maxUses": args.uses,
            "expiresInSeconds": args.expires_in,
            "description": args.description,
        },
    )
    if _json(args):
        print(json.dumps(r))
        return 0
    print(f"token {r['id']}: {r['token']}")
    print(f"CA pin:   {r['caPin']}")
    print(f"uses {r['maxUses']}, expires {r['expiresAt']} (the token is shown only now)")
    print(
        f"activate: dsm agent run --state-dir DIR --manager HOST:4120 --token {r['token']} "
        f"--ca-pin {r['caPin']}"
    )
    return 0


@_api
def _token_list(args: argparse.Namespace) -> int:
    tokens = _call(args, "GET", "/api/agents/tokens")["tokens"]
    if _json(args):
        print(json.dumps(tokens, indent=2))
        return 0
    rows = [("ID", "STATE", "USES", "EXPIRES", "DESCRIPTION")]
    rows += [
        (str(t["id"]), t["state"], f"{t['uses']}/{t['maxUses']}", t["expiresAt"], t["description"])
        for t in tokens
    ]
    print(_table(rows))
    return 0


@_api
def _token_revoke(args: argparse.Namespace) -> int:
    r = _call(args, "DELETE", f"/api/agents/tokens/{args.id}")
    print(json.dumps(r) if _json(args) else f"token {args.id}: revoked")
    return 0


@_api
def _agents_list(args: argparse.Namespace) -> int:
    q = f"?limit={args.limit}" + (f"&status={args.status}" if args.status else "")
    r = _call(args, "GET", f"/api/agents{q}")
    if _json(args):
        print(json.dumps(r, indent=2))
        return 0
    rows = [("ID", "HOSTNAME", "STATUS", "LAST HEARTBEAT", "NODE", "ACKED", "CLOCK SKEW")]
    for a in r["agents"]:
        age = a["secondsSinceHeartbeat"]
        skew = a["clockSkewSeconds"]
        rows.append(
            (
                str(a["id"]),
                a["hostname"],
                a["status"],
                f"{age:.0f}s ago" if age is not None else "never",
                a["lastNode"] or "-",
                str(a["ackedSequence"]),
                f"{skew:+.1f}s" if skew is not None else "-",
            )
        )
    print(_table(rows))
    counts = ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items())) or "no agents"
    print(f"\n{counts}")
    return 0


@_api
def _agents_show(args: argparse.Namespace) -> int:
    a = _call(args, "GET", f"/api/agents/{args.id}")
    if _json(args):
        print(json.dumps(a, indent=2))
    else:
        print("\n".join(f"{k:>22}: {v}" for k, v in a.items()))
    return 0


@_api
def _agents_events(args: argparse.Namespace) -> int:
    r = _call(args, "GET", f"/api/agents/{args.id}/events?after={args.after}&limit={args.limit}")
    if _json(args):
        print(json.dumps(r, indent=2))
        return 0
    for e in r["events"]:
        print(f"{e['seq']:>8}  {e['at']}  {e['type']:<24} {json.dumps(e['data'])}")
    if not r["events"]:
        print("no events")
    return 0


@_api
def _agents_deactivate(args: argparse.Namespace) -> int:
    r = _call(args, "POST", f"/api/agents/{args.id}/deactivate")
    print(json.dumps(r) if _json(args) else f"agent {args.id} ({r['hostname']}): deactivated")
    return 0


@_api
def _agents_alerts(args: argparse.Namespace) -> int:
    alerts = _call(args, "GET", "/api/agents/alerts")["alerts"]
    if _json(args):
        print(json.dumps(alerts, indent=2))
        return 0
    for a in alerts:
        print(f"{a['raisedAt']}  agent {a['agentId']:<6} {a['type']}: {a['message']}")
    if not alerts:
        print("no open agent alerts")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from dsm_node.agents import running, simulating
    from dsm_node.agents.agent import AgentError

    try:
        managers = running.parse_managers(args.manager)
    except ValueError as e:
        return _fail(str(e))
    if not 1 <= args.count <= 100_000:
        return _fail("--count must be between 1 and 100000")
    if args.interval is not None and not 0.1 <= args.interval <= 86400:
        return _fail("--interval must be between 0.1 and 86400 seconds")
    if not 0 <= args.events <= 1000:
        return _fail("--events must be between 0 and 1000")
    logging.basicConfig(level=logging.WARNING)
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        final = asyncio.run(
            simulating.simulate(
                managers,
                args.count,
                args.interval,
                args.events,
                state,
                args.token,
                args.ca_pin,
                args.duration,
                Path(args.status_file) if args.status_file else None,
                max(1, args.connections),
                resume_sessions=not args.full_handshakes,
            )
        )
    except AgentError as e:
        return _fail(str(e), 3)
    final.pop("perAgent", None)
    print(json.dumps(final) if _json(args) else " ".join(f"{k}={v}" for k, v in final.items()))
    return 0


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)

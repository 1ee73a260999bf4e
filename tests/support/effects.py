"""Reading what transactional test jobs did (``record_effect`` writes one ``test_effects`` row per
execution, in the transaction that completes the job) and submitting them through a node."""

from __future__ import annotations

from typing import Any

from tests.support.jobtypes import CREATE_EFFECTS
from tests.support.nodes import NodeProcess, query, set_settings


def prepare(url: str, threshold: float, interval: float = 0.5) -> None:
    """The effects table, and the cluster's timing shortened for a test."""
    query(url, CREATE_EFFECTS)
    set_settings(url, heartbeat_interval_seconds=interval, offline_threshold_seconds=threshold)


def effects_per_job(url: str) -> dict[int, list[str]]:
    """The nodes whose execution of each job committed, in order."""
    out: dict[int, list[str]] = {}
    for job_id, node in query(url, "SELECT job_id, node FROM test_effects ORDER BY at"):
        out.setdefault(job_id, []).append(node)
    return out


def running(url: str, job_types: tuple[str, ...] = ("record_effect",)) -> set[int]:
    """The ids of the test's jobs running: not the node's own periodic jobs (agents_watch, due
    when a node starts, can be running beside them, waiting for a transaction slot)."""
    sql = "SELECT id FROM jobs WHERE state = 'running' AND type = ANY(%s)"
    return {int(r[0]) for r in query(url, sql, (list(job_types),))}


def pending(url: str, job_type: str = "record_effect") -> int:
    return int(query(url, "SELECT count(*) FROM jobs WHERE type = %s", (job_type,))[0][0])


def submit(node: NodeProcess, jobs: list[dict[str, Any]]) -> list[int]:
    status, body = node.request("POST", "/api/jobs", {"jobs": jobs})
    assert status == 201, body
    return list(body["ids"])


def node_status(url: str, name: str) -> str:
    return str(query(url, "SELECT status FROM nodes WHERE name = %s", (name,))[0][0])

"""Job types used by tests, loaded into node processes with DSM_JOB_MODULES=tests.support.jobtypes.

``record_effect`` is transactional: it writes one row per execution into ``test_effects`` in the
same transaction that completes the job, so the table shows how often each job's effect happened.
"""

from __future__ import annotations

import asyncio
import os
import time

from sqlalchemy import text

from dsm_node.jobs.registry import JobContext, Payload, job_type

CREATE_EFFECTS = """
CREATE TABLE IF NOT EXISTS test_effects (
    job_id bigint NOT NULL,
    node text NOT NULL,
    attempt integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


@job_type("record_effect", transactional=True, max_attempts=20, timeout=120)
async def record_effect(ctx: JobContext, payload: Payload) -> None:
    """Writes (job, node, attempt) into test_effects; optional sleeps before and after the write,
    only in the first ``slow_attempts`` attempts (all of them by default) and only on the nodes
    named in ``slow_nodes`` (all of them by default). With ``fail_marker`` (a file path), the first
    run that gets past the first sleep fails, and creates the file so that later runs do not."""
    assert ctx.conn is not None
    slow = ctx.attempt <= int(payload.get("slow_attempts", 1_000_000))
    if "slow_nodes" in payload:
        slow = slow and ctx.node_name in payload["slow_nodes"]
    await asyncio.sleep(float(payload.get("sleep_before", 0)) if slow else 0)
    if (marker := payload.get("fail_marker")) and _first_to_create(marker):
        raise RuntimeError("failing once on purpose")
    await ctx.conn.execute(
        text("INSERT INTO test_effects (job_id, node, attempt) VALUES (:j, :n, :a)"),
        {"j": ctx.job_id, "n": ctx.node_name, "a": ctx.attempt},
    )
    await asyncio.sleep(float(payload.get("sleep_after_write", 0)) if slow else 0)


def _first_to_create(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


@job_type("always_fails", max_attempts=3, timeout=10)
async def always_fails(ctx: JobContext, payload: Payload) -> None:
    """Raises every time: exercises retries and the dead-letter state."""
    raise RuntimeError(f"failing on purpose (attempt {ctx.attempt})")


@job_type("report_for_auditors", max_attempts=3, timeout=10, required_role="auditor")
async def report_for_auditors(ctx: JobContext, payload: Payload) -> None:
    """A job type an auditor may enqueue (the role tests prove the registry's required role is
    what decides, not a blanket rule)."""


@job_type("block_event_loop", max_attempts=1, timeout=60)
async def block_event_loop(ctx: JobContext, payload: Payload) -> None:
    """Blocks the node's event loop for payload.seconds (a wedged node, for the liveness test)."""
    time.sleep(float(payload["seconds"]))  # noqa: ASYNC251 (the point: a blocked loop)

"""Job types every node carries: cache clearing (local), history pruning, per-minute roll-ups,
and a documented no-op for tests and benchmarks.

Each declares the role needed to enqueue it through the API (``required_role``). All of them
change the cluster (key rotation, deletion of history, load), so all need an administrator; an
auditor changes nothing.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, Field

from dsm_node import keys
from dsm_node.jobs.pool import JobPool
from dsm_node.jobs.registry import REGISTRY, JobContext, Payload, Periodic, job_type
from dsm_node.roles import ADMINISTRATOR


@job_type("noop", max_attempts=3, timeout=30, required_role=ADMINISTRATOR)
async def noop(ctx: JobContext, payload: Payload) -> None:
    """Does nothing: measures the pool itself (benchmarks, tests)."""


class SleepPayload(BaseModel):
    seconds: float = Field(ge=0, le=3600, description="How long to sleep.")


@job_type(
    "sleep", max_attempts=3, timeout=3600, payload_model=SleepPayload, required_role=ADMINISTRATOR
)
async def sleep(ctx: JobContext, payload: Payload) -> None:
    """Sleeps for payload.seconds: a job that holds its claim (tests of takeover and shutdown)."""
    await asyncio.sleep(float(payload["seconds"]))


@job_type("clear_caches", local=True, max_attempts=3, timeout=60, required_role=ADMINISTRATOR)
async def clear_caches(ctx: JobContext, payload: Payload) -> None:
    """Clears this node's in-process caches; runs once on every online node."""
    n = ctx.services.caches.clear()
    ctx.log.info("cleared %d cached entries on %s", n, ctx.node_name)


@job_type(
    "rollup_job_counts",
    transactional=True,
    max_attempts=10,
    timeout=300,
    required_role=ADMINISTRATOR,
)
async def rollup_job_counts(ctx: JobContext, payload: Payload) -> None:
    """Rolls finished jobs up into per-minute counts by (node, type, outcome)."""
    counted, written = await JobPool.roll_up_counts(ctx.transaction())
    if counted:
        ctx.log.info("rolled up %d finished jobs into %d per-minute counts", counted, written)


@job_type(
    "prune_job_history",
    transactional=True,
    max_attempts=10,
    timeout=600,
    required_role=ADMINISTRATOR,
)
async def prune_job_history(ctx: JobContext, payload: Payload) -> None:
    """Deletes finished jobs and counts older than their retention, in batches."""
    s = ctx.services.settings.current()
    jobs, counts = await JobPool.prune(
        ctx.transaction(), s.job_history_retention_seconds, s.job_counts_retention_seconds
    )
    if jobs or counts:
        ctx.log.info("pruned %d finished jobs and %d per-minute counts", jobs, counts)


@job_type("rotate_master_key", max_attempts=20, timeout=3600, required_role=ADMINISTRATOR)
async def rotate_master_key(ctx: JobContext, payload: Payload) -> None:
    """Rotates the master key: a new version, then re-encryption in resumable batches."""
    s = ctx.services
    version = await keys.begin_rotation(s.engine, s.keys.wrapper)
    await s.keys.reload(s.engine)
    total = 0
    while True:
        done = await keys.reencrypt_batch(s.engine, s.keys.keyring)
        total += done
        if done:
            continue
        retired = await keys.finish_rotation(s.engine, version)
        if retired is not None:
            break
    ctx.log.info(
        "master key rotated to version %d: %d values re-encrypted, versions %s retired",
        version,
        total,
        retired,
    )


REGISTRY.every(Periodic("rollup_job_counts", "rollup_job_counts", every=60))
REGISTRY.every(Periodic("prune_job_history", "prune_job_history", every=3600))

"""Prometheus metrics of one node. One registry per process; the API serves it on /metrics.

Names follow the Prometheus conventions: base units in the name (``_seconds``), counters end in
``_total`` (the client adds it), label values come from bounded sets (job types registered in
code, outcomes, node names of the cluster, node statuses). The alert rules in
``monitoring/prometheus-rules.yaml`` and the dashboard depend on these names: change them together.

Counters and histograms export no ``_created`` series (one extra series per label set that nothing
here reads). The registry also carries the standard process, platform and garbage-collector
metrics (``process_resident_memory_bytes``, ``process_open_fds``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)
NODE = Gauge("dsm_node_info", "This node", ["node", "version"], registry=REGISTRY)

JOB_OUTCOMES = ("succeeded", "retrying", "failed", "lost", "abandoned")
JOBS = Counter(
    "dsm_jobs",
    "Job attempts ended on this node, by type and outcome",
    ["type", "outcome"],
    registry=REGISTRY,
)
JOB_SECONDS = Histogram(
    "dsm_job_duration_seconds",
    "Time a job's handler ran",
    ["type"],
    registry=REGISTRY,
    buckets=(0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10, 60, 300),
)
CLAIM_SECONDS = Histogram(
    "dsm_job_claim_duration_seconds",
    "Duration of one batched claim statement",
    registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2),
)
QUEUE_WAIT_SECONDS = Histogram(
    "dsm_job_queue_wait_seconds",
    "Time from a job being due to being claimed",
    ["type"],
    registry=REGISTRY,
    buckets=(0.005, 0.025, 0.1, 0.5, 2.5, 10, 60, 300, 1800),
)
QUEUE_DEPTH = Gauge(
    "dsm_queue_depth",
    "Jobs in the pool by type and state (cluster-wide)",
    ["type", "state"],
    registry=REGISTRY,
)
NODE_STATUS = Gauge(
    "dsm_node_status",
    "1 for each node's current status as seen by this node",
    ["node", "status"],
    registry=REGISTRY,
)
HEARTBEAT_AGE = Gauge(
    "dsm_heartbeat_age_seconds",
    "Seconds since this node's last successful heartbeat",
    registry=REGISTRY,
)
HEARTBEAT_INTERVAL = Gauge(
    "dsm_heartbeat_interval_seconds",
    "The cluster's heartbeat interval setting",
    registry=REGISTRY,
)
OFFLINE_THRESHOLD = Gauge(
    "dsm_offline_threshold_seconds",
    "The cluster's offline threshold setting: peers silent this long are Offline",
    registry=REGISTRY,
)
TAKEOVERS = Counter(
    "dsm_takeovers",
    "Peers this node declared offline",
    registry=REGISTRY,
)
CACHE_CLEARS = Counter(
    "dsm_cache_clears",
    "Times this node's caches were cleared",
    registry=REGISTRY,
)
CLOCK_SKEW = Gauge(
    "dsm_clock_skew_seconds",
    "This node's clock minus the database's",
    registry=REGISTRY,
)
TIME_OUT_OF_SYNC = Gauge(
    "dsm_time_out_of_sync",
    "1 while the Manager Time Out of Sync alert is raised for this node",
    registry=REGISTRY,
)


def observe_heartbeat(age: float, interval: float, threshold: float) -> None:
    """After each heartbeat attempt: its age and the settings it is judged by (the alert rules
    compare the age with the threshold, so they follow the cluster's settings)."""
    HEARTBEAT_AGE.set(age)
    HEARTBEAT_INTERVAL.set(interval)
    OFFLINE_THRESHOLD.set(threshold)


def initialize_job_series(job_types: Iterable[str]) -> None:
    """Create the series of every job type at 0 when the node starts: each (type, outcome) of
    ``dsm_jobs_total`` and each type's histograms.

    A series that appears only with its first observation hides that observation from
    ``increase()`` and ``rate()`` (there is no earlier sample): the first dead-lettered job of a
    type would never fire ``DsmJobsDeadLettered``, and a first burst of jobs would be missing from
    the dashboard's rates and quantiles."""
    for job_type in job_types:
        for outcome in JOB_OUTCOMES:
            JOBS.labels(job_type, outcome)
        JOB_SECONDS.labels(job_type)
        QUEUE_WAIT_SECONDS.labels(job_type)

"""Prometheus metrics of one node. One registry per process; the API serves it on /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
NODE = Gauge("dsm_node_info", "This node", ["node", "version"], registry=REGISTRY)

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

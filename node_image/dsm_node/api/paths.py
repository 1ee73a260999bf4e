"""HTTP paths and ports of a node, in one place (the operator's probes use the same names)."""

HEALTHZ = "/healthz"
READYZ = "/readyz"
METRICS = "/metrics"
API_NODES = "/api/nodes"
API_JOBS = "/api/jobs"
API_JOB = "/api/jobs/{id}"
API_JOB_STATS = "/api/jobs/stats"

API_PORT = 4119
HEARTBEAT_PORT = 4120

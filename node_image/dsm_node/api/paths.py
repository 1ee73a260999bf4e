"""HTTP paths and ports of a node, in one place (the operator's probes use the same names)."""

HEALTHZ = "/healthz"
READYZ = "/readyz"
METRICS = "/metrics"
API_NODES = "/api/nodes"
API_JOBS = "/api/jobs"
API_JOB = "/api/jobs/{id}"
API_JOB_STATS = "/api/jobs/stats"
API_SESSIONS = "/api/sessions"
API_DECOMMISSION = "/api/nodes/{name}/decommission"
API_SETTINGS = "/api/settings"
API_SECRET_SETTING = "/api/settings/secrets/{key}"
API_MASTER_KEY_ROTATE = "/api/master-key/rotate"
API_USERS = "/api/users"
API_AUDIT = "/api/audit"
API_ALERTS = "/api/alerts"
API_AGENT_MANAGERS = "/api/agents/managers"

# The administrator's console (dsm_node.console), on the same port as the API
CONSOLE_HOME = "/"
CONSOLE_STATIC = "/static/{name}"
CONSOLE_SIGN_IN = "/sign-in"
CONSOLE_SIGN_OUT = "/sign-out"
CONSOLE_MANAGER_NODES = "/manager-nodes"
CONSOLE_NODE = "/manager-nodes/{name}"
CONSOLE_DECOMMISSION = "/manager-nodes/{name}/decommission"
CONSOLE_SYSTEM_INFORMATION = "/system-information"
CONSOLE_ALERTS = "/alerts"
CONSOLE_AUDIT_LOG = "/audit-log"
CONSOLE_AGENTS = "/agents"

API_PORT = 4119
HEARTBEAT_PORT = 4120

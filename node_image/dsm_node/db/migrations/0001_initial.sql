-- 0001: the cluster, the job pool and its history.
-- Every timestamp is timestamptz and every liveness decision uses the database's now().

CREATE TABLE dsm_schema (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    schema_version   integer NOT NULL,
    software_version text NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE settings (
    key        text PRIMARY KEY,
    value      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE nodes (
    id                serial PRIMARY KEY,
    name              text NOT NULL UNIQUE,
    address           text NOT NULL,
    api_port          integer NOT NULL,
    version           text NOT NULL,
    status            text NOT NULL
        CHECK (status IN ('online', 'offline', 'upgrade_required', 'decommissioned')),
    -- Incremented at every registration: heartbeats and claims are conditional on it, so an
    -- incarnation that was declared offline can neither renew nor claim.
    epoch             bigint NOT NULL DEFAULT 1,
    started_at        timestamptz NOT NULL,
    last_heartbeat    timestamptz NOT NULL,
    status_changed_at timestamptz NOT NULL DEFAULT now(),
    status_reason     text NOT NULL DEFAULT ''
);

-- The hot table holds only jobs that are waiting or running; finished jobs move to job_history.
CREATE TABLE jobs (
    id              bigserial PRIMARY KEY,
    type            text NOT NULL,
    payload         jsonb NOT NULL DEFAULT '{}',
    state           text NOT NULL DEFAULT 'ready' CHECK (state IN ('ready', 'running')),
    priority        smallint NOT NULL DEFAULT 0,
    run_at          timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- attempt is incremented at every claim; (owner_node, attempt) is the fencing token.
    attempt         integer NOT NULL DEFAULT 0,
    max_attempts    integer NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    timeout_seconds double precision NOT NULL DEFAULT 300 CHECK (timeout_seconds > 0),
    unique_key      text,
    -- Local jobs are pinned to one node and never taken over by another.
    target_node     integer REFERENCES nodes (id),
    owner_node      integer,
    claimed_at      timestamptz,
    deadline        timestamptz,
    last_error      text
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);

CREATE INDEX jobs_ready_idx ON jobs (priority DESC, run_at, id) WHERE state = 'ready';
CREATE INDEX jobs_running_idx ON jobs (owner_node) WHERE state = 'running';
CREATE INDEX jobs_target_idx ON jobs (target_node) WHERE target_node IS NOT NULL;
CREATE UNIQUE INDEX jobs_unique_key_idx ON jobs (unique_key) WHERE unique_key IS NOT NULL;

CREATE TABLE job_history (
    id           bigint PRIMARY KEY,
    type         text NOT NULL,
    payload      jsonb NOT NULL,
    outcome      text NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'discarded')),
    node_id      integer,
    attempt      integer NOT NULL,
    priority     smallint NOT NULL,
    target_node  integer,
    created_at   timestamptz NOT NULL,
    claimed_at   timestamptz,
    finished_at  timestamptz NOT NULL,
    error        text
);
CREATE INDEX job_history_finished_idx ON job_history (finished_at);

-- Per-minute counts by (node, type, outcome), filled by the rollup job; the "last hour" views read it.
CREATE TABLE job_counts (
    minute  timestamptz NOT NULL,
    node_id integer NOT NULL,
    type    text NOT NULL,
    outcome text NOT NULL,
    count   bigint NOT NULL,
    PRIMARY KEY (minute, node_id, type, outcome)
);

-- How far job_history has been rolled up into job_counts (exclusive upper bound).
CREATE TABLE job_counts_watermark (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    rolled_until timestamptz NOT NULL
);

-- One row per (periodic task, period): the unique row makes a period run once across all nodes.
CREATE TABLE periodic_runs (
    name   text NOT NULL,
    slot   timestamptz NOT NULL,
    job_id bigint NOT NULL,
    PRIMARY KEY (name, slot)
);

INSERT INTO job_counts_watermark (rolled_until) VALUES (date_trunc('minute', now()));

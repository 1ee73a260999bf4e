-- 0004: agents. The agent CA (its key encrypted under the master key), activation tokens, agents,
-- their events (stored once per (agent, seq)) and their alerts; each node's heartbeat port.

-- NULL: the node serves no agents (heartbeat port disabled, or not listening yet).
ALTER TABLE nodes ADD COLUMN heartbeat_port integer;

-- One CA per cluster, created once under a lock by whichever node needs it first. Every node can
-- sign with it: the private key is AES-256-GCM under the master key (context 'agent-ca/key').
CREATE TABLE agent_ca (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    certificate text NOT NULL,
    private_key text NOT NULL,
    key_version integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE activation_tokens (
    id          bigserial PRIMARY KEY,
    secret_hash bytea NOT NULL,
    description text NOT NULL DEFAULT '',
    max_uses    integer NOT NULL CHECK (max_uses >= 1),
    uses        integer NOT NULL DEFAULT 0 CHECK (uses >= 0 AND uses <= max_uses),
    expires_at  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text NOT NULL,
    revoked_at  timestamptz
);

-- Heartbeats update one row per agent: fillfactor leaves room for HOT updates (no index covers a
-- column a heartbeat changes).
CREATE TABLE agents (
    id                 bigserial PRIMARY KEY,
    hostname           text NOT NULL,
    status             text NOT NULL DEFAULT 'activated'
        CHECK (status IN ('activated', 'online', 'offline', 'deactivated')),
    status_changed_at  timestamptz NOT NULL DEFAULT now(),
    cert_serial        bigint NOT NULL,
    cert_not_after     timestamptz NOT NULL,
    token_id           bigint REFERENCES activation_tokens (id),
    activated_at       timestamptz NOT NULL DEFAULT now(),
    activated_on       text NOT NULL,
    deactivated_at     timestamptz,
    last_heartbeat     timestamptz,
    last_node          integer,
    heartbeats         bigint NOT NULL DEFAULT 0,
    acked_seq          bigint NOT NULL DEFAULT 0,
    agent_status       text,
    status_message     text,
    agent_version      text,
    counters           jsonb,
    clock_skew_seconds double precision,
    config_fingerprint text
) WITH (fillfactor = 70);

-- Events are immutable and stored once: the primary key is the idempotency key.
CREATE TABLE agent_events (
    agent_id    bigint NOT NULL,
    seq         bigint NOT NULL,
    type        text NOT NULL,
    agent_time  double precision NOT NULL,
    data        jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    node_id     integer,
    PRIMARY KEY (agent_id, seq)
);
-- Pruning by age: rows arrive in time order, so a BRIN index is tiny and cheap to maintain.
CREATE INDEX agent_events_received_idx ON agent_events USING brin (received_at);

CREATE TABLE agent_alerts (
    id         bigserial PRIMARY KEY,
    type       text NOT NULL,
    agent_id   bigint NOT NULL REFERENCES agents (id),
    message    text NOT NULL,
    raised_at  timestamptz NOT NULL DEFAULT now(),
    cleared_at timestamptz
);
CREATE UNIQUE INDEX agent_alerts_open_idx ON agent_alerts (type, agent_id) WHERE cleared_at IS NULL;

-- 0002: node lifecycle. The master key (wrapped), encrypted settings, users, sessions and API keys
-- shared by every node, sign-in rate limiting, the audit log, alerts, and clock checks.

-- The master key is stored only wrapped: by a key derived from each node's local secret (or by an
-- external key service). check_value lets a node tell a wrong secret from a corrupt key.
CREATE TABLE master_keys (
    version     integer PRIMARY KEY,
    wrapped_key bytea NOT NULL,
    wrapping    text NOT NULL,
    wrap_params jsonb NOT NULL,
    check_value bytea NOT NULL,
    state       text NOT NULL CHECK (state IN ('active', 'retiring', 'retired')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX master_keys_one_active_idx ON master_keys (state) WHERE state = 'active';

-- Configuration properties marked secret: encrypted with the master key (AES-256-GCM).
CREATE TABLE secret_settings (
    key         text PRIMARY KEY,
    ciphertext  text NOT NULL,
    key_version integer NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id            serial PRIMARY KEY,
    username      text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    role          text NOT NULL CHECK (role IN ('administrator', 'auditor')),
    -- personal data, encrypted with the master key
    full_name     text,
    email         text,
    key_version   integer,
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Sessions live in the database so that a session started on one node works on every node.
CREATE TABLE sessions (
    token_hash   bytea PRIMARY KEY,
    user_id      integer NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_on   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sessions_expires_idx ON sessions (expires_at);

CREATE TABLE api_keys (
    id           serial PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    key_hash     bytea NOT NULL UNIQUE,
    role         text NOT NULL CHECK (role IN ('administrator', 'auditor')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);

CREATE TABLE sign_in_failures (
    id       bigserial PRIMARY KEY,
    username text NOT NULL,
    source   text NOT NULL,
    at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sign_in_failures_idx ON sign_in_failures (username, at);

CREATE TABLE audit_log (
    id     bigserial PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    actor  text NOT NULL,
    node   text NOT NULL,
    action text NOT NULL,
    target text,
    detail jsonb NOT NULL DEFAULT '{}',
    source text
);
CREATE INDEX audit_log_at_idx ON audit_log (at);

CREATE TABLE alerts (
    id         bigserial PRIMARY KEY,
    type       text NOT NULL,
    node_id    integer NOT NULL REFERENCES nodes (id),
    message    text NOT NULL,
    raised_at  timestamptz NOT NULL DEFAULT now(),
    cleared_at timestamptz
);
CREATE UNIQUE INDEX alerts_open_idx ON alerts (type, node_id) WHERE cleared_at IS NULL;

ALTER TABLE nodes
    ADD COLUMN clock_skew_seconds double precision,
    ADD COLUMN time_zone text;

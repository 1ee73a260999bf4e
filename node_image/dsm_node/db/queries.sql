-- Every statement the node runs, by name. Loaded by dsm_node.db.queries; reviewed as SQL.
-- Conventions: :name binds; CAST(...) instead of '::' (the binder owns the colon);
-- now() is the only clock for liveness and scheduling; clock_timestamp() stamps finishes.
-- Membership and takeover statements never wait on a row another node has locked: that node may
-- be frozen inside its transaction. They take rows FOR UPDATE SKIP LOCKED and leave the rest to
-- the next sweep, which finds them again (every sweep statement converges, whatever was skipped).

-- ---------------------------------------------------------------------------------------------
-- Fragments: each job state transition written once, included by the statements that make it.

-- fragment: archive_finished
-- The one way a job leaves the pool for job_history. The including statement deletes the jobs in
-- a CTE named `finished` that returns the job's columns plus `outcome` ('succeeded', 'failed',
-- 'discarded') and `reason` (the error, or why it was discarded). The attempt recorded is the
-- counted one: claims minus refunded releases.
INSERT INTO job_history (id, type, payload, outcome, node_id, attempt, priority, target_node,
                         created_at, claimed_at, finished_at, error)
SELECT id, type, payload, outcome, owner_node, attempt - released_claims, priority,
       target_node, created_at, claimed_at, clock_timestamp(), reason
FROM finished

-- fragment: unclaimed
-- The one way a running job returns to the pool (a retry, a release, a takeover, a deadline): the
-- end of the including statement's SET list. No owner, no deadline; the attempt counter stays
-- (with the owner it is the fencing token, and it never repeats).
state = 'ready', owner_node = NULL, owner_epoch = NULL, claimed_at = NULL, deadline = NULL

-- ---------------------------------------------------------------------------------------------

-- name: schema_version
SELECT schema_version, software_version FROM dsm_schema;

-- name: table_exists
SELECT to_regclass(:table) IS NOT NULL;

-- name: schema_lock
-- Serializes joins and migrations across nodes, until the transaction ends (db.migrating).
SELECT pg_advisory_xact_lock(:key);

-- name: record_schema_version
INSERT INTO dsm_schema (schema_version, software_version) VALUES (:version, '0')
ON CONFLICT (singleton) DO UPDATE SET schema_version = excluded.schema_version, updated_at = now();

-- name: get_settings
SELECT key, value FROM settings;

-- name: put_setting
INSERT INTO settings (key, value) VALUES (:key, CAST(:value AS jsonb))
ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = now();

-- name: put_setting_default
INSERT INTO settings (key, value) VALUES (:key, CAST(:value AS jsonb))
ON CONFLICT (key) DO NOTHING;

-- name: db_clock
SELECT now() AS db_now, clock_timestamp() AS db_clock, current_setting('TimeZone') AS db_timezone;

-- name: register_node
-- A new name gets a row; a known name gets a new incarnation (epoch + 1). Decommissioned names
-- never come back: no row is returned and the node refuses to start.
-- The first heartbeat is the statement's time, not the transaction's: registration ends a join
-- transaction that may have taken seconds (key derivation, migrations), and a heartbeat dated
-- from its start would have peers declare the new incarnation offline before its next one.
INSERT INTO nodes AS n (name, address, api_port, version, status, started_at, last_heartbeat,
                        status_changed_at, status_reason)
VALUES (:name, :address, :api_port, :version, 'online', now(), clock_timestamp(), now(),
        'registered')
ON CONFLICT (name) DO UPDATE
    SET address = excluded.address, api_port = excluded.api_port, version = excluded.version,
        status = 'online', epoch = n.epoch + 1, started_at = now(),
        last_heartbeat = clock_timestamp(), status_changed_at = now(),
        status_reason = 'registered'
    WHERE n.status <> 'decommissioned'
RETURNING id, epoch;

-- name: release_decommissioned_name
-- The decommissioned node keeps its id and its history under a new name; the name is free again.
UPDATE nodes SET name = name || '~decommissioned-' || id
WHERE name = :name AND status = 'decommissioned'
RETURNING id;

-- name: node_by_name
SELECT id, status FROM nodes WHERE name = :name;

-- name: requeue_jobs_of_node
-- Jobs held by an earlier incarnation of a node go back to the pool (their attempt is spent,
-- so the earlier incarnation can no longer complete them). Rows still locked by that
-- incarnation (frozen mid-commit) are left to the sweep's requeue_orphaned_jobs.
UPDATE jobs j SET run_at = now(), last_error = :reason,
    -- include: unclaimed
FROM (
    SELECT id FROM jobs
    WHERE owner_node = :node_id AND state = 'running' AND target_node IS NULL
    FOR UPDATE SKIP LOCKED
) held
WHERE j.id = held.id
RETURNING j.id;

-- name: discard_local_jobs_of_nodes
-- Local jobs are pinned to their node: when it leaves, they are discarded, never taken over.
-- Rows locked by a frozen transaction are left to discard_orphaned_local_jobs.
WITH finished AS (
    DELETE FROM jobs j
    USING (
        SELECT id FROM jobs WHERE target_node = ANY(CAST(:node_ids AS int[]))
        FOR UPDATE SKIP LOCKED
    ) pinned
    WHERE j.id = pinned.id
    RETURNING j.*, CAST('discarded' AS text) AS outcome, CAST(:reason AS text) AS reason
)
-- include: archive_finished
RETURNING id;

-- name: discard_orphaned_local_jobs
-- The sweep's catch-all for local jobs: pinned to a node that is no longer online.
WITH finished AS (
    DELETE FROM jobs j
    USING (
        SELECT x.id FROM jobs x
        WHERE x.target_node IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = x.target_node AND n.status = 'online')
        FOR UPDATE SKIP LOCKED
    ) pinned
    WHERE j.id = pinned.id
    RETURNING j.*, CAST('discarded' AS text) AS outcome, CAST('its node went offline' AS text) AS reason
)
-- include: archive_finished
RETURNING id;

-- name: heartbeat
-- Conditional on the incarnation: no row means this node was declared offline or replaced.
UPDATE nodes SET last_heartbeat = now(), clock_skew_seconds = :skew, time_zone = :time_zone
WHERE id = :node_id AND epoch = :epoch AND status = 'online'
RETURNING now() AS db_now, clock_timestamp() AS db_clock,
          extract(timezone FROM now()) AS db_utc_offset, current_setting('TimeZone') AS db_tz;

-- name: mark_silent_nodes_offline
-- A silent node's row may be locked by its own frozen heartbeat: skipped until the server ends
-- that session (idle_in_transaction_session_timeout, a third of the threshold).
-- Silence counts from the last heartbeat or the database server's start, whichever is later:
-- while the server was down nobody could heartbeat, so a restart alone must not make the nodes
-- that were waiting for it Offline; each gets the whole threshold to heartbeat again.
UPDATE nodes n SET status = 'offline', status_changed_at = now(),
                   status_reason = 'no heartbeat for '
                                   || round(extract(epoch FROM now() - n.last_heartbeat)) || ' s'
FROM (
    SELECT id FROM nodes
    WHERE status = 'online'
      AND greatest(last_heartbeat, pg_postmaster_start_time())
          < now() - make_interval(secs => :threshold)
    FOR UPDATE SKIP LOCKED
) silent
WHERE n.id = silent.id
RETURNING n.id, n.name, extract(epoch FROM now() - n.last_heartbeat) AS silent_seconds;

-- name: requeue_orphaned_jobs
-- Running jobs whose owner incarnation is not online go back to the pool: the takeover. Rows a
-- frozen owner still has locked are taken at a later sweep, once the server ended its session.
UPDATE jobs j SET run_at = now(),
                  last_error = 'taken over: node ' || j.owner_node || ' went offline',
    -- include: unclaimed
FROM (
    SELECT x.id FROM jobs x
    WHERE x.state = 'running' AND x.target_node IS NULL
      AND NOT EXISTS (
          SELECT 1 FROM nodes n
          WHERE n.id = x.owner_node AND n.status = 'online'
            AND (x.owner_epoch IS NULL OR n.epoch = x.owner_epoch)
      )
    FOR UPDATE SKIP LOCKED
) orphan
WHERE j.id = orphan.id
RETURNING j.id;

-- name: expire_overdue_jobs
-- A running job past its deadline (plus a grace) returns to the pool whoever owns it: its owner
-- may have lost track of it (an outcome it could not record). The attempt counts as a failure:
-- retried while attempts remain, else a dead letter. The owner's late outcome is fenced out.
WITH overdue AS (
    SELECT id, attempt - released_claims >= max_attempts AS exhausted FROM jobs
    WHERE state = 'running' AND deadline < now() - make_interval(secs => :grace)
    FOR UPDATE SKIP LOCKED
), retried AS (
    UPDATE jobs j SET run_at = now(),
                      last_error = 'no outcome from node ' || j.owner_node || ' within '
                                   || j.timeout_seconds || ' s: returned to the pool',
        -- include: unclaimed
    FROM overdue o WHERE j.id = o.id AND NOT o.exhausted
    RETURNING j.id
), finished AS (
    DELETE FROM jobs j USING overdue o WHERE j.id = o.id AND o.exhausted
    RETURNING j.*, CAST('failed' AS text) AS outcome,
              'timed out: no outcome from node ' || j.owner_node || ' within '
              || j.timeout_seconds || ' s' AS reason
), failed AS (
    -- include: archive_finished
    RETURNING id
)
SELECT (SELECT count(*) FROM retried) AS retried, (SELECT count(*) FROM failed) AS failed;

-- name: leave
UPDATE nodes SET status = 'offline', status_changed_at = now(), status_reason = :reason
WHERE id = :node_id AND epoch = :epoch AND status = 'online'
RETURNING id;

-- name: release_jobs
-- Not a failure (a graceful shutdown, a node that fenced itself): the claim is refunded, so it
-- does not count against max_attempts; the attempt counter itself never goes back, and the
-- release is fenced like a completion (a job this node lost and claimed again is not touched).
UPDATE jobs j SET run_at = now(), last_error = :reason,
                  released_claims = j.released_claims + 1,
    -- include: unclaimed
FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS int[])) AS r(id, attempt)
WHERE j.id = r.id AND j.attempt = r.attempt AND j.owner_node = :node_id AND j.state = 'running'
RETURNING j.id;

-- name: list_nodes
-- silent_since: where silence counts from (see mark_silent_nodes_offline).
SELECT id, name, address, api_port, version, status, epoch, started_at, last_heartbeat,
       greatest(last_heartbeat, pg_postmaster_start_time()) AS silent_since,
       status_changed_at, status_reason, clock_skew_seconds, time_zone, now() AS db_now
FROM nodes ORDER BY id;

-- name: enqueue_jobs
WITH ins AS (
    INSERT INTO jobs (type, payload, priority, run_at, max_attempts, timeout_seconds, unique_key)
    SELECT t.type, t.payload, t.priority, coalesce(t.run_at, now() + make_interval(secs => t.delay)),
           t.max_attempts, t.timeout, t.unique_key
    FROM unnest(CAST(:types AS text[]), CAST(CAST(:payloads AS text[]) AS jsonb[]),
                CAST(:priorities AS smallint[]), CAST(:run_ats AS timestamptz[]),
                CAST(:delays AS float8[]), CAST(:max_attempts AS int[]),
                CAST(:timeouts AS float8[]), CAST(:unique_keys AS text[]))
         WITH ORDINALITY AS t(type, payload, priority, run_at, delay, max_attempts, timeout,
                              unique_key, ord)
    ORDER BY t.ord
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
    RETURNING id
)
SELECT id FROM ins ORDER BY id;

-- name: enqueue_local_job
-- One row per online node; a node that joins later starts with empty caches and is not owed one.
INSERT INTO jobs (type, payload, priority, max_attempts, timeout_seconds, target_node, unique_key)
SELECT :type, CAST(:payload AS jsonb), :priority, :max_attempts, :timeout, n.id,
       CASE WHEN CAST(:unique_key AS text) IS NULL THEN NULL ELSE :unique_key || '@' || n.id END
FROM nodes n WHERE n.status = 'online'
ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
RETURNING id;

-- name: notify_jobs
SELECT pg_notify('dsm_jobs', '');

-- name: listen_jobs
-- On a connection of its own (plain psycopg, autocommit): wakes the claim loop on notify_jobs.
LISTEN dsm_jobs;

-- name: schedule_periodic
-- The unique (name, slot) row makes one period run once across all nodes, without a leader.
WITH slot AS (
    SELECT to_timestamp(floor(extract(epoch FROM now()) / :every) * :every) AS s
), run AS (
    INSERT INTO periodic_runs (name, slot, job_id)
    SELECT :name, s, nextval('jobs_id_seq') FROM slot
    ON CONFLICT DO NOTHING
    RETURNING job_id
)
INSERT INTO jobs (id, type, payload, max_attempts, timeout_seconds)
SELECT job_id, :type, CAST(:payload AS jsonb), :max_attempts, :timeout FROM run
RETURNING id;

-- name: claim_plan
-- Transaction-local planner settings for claim_jobs: walk jobs_ready_idx in order and stop at the
-- limit. With statistics taken while the table was (nearly) empty, and autoanalyze runs at most
-- once a minute, the planner otherwise picks a bitmap scan that sorts the whole ready set on
-- every claim (measured: 20 ms instead of 1 ms per claim of 100 with 30,000 jobs ready).
SELECT set_config('enable_bitmapscan', 'off', true), set_config('enable_sort', 'off', true);

-- name: claim_jobs
-- Batched claim. Only an online node in its current incarnation claims; each claim spends an
-- attempt, which together with the owner is the fencing token for everything that follows.
WITH me AS (
    SELECT 1 FROM nodes WHERE id = :node_id AND epoch = :epoch AND status = 'online'
), picked AS (
    SELECT j.id FROM jobs j
    WHERE j.state = 'ready' AND j.run_at <= now()
      AND (j.target_node IS NULL OR j.target_node = :node_id)
      AND EXISTS (SELECT 1 FROM me)
    ORDER BY j.priority DESC, j.run_at, j.id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs j SET state = 'running', owner_node = :node_id, owner_epoch = :epoch,
                  attempt = j.attempt + 1, claimed_at = now(),
                  deadline = now() + make_interval(secs => j.timeout_seconds)
FROM picked WHERE j.id = picked.id
RETURNING j.id, j.type, j.payload, j.attempt, j.attempt - j.released_claims AS counted_attempt,
          j.max_attempts, j.timeout_seconds, j.target_node,
          extract(epoch FROM now() - j.run_at) AS waited_seconds;

-- name: finish_jobs
-- Fenced: only the owner holding the current attempt can finish a job. Successes in batches
-- (outcome 'succeeded', no error), a dead letter alone (outcome 'failed', its error).
WITH finished AS (
    DELETE FROM jobs j
    USING unnest(CAST(:ids AS bigint[]), CAST(:attempts AS int[])) AS d(id, attempt)
    WHERE j.id = d.id AND j.attempt = d.attempt AND j.owner_node = :node_id AND j.state = 'running'
    RETURNING j.*, CAST(:outcome AS text) AS outcome, CAST(:error AS text) AS reason
)
-- include: archive_finished
RETURNING id;

-- name: retry_job
-- Fenced like finish_jobs; the attempt stays spent.
UPDATE jobs j SET run_at = now() + make_interval(secs => :delay), last_error = :error,
    -- include: unclaimed
WHERE j.id = :id AND j.attempt = :attempt AND j.owner_node = :node_id AND j.state = 'running'
RETURNING j.id;

-- name: get_job
-- A job in the pool (state set, outcome NULL) or finished (outcome set, state NULL).
SELECT id, type, payload, state, NULL AS outcome, priority, attempt - released_claims AS attempt,
       max_attempts, owner_node AS node_id,
       target_node, created_at, run_at, claimed_at, NULL AS finished_at, last_error AS error, now() AS db_now
FROM jobs WHERE id = :id
UNION ALL
SELECT id, type, payload, NULL, outcome, priority, attempt, NULL, node_id,
       target_node, created_at, NULL, claimed_at, finished_at, error, now()
FROM job_history WHERE id = :id;

-- name: queue_depth
SELECT type, state, count(*) AS n FROM jobs GROUP BY type, state;

-- name: job_stats
-- Rolled-up minutes below the watermark plus the raw tail above it.
WITH w AS (SELECT rolled_until FROM job_counts_watermark),
cutoff AS (SELECT now() - make_interval(secs => :window) AS t)
SELECT s.node_id, n.name AS node, s.type, s.outcome, CAST(sum(s.n) AS bigint) AS jobs
FROM (
    SELECT c.node_id, c.type, c.outcome, c.count AS n
    FROM job_counts c, w, cutoff
    WHERE c.minute >= date_trunc('minute', cutoff.t) AND c.minute < w.rolled_until
    UNION ALL
    SELECT coalesce(h.node_id, 0), h.type, h.outcome, count(*)
    FROM job_history h, w, cutoff
    WHERE h.finished_at >= greatest(w.rolled_until, cutoff.t)
    GROUP BY 1, 2, 3
) s LEFT JOIN nodes n ON n.id = s.node_id
GROUP BY s.node_id, n.name, s.type, s.outcome
ORDER BY n.name, s.type, s.outcome;

-- name: rollup_job_counts
-- Rolls closed minutes of job_history into job_counts. One minute of margin: a completion is
-- stamped by clock_timestamp() moments before its commit, never a minute before.
WITH w AS (
    SELECT rolled_until FROM job_counts_watermark FOR UPDATE
), upto AS (
    SELECT date_trunc('minute', now() - interval '1 minute') AS t
), agg AS (
    SELECT date_trunc('minute', h.finished_at) AS minute, coalesce(h.node_id, 0) AS node_id,
           h.type, h.outcome, count(*) AS n
    FROM job_history h, w, upto
    WHERE h.finished_at >= w.rolled_until AND h.finished_at < upto.t
    GROUP BY 1, 2, 3, 4
), ins AS (
    INSERT INTO job_counts (minute, node_id, type, outcome, count)
    SELECT minute, node_id, type, outcome, n FROM agg
    ON CONFLICT (minute, node_id, type, outcome)
        DO UPDATE SET count = job_counts.count + excluded.count
    RETURNING count
), adv AS (
    UPDATE job_counts_watermark SET rolled_until = (SELECT t FROM upto)
    WHERE rolled_until < (SELECT t FROM upto)
    RETURNING rolled_until
)
SELECT (SELECT count(*) FROM ins) AS rows_written,
       CAST((SELECT coalesce(sum(n), 0) FROM agg) AS bigint) AS jobs_counted;

-- name: prune_job_history
-- Deletes finished jobs past the retention, in batches, never rows not yet rolled up.
WITH old AS (
    SELECT id FROM job_history
    WHERE finished_at < now() - make_interval(secs => :retention)
      AND finished_at < (SELECT rolled_until FROM job_counts_watermark)
    ORDER BY finished_at LIMIT :batch
)
DELETE FROM job_history h USING old WHERE h.id = old.id;

-- name: prune_job_counts
DELETE FROM job_counts WHERE minute < now() - make_interval(secs => :retention);

-- name: prune_periodic_runs
DELETE FROM periodic_runs WHERE slot < now() - make_interval(secs => :retention);

-- ---------------------------------------------------------------------------------------------
-- Lifecycle: versions, master key, users, sessions, API keys, audit, alerts, decommission.

-- name: set_cluster_version
UPDATE dsm_schema SET software_version = :version, updated_at = now();

-- name: nodes_for_version_check
SELECT id, name, version, status FROM nodes WHERE status <> 'decommissioned';

-- name: mark_upgrade_required
UPDATE nodes SET status = 'upgrade_required', status_changed_at = now(),
                 status_reason = 'cluster upgraded to ' || :version
WHERE id = ANY(CAST(:ids AS int[])) AND status <> 'decommissioned'
RETURNING name;

-- name: node_row
SELECT id, name, status, version, epoch, last_heartbeat, now() AS db_now,
       (SELECT software_version FROM dsm_schema) AS cluster_version
FROM nodes WHERE name = :name;

-- name: master_keys
-- Retired keys stay readable: a node that has not reloaded yet may still write with one.
SELECT version, wrapped_key, wrapping, wrap_params, check_value, state
FROM master_keys ORDER BY version;

-- name: insert_master_key
INSERT INTO master_keys (version, wrapped_key, wrapping, wrap_params, check_value, state)
VALUES (:version, :wrapped_key, :wrapping, CAST(:wrap_params AS jsonb), :check_value, :state);

-- name: retire_master_keys
UPDATE master_keys SET state = :to_state WHERE state = :from_state RETURNING version;

-- name: put_secret_setting
INSERT INTO secret_settings (key, ciphertext, key_version) VALUES (:key, :ciphertext, :key_version)
ON CONFLICT (key) DO UPDATE SET ciphertext = excluded.ciphertext,
                                key_version = excluded.key_version, updated_at = now();

-- name: secret_settings
SELECT key, ciphertext, key_version FROM secret_settings ORDER BY key;

-- name: secret_setting
SELECT ciphertext FROM secret_settings WHERE key = :key;

-- name: count_users
SELECT count(*) AS n FROM users;

-- name: insert_user
INSERT INTO users (username, password_hash, role, full_name, email, key_version)
VALUES (:username, :password_hash, :role, :full_name, :email, :key_version)
RETURNING id;

-- name: user_by_name
SELECT id, username, password_hash, role, full_name, email, disabled FROM users
WHERE username = :username;

-- name: list_users
SELECT id, username, role, full_name, email, disabled, created_at FROM users ORDER BY id;

-- name: users_to_reencrypt
SELECT id, username, full_name, email FROM users
WHERE key_version IS DISTINCT FROM :version AND (full_name IS NOT NULL OR email IS NOT NULL)
ORDER BY id LIMIT :batch FOR UPDATE SKIP LOCKED;

-- name: update_user_personal_data
UPDATE users SET full_name = :full_name, email = :email, key_version = :key_version WHERE id = :id;

-- name: secrets_to_reencrypt
SELECT key, ciphertext FROM secret_settings WHERE key_version <> :version
ORDER BY key LIMIT :batch FOR UPDATE SKIP LOCKED;

-- name: rows_not_under_key
SELECT (SELECT count(*) FROM secret_settings WHERE key_version <> :version)
     + (SELECT count(*) FROM users WHERE key_version IS DISTINCT FROM :version
                                     AND (full_name IS NOT NULL OR email IS NOT NULL))
     + (SELECT count(*) FROM agent_ca WHERE key_version <> :version) AS n;

-- name: lock_encrypted_tables
-- While a rotation checks that nothing is left under the old key, nobody may write under it.
LOCK TABLE secret_settings, users, agent_ca IN SHARE MODE;

-- name: set_password_hash
UPDATE users SET password_hash = :password_hash WHERE id = :id;

-- name: insert_session
INSERT INTO sessions (token_hash, user_id, created_on, expires_at)
VALUES (:token_hash, :user_id, :node, now() + make_interval(secs => :ttl))
RETURNING expires_at;

-- name: session_user
-- Sliding expiry is not used: a session ends at expires_at whatever the activity.
UPDATE sessions s SET last_seen_at = now()
FROM users u
WHERE s.token_hash = :token_hash AND s.expires_at > now() AND u.id = s.user_id AND NOT u.disabled
RETURNING u.username, u.role;

-- name: delete_session
DELETE FROM sessions WHERE token_hash = :token_hash RETURNING user_id;

-- name: insert_api_key
INSERT INTO api_keys (name, key_hash, role) VALUES (:name, :key_hash, :role)
ON CONFLICT DO NOTHING
RETURNING id;

-- name: api_key_user
UPDATE api_keys SET last_used_at = now()
WHERE key_hash = :key_hash AND revoked_at IS NULL
RETURNING name, role;

-- name: advisory_xact_lock
-- A lock held until the transaction ends: sign-in attempts that share a user name or a source
-- address (auth.py), and changes to the cluster settings (settings_store.py).
SELECT pg_advisory_xact_lock(:key);

-- name: reserve_sign_in_attempt
-- Under the locks above: reserves a failure slot when fewer than :max_failures failures of this
-- user name or source are recent, else returns a NULL id and when to retry. The slot is deleted by
-- clear_sign_in_failures when the password turns out right.
WITH recent AS (
    SELECT count(*) AS n, max(at) AS last FROM sign_in_failures
    WHERE (username = :username OR source = :source)
      AND at > now() - make_interval(secs => :window)
), reserved AS (
    INSERT INTO sign_in_failures (username, source)
    SELECT :username, :source FROM recent WHERE recent.n < :max_failures
    RETURNING id
)
SELECT (SELECT id FROM reserved) AS id,
       extract(epoch FROM recent.last + make_interval(secs => :window) - now()) AS retry_after
FROM recent;

-- name: clear_sign_in_failures
DELETE FROM sign_in_failures WHERE username = :username OR at < now() - interval '1 day';

-- name: audit
INSERT INTO audit_log (actor, node, action, target, detail, source)
VALUES (:actor, :node, :action, :target, CAST(:detail AS jsonb), :source);

-- name: list_audit
SELECT id, at, actor, node, action, target, detail, source FROM audit_log
ORDER BY id DESC LIMIT :limit;

-- name: decommission_node
-- Only an Offline node (recorded so, or silent past the threshold, counted as in
-- mark_silent_nodes_offline) can be decommissioned.
UPDATE nodes SET status = 'decommissioned', status_changed_at = now(),
                 status_reason = 'decommissioned by ' || :actor
WHERE name = :name
  AND (status IN ('offline', 'upgrade_required')
       OR (status = 'online'
           AND greatest(last_heartbeat, pg_postmaster_start_time())
               < now() - make_interval(secs => :threshold)))
RETURNING id;

-- name: record_clock
UPDATE nodes SET clock_skew_seconds = :skew, time_zone = :time_zone WHERE id = :node_id;

-- name: raise_alert
INSERT INTO alerts (type, node_id, message) VALUES (:type, :node_id, :message)
ON CONFLICT (type, node_id) WHERE cleared_at IS NULL DO UPDATE SET message = excluded.message
RETURNING (xmax = 0) AS new;

-- name: clear_alert
UPDATE alerts SET cleared_at = now()
WHERE type = :type AND node_id = :node_id AND cleared_at IS NULL
RETURNING id;

-- name: list_alerts
SELECT a.id, a.type, n.name AS node, a.message, a.raised_at, a.cleared_at
FROM alerts a JOIN nodes n ON n.id = a.node_id
WHERE a.cleared_at IS NULL OR :include_cleared
ORDER BY a.id DESC;

-- name: job_activity_by_minute
-- Jobs finished per node and minute over the window (rolled-up minutes plus the raw tail, as in
-- job_stats), for the console's activity graph; minutes by the database's clock.
WITH w AS (SELECT rolled_until FROM job_counts_watermark),
cutoff AS (SELECT date_trunc('minute', now() - make_interval(secs => :window)) AS t)
SELECT s.node_id, n.name AS node, s.minute, CAST(sum(s.n) AS bigint) AS jobs
FROM (
    SELECT c.node_id, c.minute, c.count AS n
    FROM job_counts c, w, cutoff
    WHERE c.minute >= cutoff.t AND c.minute < w.rolled_until
    UNION ALL
    SELECT coalesce(h.node_id, 0), date_trunc('minute', h.finished_at), count(*)
    FROM job_history h, w, cutoff
    WHERE h.finished_at >= greatest(w.rolled_until, cutoff.t)
    GROUP BY 1, 2
) s LEFT JOIN nodes n ON n.id = s.node_id
GROUP BY s.node_id, n.name, s.minute
ORDER BY 2, 3;

-- ---------------------------------------------------------------------------------------------
-- Agents (dsm_node.agents.store). Agent liveness uses the database's now(), like the nodes'.

-- name: agent_ca
SELECT certificate, private_key, key_version FROM agent_ca;

-- name: insert_agent_ca
INSERT INTO agent_ca (certificate, private_key, key_version)
VALUES (:certificate, :private_key, :key_version)
ON CONFLICT (singleton) DO NOTHING;

-- name: agent_ca_to_reencrypt
SELECT private_key FROM agent_ca WHERE key_version <> :version FOR UPDATE;

-- name: update_agent_ca_key
UPDATE agent_ca SET private_key = :private_key, key_version = :key_version;

-- name: set_heartbeat_port
UPDATE nodes SET heartbeat_port = :port WHERE id = :node_id;

-- name: agent_managers
-- The heartbeat addresses of Online nodes (recorded online and heard from within the threshold).
SELECT address, heartbeat_port FROM nodes
WHERE status = 'online' AND heartbeat_port IS NOT NULL
  AND last_heartbeat >= now() - make_interval(secs => :threshold)
ORDER BY address, heartbeat_port;

-- name: insert_activation_token
INSERT INTO activation_tokens (secret_hash, description, max_uses, expires_at, created_by)
VALUES (:secret_hash, :description, :max_uses, now() + make_interval(secs => :expires_in),
        :created_by)
RETURNING id, expires_at;

-- name: list_activation_tokens
SELECT id, description, uses, max_uses, expires_at, created_at, created_by, revoked_at,
       expires_at <= now() AS expired
FROM activation_tokens ORDER BY id DESC LIMIT :limit;

-- name: revoke_activation_token
UPDATE activation_tokens SET revoked_at = now() WHERE id = :id AND revoked_at IS NULL
RETURNING id;

-- name: use_activation_token
-- One statement: concurrent activations can never use a token more often than it allows.
UPDATE activation_tokens SET uses = uses + 1
WHERE id = :id AND secret_hash = :secret_hash AND revoked_at IS NULL AND expires_at > now()
  AND uses < max_uses
RETURNING id;

-- name: activation_token_state
SELECT secret_hash, uses, max_uses, expires_at <= now() AS expired,
       revoked_at IS NOT NULL AS revoked
FROM activation_tokens WHERE id = :id;

-- name: next_agent_id
SELECT nextval('agents_id_seq') AS id;

-- name: insert_agent
INSERT INTO agents (id, hostname, cert_serial, cert_not_after, token_id, activated_on)
VALUES (:id, :hostname, :cert_serial, :cert_not_after, :token_id, :activated_on);

-- name: record_heartbeats
-- Group commit: many agents' heartbeats in one statement. An agent's heartbeat is recorded only
-- when its certificate is the one on record and not revoked, and its events leave no gap; its
-- events are stored once per (agent, seq), skipping those already acknowledged (a retry after a
-- lost answer). Rows are locked in id order, so concurrent batches on several nodes never
-- deadlock. Nothing is returned for a refused heartbeat (heartbeat_refusals says why).
WITH hb AS (
    SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:serials AS bigint[]),
                         CAST(:first_seqs AS bigint[]), CAST(:last_seqs AS bigint[]),
                         CAST(:statuses AS text[]), CAST(:messages AS text[]),
                         CAST(:versions AS text[]), CAST(CAST(:counters AS text[]) AS jsonb[]),
                         CAST(:clocks AS float8[]), CAST(:fingerprints AS text[]))
         AS t(id, serial, first_seq, last_seq, status, message, version, counters, clock,
              fingerprint)
), locked AS (
    SELECT a.id, a.acked_seq FROM agents a JOIN hb ON hb.id = a.id
    WHERE a.cert_serial = hb.serial AND a.status <> 'deactivated'
      AND (hb.first_seq IS NULL OR hb.first_seq <= a.acked_seq + 1)
    ORDER BY a.id
    FOR UPDATE OF a
), updated AS (
    UPDATE agents a
    SET last_heartbeat = now(), last_node = :node_id, heartbeats = a.heartbeats + 1,
        acked_seq = greatest(l.acked_seq, coalesce(hb.last_seq, 0)),
        status = 'online',
        status_changed_at = CASE WHEN a.status = 'online' THEN a.status_changed_at ELSE now() END,
        agent_status = hb.status, status_message = hb.message, agent_version = hb.version,
        counters = hb.counters,
        clock_skew_seconds = hb.clock - CAST(extract(epoch FROM now()) AS float8),
        config_fingerprint = hb.fingerprint
    FROM locked l JOIN hb ON hb.id = l.id
    WHERE a.id = l.id
    RETURNING a.id, a.acked_seq
), stored AS (
    INSERT INTO agent_events (agent_id, seq, type, agent_time, data, node_id)
    SELECT e.agent_id, e.seq, e.type, e.at, e.data, :node_id
    FROM unnest(CAST(:e_agents AS bigint[]), CAST(:e_seqs AS bigint[]), CAST(:e_types AS text[]),
                CAST(:e_ats AS float8[]), CAST(CAST(:e_datas AS text[]) AS jsonb[]))
         AS e(agent_id, seq, type, at, data)
    JOIN locked l ON l.id = e.agent_id
    WHERE e.seq > l.acked_seq
    ON CONFLICT (agent_id, seq) DO NOTHING
    RETURNING 1
)
SELECT u.id, u.acked_seq, (SELECT count(*) FROM stored) AS stored FROM updated u;

-- name: heartbeat_refusals
SELECT id, cert_serial, status, acked_seq FROM agents WHERE id = ANY(CAST(:ids AS bigint[]));

-- name: list_agents
SELECT a.id, a.hostname, a.status, a.status_changed_at, a.activated_at, a.activated_on,
       a.last_heartbeat, n.name AS last_node, a.heartbeats, a.acked_seq, a.agent_status,
       a.status_message, a.agent_version, a.clock_skew_seconds, a.config_fingerprint,
       a.counters, a.cert_not_after, a.deactivated_at, now() AS db_now
FROM agents a LEFT JOIN nodes n ON n.id = a.last_node
WHERE (CAST(:status AS text) IS NULL OR a.status = :status)
  AND (CAST(:agent_id AS bigint) IS NULL OR a.id = :agent_id)
ORDER BY a.id LIMIT :limit;

-- name: agent_status_counts
SELECT status, count(*) AS n FROM agents GROUP BY status ORDER BY status;

-- name: deactivate_agent
-- Revokes the agent's certificate on every node at once: every heartbeat checks this row in its
-- own transaction (record_heartbeats), so none is recorded after this commits.
UPDATE agents SET status = 'deactivated', deactivated_at = now(), status_changed_at = now()
WHERE id = :id AND status <> 'deactivated'
RETURNING id, hostname;

-- name: agent_events
SELECT e.seq, e.type, e.agent_time, e.data, e.received_at, n.name AS node
FROM agent_events e LEFT JOIN nodes n ON n.id = e.node_id
WHERE e.agent_id = :agent_id AND e.seq > :after
ORDER BY e.seq LIMIT :limit;

-- name: mark_silent_agents_offline
WITH gone AS (
    UPDATE agents SET status = 'offline', status_changed_at = now()
    WHERE status = 'online' AND :missed > 0
      -- as for nodes: while the database was down no agent could heartbeat, so silence counts
      -- from the last heartbeat or the server's start, whichever is later
      AND greatest(last_heartbeat, pg_postmaster_start_time())
          < now() - make_interval(secs => :interval * :missed)
    RETURNING id, hostname, last_heartbeat
), alerted AS (
    INSERT INTO agent_alerts (type, agent_id, message)
    SELECT 'Agent Offline', id,
           hostname || ': no heartbeat for '
           || round(extract(epoch FROM now() - last_heartbeat)) || ' s'
    FROM gone
    ON CONFLICT (type, agent_id) WHERE cleared_at IS NULL DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS offline, (SELECT count(*) FROM alerted) AS alerted;

-- name: clear_agent_offline_alerts
UPDATE agent_alerts al SET cleared_at = now()
FROM agents a
WHERE al.agent_id = a.id AND al.type = 'Agent Offline' AND al.cleared_at IS NULL
  AND a.status <> 'offline'
RETURNING al.id;

-- name: raise_agent_clock_alerts
INSERT INTO agent_alerts (type, agent_id, message)
SELECT 'Agent Clock Out of Sync', id,
       hostname || ': clock differs from the database''s by '
       || round(CAST(clock_skew_seconds AS numeric), 1) || ' s'
FROM agents WHERE status = 'online' AND abs(clock_skew_seconds) > :limit
ON CONFLICT (type, agent_id) WHERE cleared_at IS NULL DO NOTHING
RETURNING id;

-- name: clear_agent_clock_alerts
UPDATE agent_alerts al SET cleared_at = now()
FROM agents a
WHERE al.agent_id = a.id AND al.type = 'Agent Clock Out of Sync' AND al.cleared_at IS NULL
  AND (a.status = 'deactivated'
       OR (a.status = 'online' AND abs(coalesce(a.clock_skew_seconds, 0)) <= :limit))
RETURNING al.id;

-- name: list_agent_alerts
SELECT al.id, al.type, al.agent_id, a.hostname, al.message, al.raised_at, al.cleared_at
FROM agent_alerts al JOIN agents a ON a.id = al.agent_id
WHERE al.cleared_at IS NULL OR :include_cleared
ORDER BY al.id DESC LIMIT :limit;

-- name: prune_agent_events
DELETE FROM agent_events
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM agent_events
    WHERE received_at < now() - make_interval(secs => :retention)
    LIMIT :batch
));

-- name: prune_agent_alerts
DELETE FROM agent_alerts
WHERE cleared_at < now() - make_interval(secs => :retention);

-- ---------------------------------------------------------------------------------------------
-- Server administration (dsm up's embedded server): plain psycopg, outside any transaction.

-- name: database_exists
SELECT 1 FROM pg_database WHERE datname = :name;

-- name: create_database
-- {database} is an identifier quoted by db.admin (CREATE DATABASE takes no bind parameters).
CREATE DATABASE {database};

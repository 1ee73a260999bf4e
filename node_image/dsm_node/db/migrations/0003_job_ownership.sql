-- 0003: who holds a running job, precisely, and which claims do not count as attempts.
--
-- owner_epoch: the incarnation of owner_node that claimed the job. A node that restarts (or is
-- declared offline and rejoins) keeps its id but gets a new epoch; jobs still marked running under
-- an earlier incarnation are orphans, and the sweep returns them to the pool even though a node
-- with that id is online again. NULL for jobs claimed before this migration (any incarnation).
--
-- released_claims: claims that ended in a release rather than a failure (a graceful shutdown, a
-- node that fenced itself). The attempt counter keeps counting every claim, because
-- (owner_node, attempt) is the fencing token and must never repeat; attempts counted against
-- max_attempts are attempt - released_claims.
ALTER TABLE jobs
    ADD COLUMN owner_epoch bigint,
    ADD COLUMN released_claims integer NOT NULL DEFAULT 0;

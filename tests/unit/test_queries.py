"""queries.sql: one named statement per block, and each job state transition written once (a
fragment that several statements include), expanded when the file is loaded."""

from __future__ import annotations

import pytest

from dsm_node.db.queries import Q, parse

FILE = """
-- fragment: tail
-- a fragment's comments are dropped
c = 3

-- name: one
UPDATE t SET a = 1,
    -- include: tail
WHERE x = :x;

-- name: two
UPDATE t SET b = 2,
    -- include: tail
;
"""


def test_fragments_are_included_with_the_including_lines_indent() -> None:
    assert parse(FILE) == {
        "one": "UPDATE t SET a = 1,\n    c = 3\nWHERE x = :x",
        "two": "UPDATE t SET b = 2,\n    c = 3",
    }
    assert "tail" not in parse(FILE), "a fragment is not a statement"


def test_an_unknown_fragment_or_a_name_used_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fragment 'nope'"):
        parse("-- name: a\nSELECT 1\n-- include: nope\n")
    with pytest.raises(ValueError, match="defined twice"):
        parse("-- fragment: a\nx\n-- name: a\nSELECT 1\n")


def test_every_way_a_job_leaves_the_pool_archives_it_the_same_way() -> None:
    archive = "INSERT INTO job_history"
    finishing = {name for name, sql in Q.sql.items() if "DELETE FROM jobs" in sql}
    assert finishing == {
        "finish_jobs",
        "discard_local_jobs_of_nodes",
        "discard_orphaned_local_jobs",
        "expire_overdue_jobs",
    }
    bodies = {Q.sql[n][Q.sql[n].index(archive) :].split("FROM finished")[0] for n in finishing}
    assert len({" ".join(b.split()) for b in bodies}) == 1, "one definition of the archive"
    assert sum(archive in sql for sql in Q.sql.values()) == len(finishing)


def test_every_way_a_running_job_returns_to_the_pool_unclaims_it_the_same_way() -> None:
    unclaimed = "state = 'ready', owner_node = NULL, owner_epoch = NULL, claimed_at = NULL"
    updates = {n for n, sql in Q.sql.items() if "UPDATE jobs" in sql}
    returning = updates - {"claim_jobs"}  # the one update that takes a job out of the pool
    assert returning == {
        "retry_job",
        "release_jobs",
        "requeue_jobs_of_node",
        "requeue_orphaned_jobs",
        "expire_overdue_jobs",
    }
    assert all(unclaimed in Q.sql[n] for n in returning)


def test_plain_psycopg_binds() -> None:
    assert Q.psycopg("database_exists") == "SELECT 1 FROM pg_database WHERE datname = %(name)s"

-- Test-only migration: the "next version" of the product adds a table and a column.
CREATE TABLE test_agent_groups (
    id   serial PRIMARY KEY,
    name text NOT NULL UNIQUE
);
ALTER TABLE job_history ADD COLUMN test_upgrade_marker text;

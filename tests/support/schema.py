"""A readable snapshot of a database's schema, to compare what the migrations build with the
committed ``node_image/dsm_node/db/schema.txt``.

Regenerate after adding a migration:

    python -m tests.support.schema postgresql://... > node_image/dsm_node/db/schema.txt
"""

from __future__ import annotations

import sys

import psycopg

COLUMNS = """
SELECT c.table_name, c.column_name, c.data_type, c.is_nullable, coalesce(c.column_default, '')
FROM information_schema.columns c
WHERE c.table_schema = 'public'
ORDER BY c.table_name, c.ordinal_position
"""
INDEXES = "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexname"
CONSTRAINTS = """
SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2
"""
OPTIONS = """
SELECT relname, array_to_string(reloptions, ',') FROM pg_class
WHERE relnamespace = 'public'::regnamespace AND reloptions IS NOT NULL ORDER BY 1
"""


def snapshot(url: str) -> str:
    out: list[str] = []
    with psycopg.connect(url) as conn:
        table = None
        for t, col, typ, nullable, default in conn.execute(COLUMNS):
            if t != table:
                out.append(f"table {t}")
                table = t
            null = "" if nullable == "YES" else " not null"
            out.append(f"    {col} {typ}{null}" + (f" default {default}" if default else ""))
        out += [f"index {d}" for (d,) in conn.execute(INDEXES)]
        out += [f"constraint {t}.{n} {d}" for t, n, d in conn.execute(CONSTRAINTS)]
        out += [f"options {t} {o}" for t, o in conn.execute(OPTIONS)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(snapshot(sys.argv[1]))

"""Administration of a PostgreSQL server the node does not own the schema of: creating the
database ``dsm up`` runs its cluster on (on its embedded server, or a server the user named)."""

from __future__ import annotations

import psycopg
from psycopg import sql

from dsm_node.db.queries import Q


def create_database(admin_url: str, name: str) -> bool:
    """Creates database ``name`` unless it exists; returns whether it was created."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if conn.execute(Q.psycopg("database_exists"), {"name": name}).fetchone() is not None:
            return False
        statement = sql.SQL(Q.sql["create_database"]).format(database=sql.Identifier(name))
        conn.execute(statement)
        return True

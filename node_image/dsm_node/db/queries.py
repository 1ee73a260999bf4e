"""Loads the named statements of ``queries.sql``; ``Q.claim_jobs`` is a ready SQLAlchemy text().

A ``-- name: x`` block is a statement. A ``-- fragment: x`` block is a piece of SQL that several
statements share, so that a state transition is written once (how a finished job is archived, how a
running job returns to the pool); a statement pulls it in with a line ``-- include: x``. Fragments
are expanded when the file is loaded: the database sees plain statements.
"""

from __future__ import annotations

import re
from importlib import resources

from sqlalchemy import TextClause, text

_BLOCK = re.compile(r"^-- (name|fragment): (\w+)\s*$", re.MULTILINE)
_BIND = re.compile(r"(?<![:\w]):(\w+)")
_INCLUDE = re.compile(r"^(\s*)-- include: (\w+)\s*$")


def _code(body: str) -> list[str]:
    return [ln for ln in body.splitlines() if ln.strip() and not ln.lstrip().startswith("--")]


def parse(sql: str) -> dict[str, str]:
    """Splits a file of ``-- name: x`` blocks into {name: statement}, with fragments included."""
    parts = _BLOCK.split(sql)
    fragments: dict[str, list[str]] = {}
    bodies: dict[str, str] = {}
    for kind, name, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        if name in fragments or name in bodies:
            raise ValueError(f"query {name!r} is defined twice")
        if kind == "fragment":
            fragments[name] = _code(body)
        else:
            bodies[name] = body
    out: dict[str, str] = {}
    for name, body in bodies.items():
        lines: list[str] = []
        for ln in body.strip().splitlines():
            if m := _INCLUDE.match(ln):
                if m.group(2) not in fragments:
                    raise ValueError(f"query {name!r} includes unknown fragment {m.group(2)!r}")
                lines += [m.group(1) + f for f in fragments[m.group(2)]]
            elif not ln.lstrip().startswith("--"):
                lines.append(ln)
        out[name] = "\n".join(lines).strip().rstrip(";").rstrip()
    return out


class _Queries:
    def __init__(self) -> None:
        raw = resources.files("dsm_node.db").joinpath("queries.sql").read_text()
        self.sql = parse(raw)
        self._text = {name: text(stmt) for name, stmt in self.sql.items()}

    def psycopg(self, name: str) -> str:
        """The statement for plain psycopg: ``:name`` binds become ``%(name)s``."""
        return _BIND.sub(r"%(\1)s", self.sql[name].replace("%", "%%"))

    def __getattr__(self, name: str) -> TextClause:
        try:
            return self._text[name]
        except KeyError:
            raise AttributeError(f"no query named {name!r} in queries.sql") from None


Q = _Queries()

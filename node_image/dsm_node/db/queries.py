"""Loads the named statements of ``queries.sql``; ``Q.claim_jobs`` is a ready SQLAlchemy text()."""

from __future__ import annotations

import re
from importlib import resources

from sqlalchemy import TextClause, text

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def parse(sql: str) -> dict[str, str]:
    """Splits a file of ``-- name: x`` blocks into {name: statement}."""
    parts = _NAME.split(sql)
    out: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [ln for ln in body.strip().splitlines() if not ln.lstrip().startswith("--")]
        statement = "\n".join(lines).strip().rstrip(";")
        if name in out:
            raise ValueError(f"query {name!r} is defined twice")
        out[name] = statement
    return out


class _Queries:
    def __init__(self) -> None:
        raw = resources.files("dsm_node.db").joinpath("queries.sql").read_text()
        self.sql = parse(raw)
        self._text = {name: text(stmt) for name, stmt in self.sql.items()}

    def __getattr__(self, name: str) -> TextClause:
        try:
            return self._text[name]
        except KeyError:
            raise AttributeError(f"no query named {name!r} in queries.sql") from None


Q = _Queries()

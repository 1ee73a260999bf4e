"""Who may do what: the roles a user or an API key holds, from least to most privileged.

An ``auditor`` reads everything an administrator reads except secrets and users' personal data,
and changes nothing; an ``administrator`` may do everything. Every API route and every job type
names the least role it needs; a role allows everything a lower role does.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """``users.role`` and ``api_keys.role`` as stored."""

    AUDITOR = "auditor"
    ADMINISTRATOR = "administrator"


AUDITOR = Role.AUDITOR
ADMINISTRATOR = Role.ADMINISTRATOR
ROLES = (AUDITOR, ADMINISTRATOR)  # ascending privilege


def allows(role: str, required: str) -> bool:
    """True when ``role`` may do what ``required`` is needed for (unknown roles allow nothing)."""
    if required not in ROLES:
        raise ValueError(f"unknown role {required!r}; roles are {', '.join(ROLES)}")
    return role in ROLES and ROLES.index(role) >= ROLES.index(required)


def article(role: str) -> str:
    """'an administrator', 'an auditor' (for messages)."""
    return f"an {role}" if role[:1] in "aeiou" else f"a {role}"

"""Which objects are ours: the rule that keeps the operator off everything it did not create.

A child of a ``DeepSecurityManager`` is an object whose *controller* owner reference carries the
resource's uid -- not one that merely has the expected name, labels or an owner reference of the
right kind (a resource deleted and re-created under the same name has a new uid, and its
predecessor's children are not its own). The operator writes and deletes only such objects:

- a child that does not exist is *created* (a create fails when anything of that name exists, so
  no object appearing between the check and the write is taken over);
- a child that exists is applied only when it is ours, with its uid pinned in the applied body
  (the API server refuses the write if the name now belongs to another object);
- a child the spec switched off is deleted only when it is ours, with a uid precondition.

Anything else of a child's name is somebody else's: the operator reports it (``Degraded``,
reason ``OwnershipConflict``, and an Event) and takes no action until it is renamed or removed.
Pure: bodies in, decisions out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def controller_uid(body: Mapping[str, Any] | None) -> str | None:
    """The uid in the object's controller owner reference, or ``None`` when it has none."""
    for ref in ((body or {}).get("metadata") or {}).get("ownerReferences") or ():
        if ref.get("controller"):
            return str(ref.get("uid") or "") or None
    return None


def is_ours(body: Mapping[str, Any] | None, owner_uid: str) -> bool:
    """Whether ``body`` is controlled by the resource with ``owner_uid``."""
    return body is not None and controller_uid(body) == owner_uid


def uid_of(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("uid") or "")


@dataclasses.dataclass(frozen=True)
class Conflict:
    """An object that has a child's name and is not ours."""

    kind: str
    name: str
    controller: str | None
    """The uid of whatever controls it, ``None`` when nothing does."""

    @property
    def message(self) -> str:
        who = "no controller" if self.controller is None else f"controller uid {self.controller}"
        return (
            f"{self.kind} {self.name} exists and is not controlled by this DeepSecurityManager "
            f"({who}); the operator does not touch it: rename or remove it"
        )


def conflict(body: Mapping[str, Any], kind: str, owner_uid: str) -> Conflict | None:
    """A :class:`Conflict` when the existing object ``body`` is not ours, else ``None``."""
    if is_ours(body, owner_uid):
        return None
    name = str((body.get("metadata") or {}).get("name") or "")
    return Conflict(kind=kind, name=name, controller=controller_uid(body))


def pinned(manifest: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    """``manifest`` with the live object's uid: an apply that reaches another object (the name
    was freed and taken in between) is refused by the API server (uid is immutable)."""
    result = dict(manifest)
    result["metadata"] = {**manifest["metadata"], "uid": uid_of(live)}
    return result

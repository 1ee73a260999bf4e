"""The API server's audit log, read back: who deleted which pod, who wrote which object.

Why: a test of an operator must judge the operator by what *it* did. Watching pods shows every
deletion, whoever sent it -- and kwok, standing in for kubelets, sends deletions of its own. The
audit log (policy in ``controlplane.AUDIT_POLICY``) names the client of every request (user, user
agent), the pod it hit (the uid in the response) and the uid precondition it carried, so a test
can pick out the operator's own deletions and check each hit the pod it meant.

The API server writes an event before it answers the request (``--audit-log-mode=blocking``), so
a deletion the caller has seen succeed is already in the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Request:
    """One audited request (stage ResponseComplete)."""

    verb: str
    resource: str
    namespace: str
    name: str
    user: str
    user_agent: str
    code: int
    precondition_uid: str | None
    """The uid precondition a DELETE carried (``preconditions.uid``), if any."""
    hit_uid: str | None
    """The uid of the object the request acted on, from the response body (pod deletions)."""
    time: str


def _request(event: dict[str, Any]) -> Request | None:
    ref = event.get("objectRef") or {}
    if event.get("stage") != "ResponseComplete" or not ref.get("name"):
        return None
    body = event.get("requestObject") or {}
    response = event.get("responseObject") or {}
    hit = (response.get("metadata") or {}).get("uid") if response.get("kind") == "Pod" else None
    return Request(
        verb=str(event.get("verb")),
        resource=str(ref.get("resource")),
        namespace=str(ref.get("namespace") or ""),
        name=str(ref["name"]),
        user=str((event.get("user") or {}).get("username") or ""),
        user_agent=str(event.get("userAgent") or ""),
        code=int((event.get("responseStatus") or {}).get("code") or 0),
        precondition_uid=(body.get("preconditions") or {}).get("uid"),
        hit_uid=hit,
        time=str(event.get("stageTimestamp") or ""),
    )


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def requests(self, namespace: str) -> Iterator[Request]:
        """Every audited request in ``namespace``, in the order the API server logged them."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return
        for line in lines:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line still being written
            request = _request(event)
            if request is not None and request.namespace == namespace:
                yield request

    def pod_deletions(self, namespace: str, *, user_agent: str | None = None) -> list[Request]:
        """Successful pod DELETEs in ``namespace``; only those of one client when ``user_agent``
        (a prefix) is given."""
        return [
            r
            for r in self.requests(namespace)
            if r.resource == "pods"
            and r.verb == "delete"
            and 200 <= r.code < 300
            and (user_agent is None or r.user_agent.startswith(user_agent))
        ]

    def writes(self, namespace: str, resource: str, name: str) -> list[Request]:
        """Create, update, patch and delete requests on one object (any outcome)."""
        return [
            r
            for r in self.requests(namespace)
            if r.resource == resource
            and r.name == name
            and r.verb in ("create", "update", "patch", "delete")
        ]

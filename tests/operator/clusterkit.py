"""Helpers shared by the operator's cluster-tier tests (not a test module, not a conftest)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def manager_body(name: str = "mgr", **spec: Any) -> dict[str, Any]:
    """A valid DeepSecurityManager; keyword arguments replace top-level spec fields."""
    base: dict[str, Any] = {
        "version": "20.0.1",
        "nodes": 1,
        "database": {"secretRef": {"name": "dsm-db"}},
        "masterKey": {"localSecretRef": {"name": "dsm-master-key"}},
    }
    base.update(spec)
    return {
        "apiVersion": "security.dsm.dev/v1alpha1",
        "kind": "DeepSecurityManager",
        "metadata": {"name": name},
        "spec": {k: v for k, v in base.items() if v is not None},
    }


def wait_for(
    predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f} s waiting for {what or predicate}: {last!r}"
    )

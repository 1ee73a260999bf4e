"""A pod watch that records every event of one namespace in API order, on a thread.

Shared by the tests that check ordering through the real controllers (the StatefulSet tier and the
operator's cluster tests): the assertions read the recorded log, never sleep on a controller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import watch as watching

watch: Any = watching  # its annotations differ between client releases


@dataclass(frozen=True)
class PodEvent:
    type: str
    name: str
    ready: bool
    deleting: bool
    pod_ip: str | None
    revision: str | None = None  # the pod's controller-revision-hash label


class PodEvents:
    """Records pod watch events of one namespace in API order, on a thread, until stopped."""

    def __init__(self, core: Any, namespace: str) -> None:
        self._core = core
        self._namespace = namespace
        self._events: list[PodEvent] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        rv = core.list_namespaced_pod(namespace).metadata.resource_version
        self._thread = threading.Thread(target=self._run, args=(rv,), daemon=True)
        self._thread.start()

    def _run(self, resource_version: str) -> None:
        try:
            while not self._stop.is_set():
                w = watch.Watch()
                for event in w.stream(
                    self._core.list_namespaced_pod,
                    self._namespace,
                    resource_version=resource_version,
                    timeout_seconds=1,
                ):
                    pod = event["object"]
                    resource_version = pod.metadata.resource_version
                    ready = any(
                        c.type == "Ready" and c.status == "True"
                        for c in (pod.status.conditions or [])
                    )
                    recorded = PodEvent(
                        event["type"],
                        pod.metadata.name,
                        ready,
                        pod.metadata.deletion_timestamp is not None,
                        pod.status.pod_ip,
                        (pod.metadata.labels or {}).get("controller-revision-hash"),
                    )
                    with self._changed:
                        self._events.append(recorded)
                        self._changed.notify_all()
        except BaseException as exc:  # handed to the test thread by wait_for
            with self._changed:
                self._error = exc
                self._changed.notify_all()

    def snapshot(self) -> list[PodEvent]:
        with self._changed:
            if self._error is not None:
                raise self._error
            return list(self._events)

    def wait_for(
        self, what: str, check: Callable[[list[PodEvent]], bool], timeout: float = 30
    ) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not check(self._events):
                if self._error is not None:
                    raise self._error
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(
                        f"timed out after {timeout:.0f} s waiting for {what}: {self._events}"
                    )
                self._changed.wait(left)

    def assert_no_event(self, name: str, seconds: float) -> None:
        """Fail if an event for pod ``name`` arrives within ``seconds`` (bounded negative check)."""
        deadline = time.monotonic() + seconds
        with self._changed:
            while (left := deadline - time.monotonic()) > 0:
                if self._error is not None:
                    raise self._error
                seen = [e for e in self._events if e.name == name]
                assert not seen, f"unexpected events for {name}: {seen}"
                self._changed.wait(left)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

"""A mini kubelet: pods bound to one registered Node run as real local processes.

kwok would mark pods Ready by itself, which fakes exactly what the e2e tier must show (nodes that
become Ready when -- and only when -- the node runtime says so). Instead this registers its own
Node (label ``dsm-e2e=true``; no kwok annotation, so kwok ignores it; taint
``dsm-e2e=true:NoSchedule``, so pods of other tiers sharing the control plane never land on it),
keeps its Lease and Ready condition fresh, and for every pod the scheduler binds to it:

- gives it a loopback pod IP of its own (127.64-127.x.y, checked free by binding; kwok uses
  127.1/16 and Services 127.2/16), so every node process binds only its own address;
- writes its Secret / ConfigMap volumes into a directory and rewrites environment values and
  arguments that point into a ``mountPath`` to that directory;
- resolves ``env`` (value with ``$(VAR)`` expansion, secretKeyRef, configMapKeyRef, fieldRef
  metadata.name / metadata.namespace / metadata.uid / spec.nodeName / status.podIP / status.hostIP)
  and ``envFrom``;
- runs the container's command (mapped through :attr:`MiniKubelet.commands`, e.g. ``dsm`` ->
  ``python -m dsm_node``) in a clean environment plus :attr:`MiniKubelet.extra_env`, rules
  (:meth:`MiniKubelet.add_env_rule`) and the pod IP in :attr:`MiniKubelet.pod_ip_env`, one log
  file per process -- or, for a pod whose image belongs to :attr:`MiniKubelet.container_images`,
  runs that image in podman with the pod's environment, volumes and securityContext
  (:mod:`tests.k8s.containers`);
- writes the pod status through the status subresource (phase, IPs, conditions,
  containerStatuses) with Ready driven by REALLY running the readiness probe (httpGet, HTTPS
  without verification, or tcpSocket); the startup probe gates readiness and liveness as in a
  kubelet; liveness failures past ``failureThreshold`` restart the process;
- restarts an exited process (restartPolicy Always) with restartCount+1 and a backoff of
  1, 2, 4, 8, 10, 10 ... s;
- on deletion: SIGTERM, up to the grace period, SIGKILL, then deletes the pod with
  ``gracePeriodSeconds=0`` and a uid precondition, as a kubelet does.

Not simulated (documented in docs/e2e.md): cgroups / resource limits, ``runAsUser`` for local
processes (they run as the test's user), image pulls (a local process ignores the ``image``; a
container's image must be present), init and sidecar containers
(only the first container runs), exec probes (count as success), emptyDir is a plain directory,
projected / downward-API volumes. Probe periods are capped at :attr:`MiniKubelet.probe_period_cap`
(1 s by default) so tests do not wait for 10 s probe periods; thresholds are honoured.

Threads: one watch thread (list + watch of pods on this node, with resourceVersion, bookmarks and
relist on 410), one lease thread, and one supervisor thread that does every process operation.
Processes are only ever spawned from the supervisor thread, whose lifetime equals the kubelet's:
children get PR_SET_PDEATHSIG, which fires when the *spawning thread* ends.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import datetime
import http.client
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.k8s import containers
from tests.k8s.kubeapi import ApiError, KubeApi
from tests.support.loopback import bindable
from tests.support.processes import die_with_parent

log = logging.getLogger("tests.k8s.kubelet")

NODE_LABEL = "dsm-e2e"
"""The default label (``<label>=true``) and taint key of the kubelet's Node."""
NODE_TAINT = {"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}
"""Pods must tolerate this to land on the kubelet's node (see :data:`TOLERATION`)."""
TOLERATION = {"key": NODE_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}


def toleration(label: str = NODE_LABEL) -> dict[str, str]:
    """What a pod needs to tolerate the taint of a kubelet whose node label is ``label``."""
    return {"key": label, "operator": "Equal", "value": "true", "effect": "NoSchedule"}


HOST_IP = "127.0.0.1"


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class KubeletEvent:
    """Something the kubelet did or saw, with the wall-clock time (same clock as PostgreSQL's
    ``now()`` on this machine)."""

    at: float
    namespace: str
    pod: str
    uid: str
    kind: str
    """``spawned``, ``ready``, ``unready``, ``exited``, ``terminating``, ``deleted``, ``killed``,
    ``liveness-restart``."""
    detail: str = ""


class AddressPool:
    """Loopback pod IPs 127.<A>.<B>.<C>, skipping any address a port of which is taken."""

    def __init__(self, second_octet: int, ports: tuple[int, ...]) -> None:
        self.second = second_octet
        self.ports = ports
        self._n = itertools.count(1)
        self._lock = threading.Lock()

    def allocate(self) -> str:
        with self._lock:
            for _ in range(10_000):
                n = next(self._n)
                ip = f"127.{self.second}.{(n // 250) % 250}.{n % 250 + 1}"
                if all(bindable(ip, p) for p in self.ports):
                    return ip
        raise RuntimeError("no free loopback pod address")


@dataclass
class Probe:
    spec: dict[str, Any]
    period_cap: float
    successes: int = 0
    failures: int = 0
    due: float = 0.0
    pending: concurrent.futures.Future[bool] | None = None

    @property
    def period(self) -> float:
        return min(float(self.spec.get("periodSeconds", 10)), self.period_cap)

    @property
    def failure_threshold(self) -> int:
        return int(self.spec.get("failureThreshold", 3))

    @property
    def success_threshold(self) -> int:
        return int(self.spec.get("successThreshold", 1))


@dataclass
class PodRunner:
    """State of one pod (one uid) on this node."""

    namespace: str
    name: str
    uid: str
    pod: dict[str, Any]
    ip: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    restart_count: int = 0
    restart_at: float | None = None
    last_exit: dict[str, Any] | None = None
    started_at: str = ""
    container_started_at: str = ""
    started: bool = False
    ready: bool = False
    ready_since: str = ""
    terminating_since: float | None = None
    kill_deadline: float | None = None
    signalled: bool = False
    config_error: str = ""
    log_paths: list[Path] = field(default_factory=list)
    probes: dict[str, Probe] = field(default_factory=dict)
    last_status: dict[str, Any] | None = None
    gone: bool = False
    container_name: str | None = None
    """Set while the pod's container runs in podman (image mode); None for a local process."""
    image_id: str = ""

    @property
    def container(self) -> dict[str, Any]:
        c: dict[str, Any] = self.pod["spec"]["containers"][0]
        return c

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class MiniKubelet:
    """The kubelet of one Node (see the module's docstring); :meth:`start`, then :meth:`stop`.

    What a pod runs is the caller's choice: ``commands`` maps a container command's first word
    to a local program (a container whose command is not there fails with
    CreateContainerConfigError), ``extra_env`` is added to every local process, ``pod_ip_env``
    names the variable that carries the pod's IP (set last, for processes and containers, so that
    a program binds only its own address), and ``pod_ports`` are ports a pod IP is checked free
    for before it is handed out.
    """

    def __init__(
        self,
        api: KubeApi,
        workdir: Path,
        *,
        commands: Mapping[str, Sequence[str]] | None = None,
        extra_env: Mapping[str, str] | None = None,
        pod_ip_env: str | None = None,
        pod_ports: tuple[int, ...] = (),
        node_name: str = "e2e-kubelet",
        node_label: str = NODE_LABEL,
        second_octet: int | None = None,
        probe_period_cap: float = 1.0,
    ) -> None:
        self.api = api
        self.workdir = workdir
        self.node_name = node_name
        self.node_label = node_label
        """The Node carries ``<node_label>=true`` and a NoSchedule taint of that key: only pods
        that select and tolerate it (:func:`toleration`) land here."""
        self.probe_period_cap = probe_period_cap
        self.addresses = AddressPool(
            second_octet if second_octet is not None else 64 + os.getpid() % 64, pod_ports
        )
        self.commands: dict[str, list[str]] = {k: list(v) for k, v in (commands or {}).items()}
        """argv[0] of a container command -> the local argv prefix that replaces it."""
        self.container_images: tuple[str, ...] = ()
        """Image repositories (``localhost/dsm-node-e2e``) whose pods run as real containers
        (podman, :mod:`tests.k8s.containers`); every other pod runs as a local process."""
        self.extra_env: dict[str, str] = dict(extra_env or {})
        """Added to every local process (after the pod's own environment and the rules)."""
        self.pod_ip_env = pod_ip_env
        """The variable that carries the pod IP, set on top of everything else (None: not set)."""
        self._env_rules: list[tuple[dict[str, str], dict[str, str]]] = []
        self.events: list[KubeletEvent] = []
        self.runners: dict[str, PodRunner] = {}
        self.log_paths: dict[str, list[Path]] = {}
        """``namespace/pod`` -> every log file of its processes, oldest first."""
        self._pods: dict[str, dict[str, Any]] = {}  # uid -> latest pod body from the watch
        self._deleted: set[str] = set()  # uids the watch saw DELETED
        self._forgotten: set[str] = set()  # namespaces whose pods are never started again
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._probes = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="probe")
        self._threads: list[threading.Thread] = []
        self._insecure = ssl.create_default_context()
        self._insecure.check_hostname = False
        self._insecure.verify_mode = ssl.CERT_NONE
        self.errors: list[str] = []
        """Unexpected exceptions in the kubelet's threads (a test should assert it stays empty)."""

    # -- public -----------------------------------------------------------------------------

    def add_env_rule(self, match: Mapping[str, str], extra: Mapping[str, str]) -> None:
        """Processes whose resolved environment contains every item of ``match`` also get
        ``extra`` (e.g. ``{"DSM_SOFTWARE_VERSION": "0.2.0"}`` -> a test-only migrations dir)."""
        self._env_rules.append((dict(match), dict(extra)))

    def start(self, timeout: float = 60.0) -> MiniKubelet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._register_node()
        for target, name in (
            (self._lease_loop, "kubelet-lease"),
            (self._watch_loop, "kubelet-watch"),
            (self._supervise_loop, "kubelet-supervisor"),
        ):
            t = threading.Thread(target=self._guard(target), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._wait_schedulable(timeout)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.api.close_watches()
        for t in self._threads:
            t.join(timeout=30)
        with self._lock:
            runners = list(self.runners.values())
        for r in runners:  # supervisor is gone; anything left is killed here
            self._kill(r)
        if self.container_images:
            containers.remove_mine()
        self._probes.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            self.api.call("DELETE", f"/api/v1/nodes/{self.node_name}")
        with contextlib.suppress(Exception):
            self.api.call(
                "DELETE",
                f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}",
            )

    def forget_namespace(self, namespace: str, timeout: float = 30.0) -> None:
        """Test teardown: kill every process of the namespace now, force-delete its pods, and
        never start a pod of that namespace again (a controller may still re-create some)."""
        with self._lock:
            self._forgotten.add(namespace)
            for r in self.runners.values():
                if r.namespace == namespace:
                    r.gone = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                left = [r for r in self.runners.values() if r.namespace == namespace]
            if not left:
                return
            time.sleep(0.1)

    def pod_ip(self, namespace: str, pod: str) -> str | None:
        with self._lock:
            for r in self.runners.values():
                if r.namespace == namespace and r.name == pod and r.terminating_since is None:
                    return r.ip
        return None

    def pid_of(self, namespace: str, pod: str) -> int | None:
        """The pid of the pod's running process, if any."""
        with self._lock:
            runner = next(
                (
                    r
                    for r in self.runners.values()
                    if r.namespace == namespace and r.name == pod and r.running
                ),
                None,
            )
        if runner is None:
            return None
        if runner.container_name is not None:  # the container's main process, on the host
            return containers.pid(runner.container_name)
        assert runner.proc is not None
        return runner.proc.pid

    def events_of(self, namespace: str) -> list[KubeletEvent]:
        with self._lock:
            return [e for e in self.events if e.namespace == namespace]

    def logs(self, namespace: str, lines: int = 60) -> str:
        out = []
        for key, paths in sorted(self.log_paths.items()):
            if not key.startswith(namespace + "/"):
                continue
            for p in paths:
                text = p.read_text(errors="replace") if p.exists() else "(no log)"
                tail = "\n".join(text.splitlines()[-lines:])
                out.append(f"--- {key} ({p}) ---\n{tail}")
        return "\n".join(out)

    # -- node registration and heartbeats ----------------------------------------------------

    def _node_status(self) -> dict[str, Any]:
        now = now_rfc3339()
        resources = {"cpu": "64", "memory": "256Gi", "pods": "110", "ephemeral-storage": "1Ti"}

        def cond(type_: str, status: str, reason: str) -> dict[str, str]:
            return {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": "e2e mini kubelet",
                "lastHeartbeatTime": now,
                "lastTransitionTime": self._node_transition,
            }

        return {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID"),
                cond("Ready", "True", "KubeletReady"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": HOST_IP},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "e2e",
                "systemUUID": "e2e",
                "bootID": "e2e",
                "kernelVersion": os.uname().release,
                "osImage": "dsm e2e mini kubelet",
                "containerRuntimeVersion": "local-process://1",
                "kubeletVersion": "v0.0.0-e2e",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def _register_node(self) -> None:
        self._node_transition = now_rfc3339()
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    self.node_label: "true",
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
            # Only pods that tolerate this run here: the cluster and operator tiers share the
            # session's control plane, and their pods must stay on kwok's node.
            "spec": {"taints": [{"key": self.node_label, "value": "true", "effect": "NoSchedule"}]},
            "status": self._node_status(),
        }
        status, reply = self.api.call("POST", "/api/v1/nodes", node)
        if status == 409:  # left over by an earlier run in this control plane
            self.api.merge_patch(
                f"/api/v1/nodes/{self.node_name}",
                {"metadata": node["metadata"], "spec": node["spec"]},
            )
        elif status != 201:
            raise ApiError(status, reply, "register node")
        self._heartbeat()

    def _heartbeat(self) -> None:
        self.api.merge_patch(
            f"/api/v1/nodes/{self.node_name}/status", {"status": self._node_status()}
        )
        path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
        spec = {
            "holderIdentity": self.node_name,
            "leaseDurationSeconds": 40,
            "renewTime": _micro_time(),
        }
        status, _ = self.api.call(
            "PATCH",
            f"{path}/{self.node_name}",
            {"spec": spec},
            content_type="application/merge-patch+json",
        )
        if status == 404:
            self.api.expect(
                "POST",
                path,
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
                    "spec": spec,
                },
            )

    def _lease_loop(self) -> None:
        while not self._stop.wait(5.0):
            try:
                self._heartbeat()
            except (OSError, ApiError, http.client.HTTPException) as e:
                log.warning("node heartbeat failed: %s", e)

    def _wait_schedulable(self, timeout: float) -> None:
        """The NodeTaint admission gives a new node a not-ready taint; the node lifecycle
        controller lifts it once it has seen Ready=True."""
        deadline = time.monotonic() + timeout
        while True:
            node = self.api.get(f"/api/v1/nodes/{self.node_name}") or {}
            taints = [
                t
                for t in (node.get("spec") or {}).get("taints") or []
                if t.get("key") != self.node_label
            ]
            if not any(t.get("effect") in ("NoSchedule", "NoExecute") for t in taints):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self.node_name} still tainted: {taints}")
            time.sleep(0.2)

    # -- the pod watch ------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    listing = self.api.expect(
                        "GET", "/api/v1/pods", query={"fieldSelector": selector}
                    )
                    rv = listing["metadata"]["resourceVersion"]
                    seen = {p["metadata"]["uid"]: p for p in listing["items"]}
                    with self._lock:
                        for uid in set(self._pods) - set(seen):
                            self._deleted.add(uid)  # deleted while we were not watching
                            self._pods.pop(uid, None)
                        self._pods.update(seen)
                    self._wake.set()
                for event in self.api.watch(
                    "/api/v1/pods", {"fieldSelector": selector, "resourceVersion": rv}
                ):
                    obj = event.get("object") or {}
                    kind = event.get("type")
                    if kind == "ERROR":
                        if obj.get("code") == 410:  # too old: relist
                            rv = None
                            break
                        raise ApiError(int(obj.get("code") or 0), obj, "watch pods")
                    rv = obj["metadata"]["resourceVersion"]
                    if kind == "BOOKMARK":
                        continue
                    uid = obj["metadata"]["uid"]
                    with self._lock:
                        if kind == "DELETED":
                            self._pods.pop(uid, None)
                            self._deleted.add(uid)
                        else:
                            self._pods[uid] = obj
                    self._wake.set()
            except ApiError as e:
                if self._stop.is_set():
                    return
                log.warning("pod watch: %s; relisting", e)
                rv = None
                self._stop.wait(0.5)
            except (OSError, http.client.HTTPException, ValueError) as e:
                if self._stop.is_set():
                    return
                log.info("pod watch interrupted (%s); resuming from %s", e, rv)
                self._stop.wait(0.2)

    # -- the supervisor ----------------------------------------------------------------------

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # a thread must never die silently
                self.errors.append(f"{threading.current_thread().name}: {type(e).__name__}: {e}")
                log.exception("kubelet thread died")

        return run

    def _supervise_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            with self._lock:
                pods = dict(self._pods)
                deleted = set(self._deleted)
                self._deleted.clear()
            for uid in deleted:
                r = self.runners.get(uid)
                if r is not None:
                    self._kill(r)
                    self._event(r, "deleted", "pod object deleted")
                    self._drop(r)
            for uid, pod in pods.items():
                if uid not in self.runners and uid not in deleted:
                    self._adopt(pod)
            for r in list(self.runners.values()):
                if r.uid in pods:
                    r.pod = pods[r.uid]
                try:
                    self._sync(r)
                except (OSError, ApiError, http.client.HTTPException) as e:
                    log.warning("sync %s/%s: %s", r.namespace, r.name, e)
                except Exception as e:  # a bug here must not take every pod down
                    self.errors.append(f"sync {r.namespace}/{r.name}: {type(e).__name__}: {e}")
                    log.exception("sync %s/%s", r.namespace, r.name)
        with self._lock:
            runners = list(self.runners.values())
        for r in runners:
            self._kill(r)

    def _adopt(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        with self._lock:
            forgotten = meta["namespace"] in self._forgotten
        if meta.get("deletionTimestamp") or forgotten:  # never started here: nothing to stop
            self._finalize_delete(meta["namespace"], meta["name"], meta["uid"])
            return
        r = PodRunner(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            pod=pod,
            ip=self.addresses.allocate(),
            workdir=self.workdir / meta["namespace"] / f"{meta['name']}-{meta['uid'][:8]}",
            started_at=now_rfc3339(),
        )
        r.workdir.mkdir(parents=True, exist_ok=True)
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            if r.container.get(kind):
                r.probes[kind] = Probe(r.container[kind], self.probe_period_cap)
        with self._lock:
            self.runners[r.uid] = r
        self.log_paths.setdefault(f"{r.namespace}/{r.name}", [])

    def _drop(self, r: PodRunner) -> None:
        with self._lock:
            self.runners.pop(r.uid, None)

    def _event(self, r: PodRunner, kind: str, detail: str = "") -> None:
        with self._lock:
            self.events.append(KubeletEvent(time.time(), r.namespace, r.name, r.uid, kind, detail))
        log.info("%s/%s %s %s", r.namespace, r.name, kind, detail)

    def _sync(self, r: PodRunner) -> None:
        now = time.monotonic()
        if r.gone:  # test teardown: no grace
            self._kill(r)
            self._finalize_delete(r.namespace, r.name, r.uid)
            self._drop(r)
            return
        if r.pod["metadata"].get("deletionTimestamp") and r.terminating_since is None:
            grace = r.pod["metadata"].get("deletionGracePeriodSeconds")
            if grace is None:
                grace = r.pod["spec"].get("terminationGracePeriodSeconds", 30)
            r.terminating_since = now
            r.kill_deadline = now + float(grace)
            r.restart_at = None
            self._event(r, "terminating", f"grace {grace} s")
            if r.running:
                self._terminate(r)
                r.signalled = True
        if r.terminating_since is not None:
            if r.running and r.kill_deadline is not None and now >= r.kill_deadline:
                self._kill(r)
            if not r.running:
                if r.signalled and r.proc is not None and r.proc.returncode is not None:
                    self._event(r, "exited", f"code {r.proc.returncode} after SIGTERM")
                self._finalize_delete(r.namespace, r.name, r.uid)
                self._drop(r)
            return

        if r.running and r.kill_deadline is not None and now >= r.kill_deadline:
            self._kill(r)  # a liveness restart that outlived its grace period
        if (r.proc is None and r.restart_at is None) or (
            r.restart_at is not None and now >= r.restart_at
        ):
            if r.proc is not None:
                r.restart_count += 1
            r.restart_at = None
            self._spawn(r)
        elif r.proc is not None and r.restart_at is None and r.proc.poll() is not None:
            code = r.proc.returncode
            r.last_exit = {
                "terminated": {
                    "exitCode": code if code >= 0 else 128 - code,
                    "reason": "Error" if code else "Completed",
                    "startedAt": r.container_started_at,
                    "finishedAt": now_rfc3339(),
                }
            }
            self._event(r, "exited", f"code {code}")
            r.started = False
            self._set_ready(r, False)
            for p in r.probes.values():
                p.successes = p.failures = 0
                p.pending = None
            r.restart_at = now + min(10.0, 2.0 ** min(r.restart_count, 4))
        if r.running:
            self._run_probes(r, now)
        self._write_status(r)

    # -- processes ---------------------------------------------------------------------------

    def _in_container(self, r: PodRunner) -> bool:
        image = str(r.container.get("image", ""))
        return any(image.startswith(repo + ":") for repo in self.container_images)

    def _spawn(self, r: PodRunner) -> None:
        try:
            if self._in_container(r):
                argv, env = self._container_run(r)
            else:
                argv, env = self._container_process(r)
        except (ConfigError, containers.ContainerConfigError) as e:
            if r.config_error != str(e):
                r.config_error = str(e)
                self._event(r, "config-error", str(e))
            r.proc = None
            r.restart_at = time.monotonic() + 1.0
            return
        r.config_error = ""
        r.argv, r.env = argv, env
        log_path = r.workdir / f"{r.container['name']}.{r.restart_count}.log"
        self.log_paths[f"{r.namespace}/{r.name}"].append(log_path)
        with log_path.open("ab") as out:
            out.write(f"$ {' '.join(argv)}  (pod IP {r.ip})\n".encode())
            out.flush()
            r.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=r.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        r.container_started_at = now_rfc3339()
        r.kill_deadline = None
        r.started = "startupProbe" not in r.probes
        for p in r.probes.values():
            p.due = time.monotonic() + float(p.spec.get("initialDelaySeconds", 0))
        where = f"container {r.container_name}" if r.container_name else f"pid {r.proc.pid}"
        self._event(r, "spawned", f"{where} ip {r.ip} restart {r.restart_count}")

    def _terminate(self, r: PodRunner) -> None:
        """SIGTERM to the container's main process (the node), as a kubelet's StopContainer."""
        if r.container_name is not None:
            containers.kill(r.container_name, "TERM")
        elif r.proc is not None:
            r.proc.send_signal(signal.SIGTERM)

    def _kill(self, r: PodRunner) -> None:
        proc = r.proc
        if proc is not None and proc.poll() is None:
            if r.container_name is not None:  # `podman run` itself is only the client
                containers.remove(r.container_name)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            self._event(r, "killed")

    def _finalize_delete(self, namespace: str, name: str, uid: str) -> None:
        status, reply = self.api.call(
            "DELETE",
            f"/api/v1/namespaces/{namespace}/pods/{name}",
            {
                "apiVersion": "v1",
                "kind": "DeleteOptions",
                "gracePeriodSeconds": 0,
                "preconditions": {"uid": uid},
            },
        )
        if status not in (200, 202, 404, 409):
            raise ApiError(status, reply, f"delete pod {namespace}/{name}")

    # -- the container's process: command, env, volumes ---------------------------------------

    def _materialize_volumes(self, r: PodRunner, fs_group: int | None = None) -> dict[str, Path]:
        """mountPath -> host directory. With ``fs_group`` (a container's pod), files belong to
        that group with the volume's modes and emptyDirs are 0777, as a kubelet makes them;
        otherwise (local processes, which run as us) files are readable by us."""
        ns = r.namespace
        volumes = {v["name"]: v for v in r.pod["spec"].get("volumes") or []}
        mounts: dict[str, Path] = {}
        for m in r.container.get("volumeMounts") or []:
            vol = volumes.get(m["name"])
            if vol is None:
                raise ConfigError(f"volume {m['name']!r} not found")
            host = r.workdir / "volumes" / m["name"]
            if "secret" in vol or "configMap" in vol:
                src = vol.get("secret") or vol.get("configMap") or {}
                is_secret = "secret" in vol
                obj_name = src.get("secretName") if is_secret else src.get("name")
                kind = "secrets" if is_secret else "configmaps"
                obj = self.api.get(f"/api/v1/namespaces/{ns}/{kind}/{obj_name}")
                if obj is None:
                    if src.get("optional"):
                        obj = {}
                    else:
                        raise ConfigError(f"{kind[:-1]} {obj_name!r} not found")
                data: dict[str, bytes] = {}
                for k, v in (obj.get("data") or {}).items():
                    data[k] = base64.b64decode(v) if is_secret else str(v).encode()
                for k, v in (obj.get("binaryData") or {}).items():
                    data[k] = base64.b64decode(v)
                items = src.get("items") or [{"key": k, "path": k} for k in data]
                if host.exists():
                    shutil.rmtree(host)
                host.mkdir(parents=True)
                for item in items:
                    if item["key"] not in data:
                        raise ConfigError(f"{obj_name!r} has no key {item['key']!r}")
                    target = host / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data[item["key"]])
                    mode = item.get("mode", src.get("defaultMode", 0o644))
                    if fs_group is None:
                        target.chmod(mode | 0o600)  # processes run as us, not runAsUser
                    else:
                        os.chown(target, 0, fs_group)
                        target.chmod(mode)
                if fs_group is not None:
                    host.chmod(0o755)
            elif "emptyDir" in vol:
                host.mkdir(parents=True, exist_ok=True)
                if fs_group is not None:
                    host.chmod(0o777)
            else:
                raise ConfigError(f"volume type of {m['name']!r} is not simulated")
            mounts[m["mountPath"].rstrip("/")] = host
        return mounts

    def _container_run(self, r: PodRunner) -> tuple[list[str], dict[str, str]]:
        """``podman run`` of the pod's image (see :mod:`tests.k8s.containers`)."""
        c = r.container
        pod_context = r.pod["spec"].get("securityContext") or {}
        image = str(c["image"])
        if containers.podman("image", "exists", image, check=False).returncode != 0:
            raise ConfigError(f"image {image} is not present (images are never pulled here)")
        security = containers.security_args(
            pod_context, c.get("securityContext") or {}, containers.image_user(image)
        )
        fs_group = pod_context.get("fsGroup")
        mounts = self._materialize_volumes(r, int(fs_group) if fs_group is not None else 0)
        env = self._resolve_env(r)
        if self.pod_ip_env:  # host network: each pod binds only its own address
            env[self.pod_ip_env] = r.ip
        read_only = {
            m["mountPath"].rstrip("/"): bool(m.get("readOnly")) for m in c.get("volumeMounts") or []
        }
        if r.container_name is not None:
            containers.remove(r.container_name)  # the previous run of a restarted container
        r.container_name = f"{r.namespace}-{r.name}-{r.uid[:8]}-{r.restart_count}"
        r.image_id = containers.image_id(image)
        argv = containers.run_argv(
            name=r.container_name,
            image=image,
            command=[_expand(a, env) for a in c.get("command") or []],
            args=[_expand(a, env) for a in c.get("args") or []],
            env=env,
            mounts=[(host, path, read_only.get(path, False)) for path, host in mounts.items()],
            security=security,
        )
        # podman reads the values of `--env NAME` from its own environment
        return argv, {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}

    def _container_process(self, r: PodRunner) -> tuple[list[str], dict[str, str]]:
        mounts = self._materialize_volumes(r)

        def rewrite(value: str) -> str:
            for mount_path, host in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                if value == mount_path or value.startswith(mount_path + "/"):
                    return str(host) + value[len(mount_path) :]
            return value

        env = {k: rewrite(v) for k, v in self._resolve_env(r).items()}
        for match, extra in self._env_rules:
            if all(env.get(k) == v for k, v in match.items()):
                env.update(extra)
        env.update(self.extra_env)
        if self.pod_ip_env:  # never 0.0.0.0: each pod binds only its own address
            env[self.pod_ip_env] = r.ip
        base = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(r.workdir),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOSTNAME": r.name,
        }
        full_env = {**base, **env}

        c = r.container
        command = [_expand(a, env) for a in c.get("command") or []]
        args = [_expand(a, env) for a in c.get("args") or []]
        argv = command + args
        if not argv:
            raise ConfigError("container without command: images are not simulated")
        prefix = self.commands.get(argv[0])
        if prefix is None:
            raise ConfigError(f"no local program for command {argv[0]!r}")
        return [*prefix, *(rewrite(a) for a in argv[1:])], full_env

    def _resolve_env(self, r: PodRunner) -> dict[str, str]:
        """The container's ``envFrom`` and ``env``, resolved as a kubelet does."""
        env: dict[str, str] = {}
        c = r.container
        for src in c.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "secretRef" in src:
                data = self._object_data(r.namespace, "secrets", src["secretRef"])
            else:
                data = self._object_data(r.namespace, "configmaps", src["configMapRef"])
            env.update({prefix + k: v for k, v in data.items()})
        for item in c.get("env") or []:
            if "value" in item:
                env[item["name"]] = _expand(str(item["value"]), env)
            elif "valueFrom" in item:
                value = self._env_from(r, item["valueFrom"])
                if value is not None:
                    env[item["name"]] = value
            else:
                env[item["name"]] = ""
        return env

    def _object_data(self, namespace: str, kind: str, ref: Mapping[str, Any]) -> dict[str, str]:
        obj = self.api.get(f"/api/v1/namespaces/{namespace}/{kind}/{ref['name']}")
        if obj is None:
            if ref.get("optional"):
                return {}
            raise ConfigError(f"{kind[:-1]} {ref['name']!r} not found")
        raw = obj.get("data") or {}
        if kind == "secrets":
            return {k: base64.b64decode(v).decode() for k, v in raw.items()}
        return {k: str(v) for k, v in raw.items()}

    def _env_from(self, r: PodRunner, source: Mapping[str, Any]) -> str | None:
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            meta = r.pod["metadata"]
            values: dict[str, str] = {
                "metadata.name": meta["name"],
                "metadata.namespace": meta["namespace"],
                "metadata.uid": meta["uid"],
                "spec.nodeName": self.node_name,
                "spec.serviceAccountName": str(r.pod["spec"].get("serviceAccountName", "default")),
                "status.podIP": r.ip,
                "status.hostIP": HOST_IP,
            }
            if path not in values:
                raise ConfigError(f"fieldRef {path!r} is not simulated")
            return values[path]
        for key, kind in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
            if key in source:
                ref = source[key]
                data = self._object_data(r.namespace, kind, ref)
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    raise ConfigError(f"{kind[:-1]} {ref['name']!r} has no key {ref['key']!r}")
                return data[ref["key"]]
        raise ConfigError(f"env source {sorted(source)} is not simulated")

    # -- probes and status --------------------------------------------------------------------

    def _run_probes(self, r: PodRunner, now: float) -> None:
        startup = r.probes.get("startupProbe")
        if startup is not None and not r.started:
            if self._probe_result(r, startup, now):
                r.started = True
            elif startup.failures >= startup.failure_threshold:
                self._restart_for(r, "startup probe failed")
            return
        liveness = r.probes.get("livenessProbe")
        if liveness is not None:
            self._probe_result(r, liveness, now)
            if liveness.failures >= liveness.failure_threshold:
                self._restart_for(r, "liveness probe failed")
                return
        readiness = r.probes.get("readinessProbe")
        if readiness is None:
            self._set_ready(r, True)
            return
        self._probe_result(r, readiness, now)
        if readiness.successes >= readiness.success_threshold:
            self._set_ready(r, True)
        elif readiness.failures >= readiness.failure_threshold:
            self._set_ready(r, False)

    def _probe_result(self, r: PodRunner, probe: Probe, now: float) -> bool:
        """Collects a finished probe (updating the counters), starts the next one when due;
        True when the last collected result was a success."""
        result: bool | None = None
        if probe.pending is not None and probe.pending.done():
            result = probe.pending.result()
            probe.pending = None
            if result:
                probe.successes += 1
                probe.failures = 0
            else:
                probe.failures += 1
                probe.successes = 0
        if probe.pending is None and now >= probe.due:
            probe.due = now + probe.period
            probe.pending = self._probes.submit(self._probe_once, r, dict(probe.spec))
        return bool(result)

    def _probe_once(self, r: PodRunner, spec: dict[str, Any]) -> bool:
        timeout = float(spec.get("timeoutSeconds", 1))
        try:
            if "httpGet" in spec:
                get = spec["httpGet"]
                port = self._port(r, get["port"])
                host = get.get("host") or r.ip
                conn: http.client.HTTPConnection
                if str(get.get("scheme", "HTTP")).upper() == "HTTPS":
                    conn = http.client.HTTPSConnection(
                        host, port, timeout=timeout, context=self._insecure
                    )
                else:
                    conn = http.client.HTTPConnection(host, port, timeout=timeout)
                try:
                    conn.request("GET", get.get("path", "/"))
                    resp = conn.getresponse()
                    resp.read()
                    return 200 <= resp.status < 400
                finally:
                    conn.close()
            if "tcpSocket" in spec:
                port = self._port(r, spec["tcpSocket"]["port"])
                with socket.create_connection((r.ip, port), timeout=timeout):
                    return True
            return True  # exec / grpc probes are not simulated
        except (OSError, http.client.HTTPException, ValueError):
            return False

    def _port(self, r: PodRunner, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in r.container.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"no container port named {port!r}")

    def _restart_for(self, r: PodRunner, why: str) -> None:
        self._event(r, "liveness-restart", why)
        for p in r.probes.values():
            p.successes = p.failures = 0
        if r.proc is not None and r.proc.poll() is None and r.kill_deadline is None:
            self._terminate(r)  # the exit is then handled like any other
            grace = float(r.pod["spec"].get("terminationGracePeriodSeconds", 30))
            r.kill_deadline = time.monotonic() + grace

    def _set_ready(self, r: PodRunner, ready: bool) -> None:
        if ready != r.ready:
            r.ready = ready
            r.ready_since = now_rfc3339()
            self._event(r, "ready" if ready else "unready")

    def _write_status(self, r: PodRunner) -> None:
        c = r.container
        state: dict[str, Any]
        if r.running:
            state = {"running": {"startedAt": r.container_started_at}}
        elif r.config_error:
            state = {"waiting": {"reason": "CreateContainerConfigError", "message": r.config_error}}
        elif r.restart_at is not None:
            state = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting"}}
        else:
            state = {"waiting": {"reason": "ContainerCreating"}}
        container_status = {
            "name": c["name"],
            "image": c.get("image", ""),
            "imageID": r.image_id,
            "containerID": (
                f"podman://{r.container_name}"
                if r.container_name
                else f"local://{r.proc.pid}"
                if r.proc is not None
                else ""
            ),
            "ready": r.ready,
            "started": r.started and r.running,
            "restartCount": r.restart_count,
            "state": state,
            "lastState": r.last_exit or {},
        }
        transition = r.ready_since or r.started_at

        def cond(type_: str, ok: bool, at: str) -> dict[str, Any]:
            return {"type": type_, "status": "True" if ok else "False", "lastTransitionTime": at}

        status = {
            "phase": "Running",
            "hostIP": HOST_IP,
            "hostIPs": [{"ip": HOST_IP}],
            "podIP": r.ip,
            "podIPs": [{"ip": r.ip}],
            "startTime": r.started_at,
            "conditions": [
                cond("PodReadyToStartContainers", True, r.started_at),
                cond("Initialized", True, r.started_at),
                cond("Ready", r.ready, transition),
                cond("ContainersReady", r.ready, transition),
                cond("PodScheduled", True, r.started_at),
            ],
            "containerStatuses": [container_status],
        }
        if status == r.last_status:
            return
        reply = self.api.call(
            "PATCH",
            f"/api/v1/namespaces/{r.namespace}/pods/{r.name}/status",
            {"metadata": {"uid": r.uid}, "status": status},
            content_type="application/merge-patch+json",
        )
        if reply[0] == 200:
            r.last_status = status
        elif reply[0] not in (404, 409, 422):
            raise ApiError(reply[0], reply[1], f"status of {r.namespace}/{r.name}")


class ConfigError(Exception):
    """The pod cannot be started yet (a missing Secret, an unsupported feature)."""


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion against variables defined earlier."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), value.replace("$$", "\0")).replace(
        "\0", "$"
    )

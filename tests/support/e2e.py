"""What the e2e tests (and bench/operator_figures.py) share: the mini kubelet set up to run dsm
nodes, the CRD, the operator as a subprocess, one DeepSecurityManager with its database and
Secrets, the nodes' API, and job producers.

Offers :func:`dsm_kubelet`, :func:`install_crd`, :class:`OperatorProcess`, :class:`Manager`,
:func:`node_request`, :class:`JobProducer`, :func:`rss_kib` and the e2e cluster timing
(:data:`HEARTBEAT_INTERVAL`, :data:`OFFLINE_THRESHOLD`). No pytest here, so that the figures
script can use it without a test session.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.k8s import containers
from tests.k8s.kubeapi import KubeApi
from tests.k8s.kubelet import NODE_LABEL, TOLERATION, MiniKubelet
from tests.support.loopback import free_port
from tests.support.nodes import query
from tests.support.processes import ChildProcess
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "deepsecuritymanagers.yaml"
V2_MIGRATIONS = REPO / "tests" / "support" / "migrations_v2"
GROUP, VERSION, PLURAL = "security.dsm.dev", "v1alpha1", "deepsecuritymanagers"
LOCAL_SECRET = "e2e-local-secret-shared-by-every-node"
HEARTBEAT_INTERVAL = 1.0
"""Cluster settings written before the first node joins (a node seeds settings only where none
exist): short enough for quick tests, long enough that a loaded 2-core machine does not flap
readiness (``/readyz`` fails when the last heartbeat is older than 2 intervals + 1 s)."""
OFFLINE_THRESHOLD = 10.0
NODE_PORTS = (4119, 4120)
"""The ports every node pod binds on its own address (the product's fixed ports)."""


def dsm_kubelet(api: KubeApi, workdir: Path) -> MiniKubelet:
    """A mini kubelet that runs the operator's node pods as dsm nodes: the pod's ``dsm`` command
    as ``python -m dsm_node`` with the test job types, the pod IP in ``DSM_BIND_ADDRESS``, and the
    "next version" 0.2.0 with a test-only schema migration (tests/support/migrations_v2)."""
    kubelet = MiniKubelet(
        api,
        workdir,
        commands={"dsm": [sys.executable, "-m", "dsm_node"]},
        extra_env={
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "DSM_JOB_MODULES": "tests.support.jobtypes",
        },
        pod_ip_env="DSM_BIND_ADDRESS",
        pod_ports=NODE_PORTS,
    )
    kubelet.add_env_rule(
        {"DSM_SOFTWARE_VERSION": "0.2.0"}, {"DSM_EXTRA_MIGRATIONS_DIR": str(V2_MIGRATIONS)}
    )
    return kubelet


def install_crd(api: KubeApi, timeout: float = 30.0) -> None:
    body = yaml.safe_load(CRD_FILE.read_text())
    name = body["metadata"]["name"]
    api.apply(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}", body)
    wait_until(
        lambda: any(
            c["type"] == "Established" and c["status"] == "True"
            for c in (
                (api.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}") or {})
                .get("status", {})
                .get("conditions")
                or []
            )
        ),
        timeout,
        "CRD established",
    )
    # Right after a CRD is established its storage may still answer 429 "(re)initializing".
    wait_until(
        lambda: api.call("GET", f"/apis/{GROUP}/{VERSION}/{PLURAL}")[0] == 200,
        timeout,
        "the custom resource's storage",
    )


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    """Resident memory of a process from /proc (``VmHWM`` for the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


PROCESS_NODE_REPOSITORY = "registry.e2e.test/dsm-node"
"""The node image the operator names when the kubelet runs nodes as local processes (never
pulled: the kubelet maps the pod's command to a local program)."""


class OperatorProcess:
    """``python -m dsm_operator.main -n <namespace>`` with its own log, metrics and liveness
    endpoints on 127.0.0.1; node API calls limited to 127.0.0.0/8.

    With ``image``, the operator runs from its image instead (podman, host network, read-only
    root file system with an empty /tmp, UID 10002, no capabilities: as the chart runs it), with
    a readable copy of the test kubeconfig mounted."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        log_path: Path,
        reconcile_interval: float = 1.0,
        *,
        image: str | None = None,
        node_repository: str = PROCESS_NODE_REPOSITORY,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log_path
        self.reconcile_interval = reconcile_interval
        self.image = image
        self.node_repository = node_repository
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.child: ChildProcess | None = None
        self.container_name: str | None = None

    def _settings(self) -> dict[str, str]:
        return {
            "DSM_OPERATOR_RECONCILE_INTERVAL_SECONDS": str(self.reconcile_interval),
            "DSM_OPERATOR_NODE_API_NETWORKS": '["127.0.0.0/8"]',
            "DSM_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "DSM_OPERATOR_METRICS_ADDRESS": "127.0.0.1",
            "DSM_OPERATOR_LIVENESS_ENDPOINT": f"http://127.0.0.1:{self.liveness_port}/healthz",
            "DSM_OPERATOR_NODE_IMAGE_REPOSITORY": self.node_repository,
        }

    def _command(self) -> tuple[list[str], dict[str, str]]:
        if self.image is None:
            env = {
                **os.environ,
                "KUBECONFIG": str(self.kubeconfig),
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
                ),
                **self._settings(),
            }
            argv = [sys.executable, "-m", "dsm_operator.main", "--namespace", self.namespace]
            return argv, env
        kubeconfig = containers.readable_copy(
            self.kubeconfig, self.log_path.parent / "operator-kubeconfig", 10002, 10002
        )
        env = {"KUBECONFIG": "/var/run/dsm-e2e/kubeconfig/" + kubeconfig.name, **self._settings()}
        self.container_name = f"dsm-e2e-operator-{os.getpid()}-{self.metrics_port}"
        argv = containers.run_argv(
            name=self.container_name,
            image=self.image,
            command=[],
            args=["--namespace", self.namespace],
            env=env,
            mounts=[
                (kubeconfig.parent, "/var/run/dsm-e2e/kubeconfig", True),
                (self._empty_tmp(), "/tmp", False),
            ],
            security=containers.security_args(
                {"runAsNonRoot": True, "runAsUser": 10002, "runAsGroup": 10002},
                {
                    "readOnlyRootFilesystem": True,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
                containers.image_user(self.image),
            ),
        )
        return argv, {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}

    def _empty_tmp(self) -> Path:
        tmp = self.log_path.parent / f"operator-tmp-{self.metrics_port}"
        tmp.mkdir(parents=True, exist_ok=True)
        tmp.chmod(0o1777)  # an emptyDir
        return tmp

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        argv, env = self._command()
        self.child = ChildProcess(argv, self.log_path, env=env, new_session=True).start()
        wait_until(self._live, timeout, "operator liveness endpoint", self.log_tail)
        return self

    def _live(self) -> bool:
        assert self.child is not None
        if not self.child.running:
            raise AssertionError(
                f"operator exited with {self.child.returncode}:\n{self.log_tail()}"
            )
        try:
            url = f"http://127.0.0.1:{self.liveness_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.child is None:
            return None
        proc = self.child.proc
        if proc is not None and self.container_name is not None and proc.poll() is None:
            containers.kill(self.container_name, "TERM")  # `podman run` ends with its container
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                containers.remove(self.container_name)
                self.child.kill()
            return proc.returncode
        return self.child.stop(timeout)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


@dataclass
class Manager:
    """One DeepSecurityManager ``name`` in ``namespace`` with its Secrets and database."""

    api: KubeApi
    kubelet: MiniKubelet
    namespace: str
    database_url: str
    name: str = "mgr"
    extra_spec: dict[str, Any] = field(default_factory=dict)
    operator: OperatorProcess | None = None
    runtime: str = "process"
    """``process`` (local processes) or ``image`` (the images, in podman)."""

    @property
    def path(self) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}/{self.name}"

    def create_secrets(self) -> None:
        for name, data in (
            ("dsm-db", {"url": self.database_url}),
            ("dsm-master-key", {"localSecret": LOCAL_SECRET}),
        ):
            self.api.expect(
                "POST",
                f"/api/v1/namespaces/{self.namespace}/secrets",
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": name},
                    "stringData": data,
                },
            )

    def body(self, nodes: int, version: str) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "version": version,
            "nodes": nodes,
            "database": {"secretRef": {"name": "dsm-db"}},
            "masterKey": {"localSecretRef": {"name": "dsm-master-key"}},
            "offlineThresholdSeconds": 30,
            "nodeReadyTimeoutSeconds": 600,
            "scheduling": {"nodeSelector": {NODE_LABEL: "true"}, "tolerations": [TOLERATION]},
            **self.extra_spec,
        }
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "DeepSecurityManager",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": spec,
        }

    def apply(self, nodes: int, version: str = "0.1.0") -> None:
        """Like ``kubectl apply``: server-side apply of the whole resource."""
        self.api.apply(self.path, self.body(nodes, version), manager="kubectl")

    def patch_spec(self, **spec: Any) -> None:
        self.api.merge_patch(self.path, {"spec": spec})

    def resource(self) -> dict[str, Any]:
        return self.api.get(self.path) or {}

    def status(self) -> dict[str, Any]:
        s: dict[str, Any] = self.resource().get("status") or {}
        return s

    def condition(self, type_: str) -> dict[str, Any]:
        for c in self.status().get("conditions") or []:
            if c.get("type") == type_:
                return dict(c)
        return {}

    def pods(self) -> list[dict[str, Any]]:
        reply = self.api.expect(
            "GET",
            f"/api/v1/namespaces/{self.namespace}/pods",
            query={"labelSelector": f"app.kubernetes.io/instance={self.name}"},
        )
        items: list[dict[str, Any]] = reply["items"]
        return items

    def ready_pod_ips(self) -> list[str]:
        ips = []
        for p in self.pods():
            conditions = p.get("status", {}).get("conditions") or []
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
            ip = p.get("status", {}).get("podIP")
            if ready and ip and not p["metadata"].get("deletionTimestamp"):
                ips.append(ip)
        return ips

    def api_key(self) -> str:
        secret = self.api.get(f"/api/v1/namespaces/{self.namespace}/secrets/{self.name}-api-key")
        assert secret is not None, "the operator has not created the API key Secret"
        return base64.b64decode(secret["data"]["apiKey"]).decode()

    def all_online(self, count: int, version: str) -> bool:
        """The resource's status shows ``count`` ready nodes, each Online at ``version``, and
        Ready=True."""
        s = self.status()
        nodes = s.get("nodes") or []
        return (
            s.get("readyNodes") == count
            and s.get("currentNodes") == count
            and len(nodes) == count
            and all(n.get("status") == "Online" and n.get("version") == version for n in nodes)
            and any(
                c["type"] == "Ready" and c["status"] == "True" for c in s.get("conditions") or []
            )
        )

    def db_nodes(self) -> dict[str, tuple[str, str]]:
        """name -> (status, version) from the nodes table."""
        rows = query(self.database_url, "SELECT name, status, version FROM nodes")
        return {r[0]: (r[1], r[2]) for r in rows}


def node_request(
    ip: str, api_key: str, method: str, path: str, body: Any = None, port: int = 4119
) -> tuple[int, Any]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the nodes' self-signed certificates
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"https://{ip}:{port}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


class JobProducer(threading.Thread):
    """Submits ``record_effect`` jobs in batches to whichever Ready pod answers, all along."""

    def __init__(self, manager: Manager, batch: int = 10, pause: float = 0.2) -> None:
        super().__init__(daemon=True, name="job-producer")
        self.manager = manager
        self.batch = batch
        self.pause = pause
        self.ids: list[int] = []
        self.failures = 0
        self.stop_event = threading.Event()
        self._key = manager.api_key()

    def run(self) -> None:
        i = 0
        while not self.stop_event.is_set():
            try:
                ips = self.manager.ready_pod_ips()
            except Exception:
                ips = []
            if ips:
                ip = ips[i % len(ips)]
                i += 1
                try:
                    status, body = node_request(
                        ip,
                        self._key,
                        "POST",
                        "/api/jobs",
                        {"jobs": [{"type": "record_effect"}] * self.batch},
                    )
                except OSError:
                    status, body = 0, None
                if status == 201:
                    self.ids += body["ids"]
                else:
                    self.failures += 1
            self.stop_event.wait(self.pause)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)

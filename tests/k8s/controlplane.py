"""A real Kubernetes control plane on 127.0.0.1, run as plain processes, for the cluster test tier.

Why: an operator breaks where mocks are silent -- CRD schema and CEL validation, server-side
defaults, watches, status and scale subresources, finalizers, the StatefulSet controller's ordering.
No Docker engine runs on our machines, so instead of kind we run the programs controller-runtime's
envtest runs, built from source by ``hack/k8s/build.sh``: etcd and kube-apiserver always;
kube-controller-manager, kube-scheduler and kwok (a node simulator, so pods get scheduled and turn
Ready without a kubelet) when a test needs workloads.

Shape: :class:`ControlPlane` owns a working directory (certificates, etcd data, one log file per
component, an admin kubeconfig) and the processes. Every listener is on 127.0.0.1 at a port picked
free at start; pods on the fake node get 127.1.x.y addresses and Services 127.2.x.y, so nothing a
test finds in the API points outside loopback. Start-up waits on each component's health endpoint
with a deadline and, if a component dies or never turns healthy, raises :class:`ComponentFailed`
with its log tail.

The pytest fixtures live in ``plugin.py``; this module has no pytest dependency so that other tools
(a debugging script, e2e tests) can drive it directly.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import signal
import ssl
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.k8s import certificates
from tests.support import buildcache
from tests.support.loopback import free_port
from tests.support.processes import ChildProcess
from tests.support.waiting import TimedOut, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "hack" / "k8s" / "versions.env"
BUILD_SCRIPT = REPO_ROOT / "hack" / "k8s" / "build.sh"
OWN_KWOK_STAGES = Path(__file__).resolve().parent / "kwok"
"""Stages of our own that replace kwok's stage of the same file name (see each file's header)."""
ADMISSION_PLUGINS = "OwnerReferencesPermissionEnforcement"
"""Enabled on top of the defaults: OpenShift enables it, and it refuses an owner reference with
``blockOwnerDeletion`` from a client that may not update the owner's ``finalizers``."""
AUDIT_POLICY: dict[str, Any] = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        # Pod deletions with request and response: the request names the uid precondition, the
        # response names the pod (its uid) that was hit. Tests judge who deleted what by this.
        {
            "level": "RequestResponse",
            "verbs": ["delete", "deletecollection"],
            "resources": [{"group": "", "resources": ["pods"]}],
        },
        # Who wrote which child object (user agent, verb, name, response code).
        {
            "level": "Metadata",
            "verbs": ["create", "update", "patch", "delete"],
            "resources": [
                {"group": "", "resources": ["services", "serviceaccounts", "secrets"]},
                {"group": "apps", "resources": ["statefulsets"]},
                {"group": "policy", "resources": ["poddisruptionbudgets"]},
                {"group": "monitoring.coreos.com", "resources": ["servicemonitors"]},
            ],
        },
        {"level": "None"},
    ],
}

HOST = "127.0.0.1"
POD_CIDR = "127.1.0.0/16"
"""Pod addresses kwok hands out on the fake node: loopback, so a dialed pod IP stays local."""
SERVICE_CIDR = "127.2.0.0/16"
"""ClusterIP range: loopback, disjoint from :data:`POD_CIDR`; the API server takes the first IP."""
SERVICE_IP = "127.2.0.1"
FAKE_NODE = "kwok-node-0"
"""Name of the one simulated node that :meth:`ControlPlane.start_workloads` registers."""
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
_DEFAULT_SA = "/api/v1/namespaces/default/serviceaccounts/default"


class ComponentFailed(RuntimeError):
    """A control-plane component exited or did not become healthy in time (log tail attached)."""


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """The pins of ``hack/k8s/versions.env``."""
    return buildcache.read_versions(path)


@dataclass(frozen=True)
class Binaries:
    """Locations of the built programs, derived from the pinned versions and the cache layout."""

    k8s_version: str
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    etcd: Path
    kwok: Path
    kwok_stages: Path
    helm: Path

    @classmethod
    def locate(cls, cache: Path | None = None) -> Binaries:
        v = read_versions()
        root = (cache or buildcache.cache_dir()) / "k8s"
        k8s_bin = root / v["K8S_VERSION"] / "bin"
        kwok_dir = root / "tools" / f"kwok-{v['KWOK_VERSION']}"
        return cls(
            k8s_version=v["K8S_VERSION"],
            kube_apiserver=k8s_bin / "kube-apiserver",
            kube_controller_manager=k8s_bin / "kube-controller-manager",
            kube_scheduler=k8s_bin / "kube-scheduler",
            etcd=k8s_bin / "etcd",
            kwok=kwok_dir / "kwok",
            kwok_stages=kwok_dir / "stages",
            helm=root / "tools" / f"helm-{v['HELM_VERSION']}" / "helm",
        )

    def missing(self) -> list[Path]:
        """Programs (or the kwok stage directory) that are not there."""
        programs = [
            self.kube_apiserver,
            self.kube_controller_manager,
            self.kube_scheduler,
            self.etcd,
            self.kwok,
            self.helm,
        ]
        gone = [p for p in programs if not os.access(p, os.X_OK)]
        if not (self.kwok_stages / "pod-ready.yaml").is_file():
            gone.append(self.kwok_stages)
        return gone


def kwok_stage_files(cached: Path) -> list[str]:
    """kwok's stage definitions from the build cache, each replaced by ours of the same name."""
    own = {p.name: p for p in OWN_KWOK_STAGES.glob("*.yaml")}
    theirs = {p.name: p for p in cached.glob("*.yaml")}
    return [str(p) for _, p in sorted({**theirs, **own}.items())]


def go_toolchain() -> str | None:
    """The Go binary build.sh would use (``$GO``, go on PATH, /usr/local/go), or None."""
    if os.environ.get("GO"):
        return shutil.which(os.environ["GO"])
    fallback = "/usr/local/go/bin/go"
    return shutil.which("go") or (fallback if os.access(fallback, os.X_OK) else None)


class Component(ChildProcess):
    """One control-plane program with its own log file (the command line first), killed with the
    test process if that dies (pytest-timeout's thread method and a killed pytest skip every
    teardown)."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        super().__init__(argv, log_path, new_session=True, bound_to_parent=True, header=True)
        self.name = name

    def log_tail(self, lines: int = 40) -> str:
        return super().log_tail(lines) if self.log_path.exists() else "(no log file)"


class ControlPlane:
    """etcd + kube-apiserver, and on request kube-controller-manager, kube-scheduler and kwok.

    Use as a context manager or call :meth:`start` / :meth:`stop`. After :meth:`start`,
    :attr:`kubeconfig` is an admin kubeconfig (client certificate in ``system:masters``, data
    embedded, so it can be copied) that kubectl, helm, kopf and the Python client accept.
    """

    def __init__(
        self,
        workdir: Path,
        binaries: Binaries | None = None,
        *,
        start_timeout: float = 60.0,
    ) -> None:
        self.workdir = workdir
        self.binaries = binaries or Binaries.locate()
        self.start_timeout = start_timeout
        self.kubeconfig = workdir / "admin.kubeconfig"
        self.log_dir = workdir / "logs"
        self.audit_log = workdir / "logs" / "audit.jsonl"
        """The API server's audit log (one JSON event per line, see :data:`AUDIT_POLICY`)."""
        self.components: dict[str, Component] = {}
        self.apiserver_port = 0
        self.workloads_running = False
        self.timings: dict[str, float] = {}
        """Seconds from start to ready per phase, for the report in the test summary."""
        self._pki: certificates.Files | None = None

    # -- public ------------------------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://{HOST}:{self.apiserver_port}"

    def start(self) -> None:
        """Start etcd and the API server; return once ``/readyz`` answers ok."""
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._pki = certificates.generate(self.workdir / "pki", service_ip=SERVICE_IP)
        self._retry_port_races(self._start_apiserver)
        self._write_kubeconfig()
        self.timings["apiserver_ready_s"] = time.monotonic() - t0

    def start_workloads(self) -> None:
        """Add controller manager, scheduler and kwok with one Ready fake node (idempotent)."""
        if self.workloads_running:
            return
        t0 = time.monotonic()
        self._retry_port_races(self._start_workloads)
        self.workloads_running = True
        self.timings["workloads_ready_s"] = time.monotonic() - t0

    def _retry_port_races(self, start: Callable[[], None]) -> None:
        """Run ``start``; again with fresh ports when a component lost its port to another
        process between :func:`free_port` and its bind (other test runs share this machine)."""
        for attempt in range(1, 4):
            before = set(self.components)
            try:
                start()
                return
            except ComponentFailed:
                spawned = [n for n in self.components if n not in before]
                lost_port = any(
                    "address already in use" in self.components[n].log_tail(400) for n in spawned
                )
                if not lost_port or attempt == 3:
                    raise  # components stay listed, so their logs reach the failure report
                for name in reversed(spawned):
                    self.components.pop(name).stop()

    def _start_apiserver(self) -> None:
        assert self._pki is not None
        shutil.rmtree(self.workdir / "etcd", ignore_errors=True)  # from an attempt that lost a port
        etcd_client, etcd_peer = free_port(), free_port()
        etcd = self._spawn(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=dsm-test",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls=http://{HOST}:{etcd_client}",
                f"--advertise-client-urls=http://{HOST}:{etcd_client}",
                f"--listen-peer-urls=http://{HOST}:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://{HOST}:{etcd_peer}",
                f"--initial-cluster=dsm-test=http://{HOST}:{etcd_peer}",
                "--unsafe-no-fsync",  # throw-away data: durability costs seconds per test run
                "--log-level=warn",
            ],
        )
        self._wait(etcd, lambda: _http_ok(HOST, etcd_client, "/health", None))

        self.apiserver_port = free_port()
        pki = self._pki
        audit_policy = self.workdir / "audit-policy.yaml"
        audit_policy.write_text(yaml.safe_dump(AUDIT_POLICY, sort_keys=False))
        self.audit_log.parent.mkdir(parents=True, exist_ok=True)
        apiserver = self._spawn(
            "kube-apiserver",
            [
                str(self.binaries.kube_apiserver),
                f"--etcd-servers=http://{HOST}:{etcd_client}",
                f"--bind-address={HOST}",
                f"--advertise-address={HOST}",
                f"--secure-port={self.apiserver_port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_cert}",
                "--authorization-mode=RBAC",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--service-account-issuer={self.server}",
                f"--service-account-key-file={pki.service_account_pub}",
                f"--service-account-signing-key-file={pki.service_account_key}",
                "--allow-privileged=true",
                f"--enable-admission-plugins={ADMISSION_PLUGINS}",
                f"--audit-policy-file={audit_policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",  # an event is on disk before its response is sent
                # The 127.0.0.1 advertise address is a loopback endpoint, which Endpoints
                # validation refuses; nothing in-cluster dials the kubernetes Service here, so
                # skip reconciling it.
                "--endpoint-reconciler-type=none",
                "--v=1",
            ],
        )
        ctx = self._client_tls()
        self._wait(apiserver, lambda: _http_ok(HOST, self.apiserver_port, "/readyz", ctx))

    def _start_workloads(self) -> None:
        if self._pki is None:
            raise RuntimeError("start() the control plane first")
        pki = self._pki
        kc = str(self.kubeconfig)
        cm_port, sched_port = free_port(), free_port()
        cm = self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries.kube_controller_manager),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                f"--bind-address={HOST}",
                f"--secure-port={cm_port}",
                f"--cert-dir={self.workdir / 'controller-manager-certs'}",
                f"--service-account-private-key-file={pki.service_account_key}",
                f"--root-ca-file={pki.ca_cert}",
                f"--cluster-signing-cert-file={pki.ca_cert}",
                f"--cluster-signing-key-file={pki.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--use-service-account-credentials",
                # At start-up every controller gets its own service account and token; the default
                # client limit of 20 requests/s turns that into ~5 s before pods can be created.
                "--kube-api-qps=500",
                "--kube-api-burst=1000",
                "--leader-elect=false",
                "--v=1",
            ],
        )
        scheduler = self._spawn(
            "kube-scheduler",
            [
                str(self.binaries.kube_scheduler),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                f"--bind-address={HOST}",
                f"--secure-port={sched_port}",
                f"--cert-dir={self.workdir / 'scheduler-certs'}",
                "--leader-elect=false",
                "--v=1",
            ],
        )
        stages = kwok_stage_files(self.binaries.kwok_stages)
        kwok = self._spawn(
            "kwok",
            [
                str(self.binaries.kwok),
                f"--kubeconfig={kc}",
                *(f"--config={s}" for s in stages),
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                f"--cidr={POD_CIDR}",
                f"--node-ip={HOST}",
                f"--server-address={HOST}:{free_port()}",
                "--node-lease-duration-seconds=40",
                "-v=INFO",
            ],
        )
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE  # self-signed serving certs of the components' healthz
        self._wait(cm, lambda: _http_ok(HOST, cm_port, "/healthz", insecure))
        # healthz answers before the controllers run; the service-account controller making
        # default/default shows they do (and pods are refused in a namespace until it has).
        self._wait(cm, lambda: self.request("GET", _DEFAULT_SA)[0] == 200)
        self._wait(scheduler, lambda: _http_ok(HOST, sched_port, "/healthz", insecure))
        self._register_fake_node()
        self._wait(kwok, self._fake_node_ready)

    def stop(self) -> None:
        """Stop every component, newest first; logs and the working directory stay for reading."""
        for component in reversed(list(self.components.values())):
            component.stop(grace=10)
        self.workloads_running = False

    def api_client(self) -> Any:
        """A new ``kubernetes.client.ApiClient`` for the admin kubeconfig (caller closes it)."""
        # Imported late: plain users of this module need not have the client. Typed as Any because
        # kubernetes' own annotations differ between releases.
        from kubernetes import config

        loader: Any = config
        return loader.new_client_from_config(config_file=str(self.kubeconfig))

    def log_files(self) -> dict[str, Path]:
        return {name: c.log_path for name, c in self.components.items()}

    def log_tails(self, lines: int = 40) -> dict[str, str]:
        return {name: c.log_tail(lines) for name, c in self.components.items()}

    def dead_components(self) -> list[str]:
        return [name for name, c in self.components.items() if not c.running]

    def __enter__(self) -> ControlPlane:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: Sequence[str]) -> Component:
        component = Component(name, list(argv), self.log_dir / f"{name}.log")
        self.components[name] = component
        component.start()
        return component

    def _wait(self, component: Component, ready: Callable[[], bool]) -> None:
        """Until ``ready()`` (a health endpoint: there is nothing to wait on instead); raises
        :class:`ComponentFailed` with the log tail if the component exits or stays unhealthy."""

        def alive_and_ready() -> bool:
            if not component.running:
                raise ComponentFailed(
                    f"{component.name} exited with code {component.returncode} during start-up;"
                    f" log {component.log_path}:\n{component.log_tail()}"
                )
            return ready()

        try:
            wait_until(alive_and_ready, self.start_timeout, f"{component.name} healthy", None, 0.5)
        except TimedOut:
            raise ComponentFailed(
                f"{component.name} not healthy after {self.start_timeout:.0f} s; "
                f"log {component.log_path}:\n{component.log_tail()}"
            ) from None

    def _client_tls(self) -> ssl.SSLContext:
        assert self._pki is not None
        ctx = ssl.create_default_context(cafile=str(self._pki.ca_cert))
        ctx.load_cert_chain(str(self._pki.admin_cert), str(self._pki.admin_key))
        return ctx

    def _write_kubeconfig(self) -> None:
        assert self._pki is not None

        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "dsm-test",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": b64(self._pki.ca_cert),
                    },
                }
            ],
            "users": [
                {
                    "name": "dsm-test-admin",
                    "user": {
                        "client-certificate-data": b64(self._pki.admin_cert),
                        "client-key-data": b64(self._pki.admin_key),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "dsm-test",
                    "context": {"cluster": "dsm-test", "user": "dsm-test-admin"},
                }
            ],
            "current-context": "dsm-test",
        }
        self.kubeconfig.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.kubeconfig.chmod(0o600)

    def request(self, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
        """An admin REST call returning (HTTP status, decoded JSON): start-up and tests that want
        the raw API use it instead of the Python client, whose models differ between releases."""
        conn = http.client.HTTPSConnection(HOST, self.apiserver_port, context=self._client_tls())
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Accept": "application/json", "Content-Type": "application/json"}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, json.loads(data) if data else None
        finally:
            conn.close()

    def _register_fake_node(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": FAKE_NODE,
                "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                "labels": {
                    "kubernetes.io/hostname": FAKE_NODE,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                },
            },
            "spec": {"podCIDR": POD_CIDR, "podCIDRs": [POD_CIDR]},
        }
        status, reply = self.request("POST", "/api/v1/nodes", node)
        if status not in (201, 409):
            raise ComponentFailed(
                f"registering fake node {FAKE_NODE} failed: HTTP {status} {reply}"
            )

    def _fake_node_ready(self) -> bool:
        status, node = self.request("GET", f"/api/v1/nodes/{FAKE_NODE}")
        if status != 200:
            return False
        conditions = (node.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _http_ok(host: str, port: int, path: str, tls: ssl.SSLContext | None) -> bool:
    conn: http.client.HTTPConnection
    if tls is None:
        conn = http.client.HTTPConnection(host, port, timeout=2)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=2, context=tls)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def running(workdir: Path, *, workloads: bool = False) -> Iterator[ControlPlane]:
    """``with running(path, workloads=True) as cp:``: a control plane for scripts and debugging."""
    with ControlPlane(workdir) as cp:
        if workloads:
            cp.start_workloads()
        yield cp


if __name__ == "__main__":
    # Manual use: python -m tests.k8s.controlplane [workdir] -- start everything, print the
    # kubeconfig path, wait for Ctrl-C.
    import tempfile

    where = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="dsm-k8s-"))
    started = time.monotonic()
    with running(where, workloads=True) as plane:
        print(f"ready in {time.monotonic() - started:.1f} s {plane.timings}")
        print(f"export KUBECONFIG={plane.kubeconfig}\nlogs: {plane.log_dir}\nCtrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()

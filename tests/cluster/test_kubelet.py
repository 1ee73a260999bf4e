"""The mini kubelet (tests/k8s/kubelet.py) runs a pod the way a kubelet does, against the real
control plane: the scheduler binds the pod to the kubelet's own Node, the kubelet gives it a
loopback IP of its own, resolves its environment (a ``fieldRef``) and its Secret volume, starts
its command as a real process, marks it Ready only once its readiness probe really answers, and on
deletion stops the process with SIGTERM within the grace period and removes the pod.

A plain ``python -m http.server`` stands in for a product: nothing here knows dsm.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.kubeapi import KubeApi
from tests.k8s.kubelet import MiniKubelet, toleration
from tests.k8s.plugin import Cluster
from tests.support.waiting import wait_until

pytestmark = pytest.mark.cluster

NODE = "kit-kubelet"
PORT = 8080
PAGE = b"served from a Secret volume"


def pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {NODE: "true"},
            "tolerations": [toleration(NODE)],
            "terminationGracePeriodSeconds": 20,
            "automountServiceAccountToken": False,  # projected volumes are not simulated
            "volumes": [{"name": "site", "secret": {"secretName": "site"}}],
            "containers": [
                {
                    "name": "web",
                    "image": "example.test/web:1",
                    "command": ["python3", "-m", "http.server"],
                    "args": ["--bind", "$(POD_IP)", "--directory", "/srv/site", str(PORT)],
                    "env": [
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
                    ],
                    "volumeMounts": [{"name": "site", "mountPath": "/srv/site", "readOnly": True}],
                    "readinessProbe": {"httpGet": {"path": "/index.html", "port": PORT}},
                }
            ],
        },
    }


def ready_ip(api: KubeApi, path: str) -> str | None:
    status = (api.get(path) or {}).get("status") or {}
    ready = any(
        c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or ()
    )
    return status.get("podIP") if ready else None


def test_a_pod_runs_as_a_process_turns_ready_by_its_probe_and_stops_on_deletion(
    k8s_workloads: Cluster, k8s_namespace: str, tmp_path: Path
) -> None:
    api = KubeApi(k8s_workloads.kubeconfig)
    kubelet = MiniKubelet(
        api,
        tmp_path / "kubelet",
        commands={"python3": [sys.executable]},
        pod_ip_env="POD_ADDRESS",
        pod_ports=(PORT,),
        node_name=NODE,
        node_label=NODE,
        second_octet=192 + os.getpid() % 32,  # apart from the e2e kubelet's 127.64-127.127
    ).start()
    ns = k8s_namespace
    path = f"/api/v1/namespaces/{ns}/pods/web"
    try:
        api.expect(
            "POST",
            f"/api/v1/namespaces/{ns}/secrets",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "site"},
                "stringData": {"index.html": PAGE.decode()},
            },
        )
        api.expect("POST", f"/api/v1/namespaces/{ns}/pods", pod("web"))

        def report() -> str:
            events = "\n".join(f"{e.kind} {e.detail}" for e in kubelet.events_of(ns))
            return f"pod: {api.get(path)}\nkubelet: {events}\n{kubelet.logs(ns)}"

        ip = wait_until(lambda: ready_ip(api, path), 90, "the pod Ready", report)
        assert ip.startswith("127.") and ip == kubelet.pod_ip(ns, "web")
        assert api.expect("GET", path)["spec"]["nodeName"] == NODE
        with urllib.request.urlopen(f"http://{ip}:{PORT}/index.html", timeout=10) as r:
            assert r.read() == PAGE  # the Secret, mounted where the pod said, served
        pid = kubelet.pid_of(ns, "web")
        assert pid is not None
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"POD_IP={ip}".encode() in environ and f"POD_ADDRESS={ip}".encode() in environ

        api.expect("DELETE", path, {"kind": "DeleteOptions", "apiVersion": "v1"})
        wait_until(lambda: api.get(path) is None, 60, "the kubelet to remove the pod")
        kinds = [e.kind for e in kubelet.events_of(ns)]
        assert kinds[:2] == ["spawned", "ready"], kinds
        assert "terminating" in kinds and "killed" not in kinds, kinds  # SIGTERM was enough
        exited = [e for e in kubelet.events_of(ns) if e.kind == "exited"]
        assert [e.detail for e in exited] == ["code -15 after SIGTERM"], kinds
        assert not Path(f"/proc/{pid}").exists()
        assert kubelet.errors == []
    finally:
        kubelet.forget_namespace(ns)
        kubelet.stop()

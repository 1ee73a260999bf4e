"""The mini kubelet's pure parts (tests/k8s/kubelet.py), without a control plane: how a pod's
container becomes a local process (command, ``$(VAR)`` expansion, ``env``/``envFrom`` from
Secrets, ConfigMaps and the downward API, volumes written to disk and paths rewritten to them),
what it refuses as a kubelet would, its loopback pod addresses and its probe settings.

The API is a dictionary of objects standing in for the API server's GETs; tests/cluster/
test_kubelet.py runs a pod against the real one.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.kubelet import (
    AddressPool,
    ConfigError,
    MiniKubelet,
    PodRunner,
    Probe,
    _expand,
    toleration,
)
from tests.support.loopback import free_port

NS = "ns"


class FakeApi:
    """GET of the objects in ``objects`` (path -> body); 404 (None) for anything else."""

    def __init__(self, objects: dict[str, dict[str, Any]]) -> None:
        self.objects = objects

    def get(self, path: str) -> dict[str, Any] | None:
        return self.objects.get(path)


def secret(name: str, **data: str) -> tuple[str, dict[str, Any]]:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return f"/api/v1/namespaces/{NS}/secrets/{name}", {"data": encoded}


def config_map(name: str, **data: str) -> tuple[str, dict[str, Any]]:
    return f"/api/v1/namespaces/{NS}/configmaps/{name}", {"data": data}


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[MiniKubelet]:
    api = FakeApi(
        dict(
            [
                secret("db", url="postgresql://u:p@127.0.0.1/app", unused="x"),
                config_map("tuning", WORKERS="4", MODE="fast"),
            ]
        )
    )
    k = MiniKubelet(
        api,  # type: ignore[arg-type]
        tmp_path / "kubelet",
        commands={"app": ["/usr/bin/python3", "-m", "app"]},
        extra_env={"PYTHONPATH": "/src"},
        pod_ip_env="APP_BIND_ADDRESS",
    )
    yield k
    k._probes.shutdown()


def runner(tmp_path: Path, container: dict[str, Any], **spec: Any) -> PodRunner:
    pod = {
        "metadata": {"name": "app-0", "namespace": NS, "uid": "0123456789abcdef"},
        "spec": {"containers": [{"name": "app", **container}], **spec},
    }
    return PodRunner(NS, "app-0", "0123456789abcdef", pod, "127.99.0.7", tmp_path / "pod")


def test_a_container_becomes_the_local_program_with_the_pods_environment(
    kubelet: MiniKubelet, tmp_path: Path
) -> None:
    kubelet.add_env_rule({"MODE": "fast"}, {"APP_EXTRA": "from a rule"})
    r = runner(
        tmp_path,
        {
            "command": ["app", "serve"],
            "args": ["--config", "/etc/app/db/url", "--workers", "$(WORKERS)", "$$(NOT_EXPANDED)"],
            "envFrom": [{"configMapRef": {"name": "tuning"}}],
            "env": [
                {
                    "name": "DATABASE_URL",
                    "valueFrom": {"secretKeyRef": {"name": "db", "key": "url"}},
                },
                {"name": "GREETING", "value": "hello $(MODE) $(UNDEFINED)"},
                {
                    "name": "OPTIONAL",
                    "valueFrom": {"secretKeyRef": {"name": "db", "key": "nope", "optional": True}},
                },
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                {"name": "CERT_DIR", "value": "/etc/app/db"},
            ],
            "volumeMounts": [{"name": "db", "mountPath": "/etc/app/db", "readOnly": True}],
        },
        volumes=[
            {"name": "db", "secret": {"secretName": "db", "items": [{"key": "url", "path": "url"}]}}
        ],
    )
    argv, env = kubelet._container_process(r)

    volume = r.workdir / "volumes" / "db"
    assert (volume / "url").read_text() == "postgresql://u:p@127.0.0.1/app"
    assert not (volume / "unused").exists()  # only the listed items
    assert argv == [
        "/usr/bin/python3", "-m", "app", "serve",
        "--config", str(volume / "url"), "--workers", "4", "$(NOT_EXPANDED)",
    ]  # fmt: skip
    assert env["DATABASE_URL"] == "postgresql://u:p@127.0.0.1/app"
    assert env["GREETING"] == "hello fast $(UNDEFINED)"
    assert "OPTIONAL" not in env
    assert (env["POD"], env["POD_IP"], env["UID"]) == ("app-0", "127.99.0.7", "0123456789abcdef")
    assert env["CERT_DIR"] == str(volume)  # a path into a mount points at the written files
    assert (env["WORKERS"], env["APP_EXTRA"], env["PYTHONPATH"]) == ("4", "from a rule", "/src")
    assert env["APP_BIND_ADDRESS"] == "127.99.0.7"
    assert env["HOME"] == str(r.workdir) and env["HOSTNAME"] == "app-0"


def test_the_pod_ip_variable_wins_over_the_pods_own_value(
    kubelet: MiniKubelet, tmp_path: Path
) -> None:
    r = runner(
        tmp_path, {"command": ["app"], "env": [{"name": "APP_BIND_ADDRESS", "value": "0.0.0.0"}]}
    )
    assert kubelet._container_process(r)[1]["APP_BIND_ADDRESS"] == "127.99.0.7"


@pytest.mark.parametrize(
    ("container", "spec", "words"),
    [
        ({"command": ["nginx"]}, {}, "no local program for command 'nginx'"),
        ({}, {}, "container without command"),
        (
            {
                "command": ["app"],
                "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}}],
            },
            {},
            "secret 'gone' not found",
        ),
        (
            {
                "command": ["app"],
                "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "db", "key": "k"}}}],
            },
            {},
            "secret 'db' has no key 'k'",
        ),
        (
            {
                "command": ["app"],
                "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.hostname"}}}],
            },
            {},
            "fieldRef 'spec.hostname' is not simulated",
        ),
        (
            {
                "command": ["app"],
                "volumeMounts": [{"name": "token", "mountPath": "/var/run/token"}],
            },
            {"volumes": [{"name": "token", "projected": {"sources": []}}]},
            "volume type of 'token' is not simulated",
        ),
        (
            {"command": ["app"], "volumeMounts": [{"name": "missing", "mountPath": "/x"}]},
            {},
            "volume 'missing' not found",
        ),
    ],
)
def test_what_a_kubelet_would_refuse_is_a_config_error(
    kubelet: MiniKubelet,
    tmp_path: Path,
    container: dict[str, Any],
    spec: dict[str, Any],
    words: str,
) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        kubelet._container_process(runner(tmp_path, container, **spec))


def test_expansion_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert _expand("$(A)-$(B)", env) == "1-two"
    assert _expand("$(C)", env) == "$(C)"  # undefined: left as written
    assert _expand("$$(A) costs $$5", env) == "$(A) costs $5"  # $$ escapes


def test_pod_addresses_skip_one_whose_port_is_taken() -> None:
    port = free_port()
    with socket.socket() as held:
        held.bind(("127.250.0.2", port))
        held.listen()
        pool = AddressPool(250, (port,))
        assert pool.allocate() == "127.250.0.3"
    assert pool.allocate() == "127.250.0.4"


def test_probe_periods_are_capped_and_thresholds_honoured() -> None:
    probe = Probe({"periodSeconds": 10, "failureThreshold": 5}, period_cap=1.0)
    assert (probe.period, probe.failure_threshold, probe.success_threshold) == (1.0, 5, 1)
    assert Probe({"periodSeconds": 0.5}, period_cap=1.0).period == 0.5


def test_named_ports_resolve_through_the_container(kubelet: MiniKubelet, tmp_path: Path) -> None:
    r = runner(tmp_path, {"command": ["app"], "ports": [{"name": "https", "containerPort": 4119}]})
    assert kubelet._port(r, "https") == 4119 and kubelet._port(r, 8080) == 8080
    with pytest.raises(ValueError, match="no container port named 'metrics'"):
        kubelet._port(r, "metrics")


def test_a_pod_tolerates_the_taint_of_its_kubelets_label() -> None:
    assert toleration("kit") == {
        "key": "kit",
        "operator": "Equal",
        "value": "true",
        "effect": "NoSchedule",
    }

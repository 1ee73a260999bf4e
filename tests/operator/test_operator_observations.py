"""Kubernetes bodies to planner states; settings; the node API's answers."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from dsm_operator.gateways import nodeapi
from dsm_operator.reconcile import names, observations
from dsm_operator.settings import OperatorSettings


def pod_body(name: str, **kw: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "uid": "u",
            "creationTimestamp": kw.get("created", "2026-01-01T00:00:00Z"),
            "labels": {
                "controller-revision-hash": kw.get("rev", "m-abc"),
                names.LABEL_VERSION: "1.0.0",
            },
            **({"deletionTimestamp": "2026-01-01T00:01:00Z"} if kw.get("deleting") else {}),
        },
        "status": {
            "phase": kw.get("phase", "Running"),
            "podIP": kw.get("ip", "127.1.0.5"),
            "conditions": [{"type": "Ready", "status": kw.get("ready", "True")}],
        },
    }


def test_pod_state() -> None:
    state = observations.pod_state("m", pod_body("m-3"))
    assert state is not None
    assert state.ordinal == 3
    assert state.ready
    assert not state.terminating
    assert state.revision == "m-abc"
    assert state.version == "1.0.0"
    assert state.ip == "127.1.0.5"
    assert state.created_at == datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("kw", "ready", "terminating"),
    [
        ({"ready": "False"}, False, False),
        ({"phase": "Pending", "ready": "False"}, False, False),
        ({"deleting": True}, True, True),
        ({"phase": "Failed", "ready": "False"}, False, True),
        ({"phase": "Succeeded", "ready": "False"}, False, True),
    ],
)
def test_pod_readiness_and_termination(kw: dict[str, Any], ready: bool, terminating: bool) -> None:
    state = observations.pod_state("m", pod_body("m-0", **kw))
    assert state is not None
    assert (state.ready, state.terminating) == (ready, terminating)


def test_pod_without_conditions_is_not_ready() -> None:
    body = pod_body("m-0")
    body["status"] = {"phase": "Pending"}
    state = observations.pod_state("m", body)
    assert state is not None and not state.ready


@pytest.mark.parametrize("name", ["other-0", "m-x", "m-01", "m-", "mm-0"])
def test_foreign_pods_are_ignored(name: str) -> None:
    assert observations.pod_state("m", pod_body(name)) is None


def test_pod_states_sorted() -> None:
    states = observations.pod_states("m", [pod_body("m-10"), pod_body("m-2"), pod_body("x-1")])
    assert [s.name for s in states] == ["m-2", "m-10"]


def test_kubernetes_client_datetimes_are_accepted() -> None:
    body = pod_body("m-0", created=datetime.datetime(2026, 1, 1))
    state = observations.pod_state("m", body)
    assert state is not None and state.created_at is not None and state.created_at.tzinfo


@pytest.mark.parametrize(
    ("generation", "observed", "expected"), [(2, 2, True), (3, 2, False), (2, None, False)]
)
def test_set_state(generation: int, observed: int | None, expected: bool) -> None:
    body = {
        "metadata": {"generation": generation},
        "spec": {"replicas": 4},
        "status": {"updateRevision": "m-1", "observedGeneration": observed},
    }
    state = observations.set_state(body)
    assert state is not None
    assert state.replicas == 4
    assert state.update_revision == "m-1"
    assert state.observed is expected


def test_set_state_absent() -> None:
    assert observations.set_state(None) is None


@pytest.mark.parametrize(
    ("ingress", "expected"),
    [
        ([{"ip": "203.0.113.7"}], "203.0.113.7"),
        ([{"hostname": "lb.example"}], "lb.example"),
        ([], None),
    ],
)
def test_load_balancer_address(ingress: list[dict[str, str]], expected: str | None) -> None:
    assert (
        observations.load_balancer_address({"status": {"loadBalancer": {"ingress": ingress}}})
        == expected
    )


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("networks", "address", "allowed"),
    [
        ([], "10.1.2.3", True),
        (["127.0.0.0/8"], "127.1.0.9", True),
        (["127.0.0.0/8"], "10.1.2.3", False),
        (["127.0.0.0/8"], None, False),
        (["127.0.0.0/8"], "not-an-ip", False),
        (["10.0.0.0/8", "fd00::/8"], "fd00::1", True),
    ],
)
def test_may_dial(networks: list[str], address: str | None, allowed: bool) -> None:
    assert OperatorSettings(node_api_networks=networks).may_dial(address) is allowed


def test_node_api_can_be_switched_off() -> None:
    assert not OperatorSettings(node_api_enabled=False).may_dial("127.0.0.1")


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSM_OPERATOR_NODE_API_NETWORKS", '["127.0.0.0/8"]')
    monkeypatch.setenv("DSM_OPERATOR_RECONCILE_INTERVAL_SECONDS", "1.5")
    settings = OperatorSettings()
    assert settings.node_api_networks == ["127.0.0.0/8"]
    assert settings.reconcile_interval_seconds == 1.5


def test_bad_network_is_refused() -> None:
    with pytest.raises(ValueError, match="does not appear"):
        OperatorSettings(node_api_networks=["nonsense"])


# --- node API ---------------------------------------------------------------------------------


def test_parse_nodes() -> None:
    body = {
        "nodes": [
            {"name": "m-0", "address": "127.1.0.1", "version": "1.0.0", "status": "Online"},
            {"name": "m-1", "status": "Offline (Upgrade Required)", "lastHeartbeat": "x"},
        ]
    }
    reports = nodeapi.parse_nodes(body)
    assert [(r.name, r.status, r.version, r.address) for r in reports] == [
        ("m-0", "Online", "1.0.0", "127.1.0.1"),
        ("m-1", "Offline (Upgrade Required)", None, None),
    ]


@pytest.mark.parametrize(
    "body", [None, [], {}, {"nodes": {}}, {"nodes": [{"name": "x"}]}, {"nodes": ["m-0"]}]
)
def test_parse_nodes_refuses_malformed_bodies(body: Any) -> None:
    with pytest.raises(nodeapi.NodeApiError):
        nodeapi.parse_nodes(body)


@pytest.mark.parametrize(
    ("address", "url"),
    [("127.1.0.1", "https://127.1.0.1:4119"), ("fd00::1", "https://[fd00::1]:4119")],
)
def test_target_url(address: str, url: str) -> None:
    assert nodeapi.Target(address, "m-0.m-nodes.ns.svc").base_url == url


def test_ssl_context_without_ca_does_not_verify() -> None:
    import ssl

    ctx = nodeapi.ssl_context(None)
    assert ctx.verify_mode == ssl.CERT_NONE
    assert not ctx.check_hostname

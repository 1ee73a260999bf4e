"""What the children look like for a given spec."""

from __future__ import annotations

from typing import Any

import pytest

from dsm_operator.reconcile import manifests, names
from dsm_operator.reconcile.specs import ManagerSpec, Owner, SecretInputs

OWNER = Owner(name="mgr", namespace="sec", uid="uid-1")
BASE: dict[str, Any] = {
    "version": "20.0.1",
    "nodes": 3,
    "database": {"secretRef": {"name": "db"}},
    "masterKey": {"localSecretRef": {"name": "mk"}},
}


def spec(**overrides: Any) -> ManagerSpec:
    return ManagerSpec.parse({**BASE, **overrides})


def sts(s: ManagerSpec | None = None, **kw: Any) -> dict[str, Any]:
    return manifests.statefulset(
        s or spec(),
        OWNER,
        replicas=kw.get("replicas", 1),
        image=kw.get("image", "repo/node:20.0.1"),
        secrets_hash=kw.get("secrets_hash", "h1"),
    )


def container(s: ManagerSpec | None = None) -> dict[str, Any]:
    return dict(sts(s)["spec"]["template"]["spec"]["containers"][0])


def env(s: ManagerSpec | None = None) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(s)["env"]}


def kinds(s: ManagerSpec, *, sm: bool = True) -> list[str]:
    return [
        f"{m['kind']}/{m['metadata']['name']}"
        for m in manifests.children(
            s,
            OWNER,
            replicas=1,
            default_repository="repo/node",
            secrets_hash="h",
            service_monitor_api=sm,
        )
    ]


# --- StatefulSet ------------------------------------------------------------------------------


def test_statefulset_leaves_ordering_to_the_operator() -> None:
    body = sts()
    assert body["spec"]["podManagementPolicy"] == "Parallel"
    assert body["spec"]["updateStrategy"] == {"type": "OnDelete"}
    assert body["spec"]["serviceName"] == "mgr-nodes"


@pytest.mark.parametrize("replicas", [1, 2, 7])
def test_statefulset_replicas_come_from_the_planner_not_the_spec(replicas: int) -> None:
    assert sts(replicas=replicas)["spec"]["replicas"] == replicas


def test_owner_reference_is_controller() -> None:
    ref = sts()["metadata"]["ownerReferences"][0]
    assert ref == {
        "apiVersion": "security.dsm.dev/v1alpha1",
        "kind": "DeepSecurityManager",
        "name": "mgr",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_selector_is_in_template_labels() -> None:
    body = sts()
    selector = body["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "dsm-node", "app.kubernetes.io/instance": "mgr"}
    assert selector.items() <= body["spec"]["template"]["metadata"]["labels"].items()


def test_user_pod_labels_cannot_override_the_selector() -> None:
    s = spec(podLabels={"app.kubernetes.io/instance": "evil", "team": "x"})
    labels = sts(s)["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == "mgr"
    assert labels["team"] == "x"


def test_entrypoint_is_the_node_runtime() -> None:
    assert container()["command"] == ["dsm", "node", "run"]


def test_probes_are_wired_to_the_node_contract() -> None:
    c = container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS"
        assert c[probe]["httpGet"]["port"] == "https"


@pytest.mark.parametrize(("timeout", "failures"), [(900, 90), (60, 6), (65, 7), (86400, 8640)])
def test_startup_probe_allows_the_whole_ready_timeout(timeout: int, failures: int) -> None:
    probe = container(spec(nodeReadyTimeoutSeconds=timeout))["startupProbe"]
    assert probe["failureThreshold"] == failures
    assert probe["periodSeconds"] * probe["failureThreshold"] >= timeout


def test_environment_per_node_contract() -> None:
    e = env(spec(timeZone="Europe/Berlin", offlineThresholdSeconds=240))
    assert e["DSM_SOFTWARE_VERSION"] == "20.0.1"
    assert e["DSM_NODE_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert e["DSM_ADVERTISE_ADDRESS"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert e["DSM_DATABASE_URL"] == {"secretKeyRef": {"name": "db", "key": "url"}}
    assert e["DSM_LOCAL_SECRET_FILE"] == "/etc/dsm/local-secret/localSecret"
    assert e["DSM_BOOTSTRAP_API_KEY_FILE"] == "/etc/dsm/api-key/apiKey"
    assert e["DSM_API_PORT"] == "4119"
    assert e["DSM_HEARTBEAT_PORT"] == "4120"
    assert e["DSM_OFFLINE_THRESHOLD_SECONDS"] == "240"
    assert e["TZ"] == "Europe/Berlin"
    assert "DSM_TLS_CERT_FILE" not in e


def test_custom_secret_keys() -> None:
    s = spec(
        database={"secretRef": {"name": "pg", "key": "dsn"}},
        masterKey={"localSecretRef": {"name": "k", "key": "secret"}},
    )
    e = env(s)
    assert e["DSM_DATABASE_URL"] == {"secretKeyRef": {"name": "pg", "key": "dsn"}}
    assert e["DSM_LOCAL_SECRET_FILE"] == "/etc/dsm/local-secret/secret"
    volumes = {v["name"]: v for v in sts(s)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["local-secret"]["secret"]["secretName"] == "k"
    assert volumes["local-secret"]["secret"]["items"] == [{"key": "secret", "path": "secret"}]


def test_tls_secret_is_mounted_and_named() -> None:
    s = spec(tls={"secretRef": {"name": "certs"}})
    e = env(s)
    assert e["DSM_TLS_CERT_FILE"] == "/etc/dsm/tls/tls.crt"
    assert e["DSM_TLS_KEY_FILE"] == "/etc/dsm/tls/tls.key"
    volumes = {v["name"]: v for v in sts(s)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "certs"
    mounts = {m["name"]: m for m in container(s)["volumeMounts"]}
    assert mounts["tls"]["readOnly"] is True


def test_api_key_comes_from_the_operator_managed_secret() -> None:
    volumes = {v["name"]: v for v in sts()["spec"]["template"]["spec"]["volumes"]}
    assert volumes["api-key"]["secret"]["secretName"] == "mgr-api-key"


def test_config_hash_annotation_on_the_template() -> None:
    annotations = sts(secrets_hash="abc")["spec"]["template"]["metadata"]["annotations"]
    assert annotations[names.CONFIG_HASH_ANNOTATION] == "abc"


def test_same_spec_same_template() -> None:
    assert sts() == sts()


def test_version_change_changes_image_env_and_label() -> None:
    a, b = sts(), sts(spec(version="20.0.2"), image="repo/node:20.0.2")
    assert a["spec"]["template"] != b["spec"]["template"]
    assert b["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"] == "20.0.2"


def test_node_count_does_not_change_the_template() -> None:
    assert sts(spec(nodes=1))["spec"]["template"] == sts(spec(nodes=9))["spec"]["template"]


def test_paused_does_not_change_the_template() -> None:
    assert sts(spec(paused=True))["spec"]["template"] == sts()["spec"]["template"]


@pytest.mark.parametrize(
    ("image", "expected"),
    [(None, "repo/node:20.0.1"), ("mirror.local/dsm:custom", "mirror.local/dsm:custom")],
)
def test_image_override(image: str | None, expected: str) -> None:
    s = spec(image=image) if image else spec()
    assert manifests.node_image(s, "repo/node") == expected


def test_pods_run_unprivileged() -> None:
    pod = sts()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == manifests.NODE_UID
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "mgr-node"
    c = pod["containers"][0]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_resources_only_when_given() -> None:
    assert "resources" not in container()
    s = spec(resources={"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}})
    assert container(s)["resources"] == {
        "limits": {"memory": "2Gi"},
        "requests": {"cpu": "500m", "memory": "1Gi"},
    }


def test_scheduling_is_passed_through() -> None:
    s = spec(
        scheduling={
            "nodeSelector": {"disk": "ssd"},
            "tolerations": [{"key": "dedicated", "operator": "Exists"}],
            "affinity": {"nodeAffinity": {}},
            "topologySpreadConstraints": [
                {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}
            ],
            "priorityClassName": "high",
        },
        imagePullSecrets=[{"name": "regcred"}],
    )
    pod = sts(s)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"disk": "ssd"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert pod["affinity"] == {"nodeAffinity": {}}
    assert pod["priorityClassName"] == "high"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    tsc = pod["topologySpreadConstraints"][0]
    assert tsc["labelSelector"] == {"matchLabels": names.selector_labels("mgr")}


def test_topology_spread_keeps_a_given_selector() -> None:
    given = {"matchLabels": {"x": "y"}}
    s = spec(
        scheduling={"topologySpreadConstraints": [{"topologyKey": "z", "labelSelector": given}]}
    )
    assert (
        sts(s)["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["labelSelector"] == given
    )


def test_no_scheduling_keys_by_default() -> None:
    pod = sts()["spec"]["template"]["spec"]
    for key in ("nodeSelector", "tolerations", "affinity", "topologySpreadConstraints"):
        assert key not in pod


def test_pod_annotations_are_added_but_hash_wins() -> None:
    s = spec(podAnnotations={"a": "b", names.CONFIG_HASH_ANNOTATION: "user"})
    annotations = sts(s, secrets_hash="real")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"a": "b", names.CONFIG_HASH_ANNOTATION: "real"}


# --- config hash ------------------------------------------------------------------------------


def test_config_hash_is_stable() -> None:
    a = SecretInputs(database_url=b"postgresql://a", local_secret=b"s", api_key=b"k")
    b = SecretInputs(database_url=b"postgresql://a", local_secret=b"s", api_key=b"k")
    assert manifests.config_hash(a) == manifests.config_hash(b)


@pytest.mark.parametrize(
    "change",
    [
        {"database_url": b"postgresql://b"},
        {"local_secret": b"t"},
        {"api_key": b"other"},
        {"tls": {"tls.crt": b"cert"}},
        {"database_url": None},
    ],
)
def test_config_hash_changes_with_content(change: dict[str, Any]) -> None:
    base = {"database_url": b"postgresql://a", "local_secret": b"s", "api_key": b"k"}
    assert manifests.config_hash(SecretInputs(**base)) != manifests.config_hash(
        SecretInputs(**{**base, **change})
    )


def test_config_hash_is_not_fooled_by_shifting_bytes_between_fields() -> None:
    a = SecretInputs(database_url=b"ab", local_secret=b"c")
    b = SecretInputs(database_url=b"a", local_secret=b"bc")
    assert manifests.config_hash(a) != manifests.config_hash(b)


# --- Services ---------------------------------------------------------------------------------


def test_headless_service_for_node_identity() -> None:
    svc = manifests.headless_service(OWNER)
    assert svc["metadata"]["name"] == "mgr-nodes"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert {p["port"] for p in svc["spec"]["ports"]} == {4119, 4120}


def test_load_balancer_passthrough_on_443() -> None:
    svc = manifests.load_balancer_service(spec(), OWNER)
    assert svc is not None
    assert svc["metadata"]["name"] == "mgr-lb"
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}
    ]
    assert svc["spec"]["sessionAffinity"] == "None"
    assert svc["spec"]["externalTrafficPolicy"] == "Cluster"
    assert "annotations" not in svc["metadata"]
    assert svc["spec"]["selector"] == names.selector_labels("mgr")


def test_load_balancer_options() -> None:
    s = spec(
        loadBalancer={
            "port": 8443,
            "annotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"},
            "sourceRanges": ["203.0.113.0/24"],
            "externalTrafficPolicy": "Local",
        }
    )
    svc = manifests.load_balancer_service(s, OWNER)
    assert svc is not None
    assert svc["spec"]["ports"][0]["port"] == 8443
    assert svc["spec"]["ports"][0]["targetPort"] == "https"
    assert svc["spec"]["loadBalancerSourceRanges"] == ["203.0.113.0/24"]
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert svc["metadata"]["annotations"] == {
        "service.beta.kubernetes.io/aws-load-balancer-type": "nlb"
    }


def test_cluster_ip_load_balancer_has_no_external_fields() -> None:
    svc = manifests.load_balancer_service(spec(loadBalancer={"serviceType": "ClusterIP"}), OWNER)
    assert svc is not None
    assert "externalTrafficPolicy" not in svc["spec"]
    assert "loadBalancerSourceRanges" not in svc["spec"]


def test_node_port_has_traffic_policy_but_no_source_ranges() -> None:
    svc = manifests.load_balancer_service(
        spec(loadBalancer={"serviceType": "NodePort", "sourceRanges": ["10.0.0.0/8"]}), OWNER
    )
    assert svc is not None
    assert svc["spec"]["externalTrafficPolicy"] == "Cluster"
    assert "loadBalancerSourceRanges" not in svc["spec"]


def test_load_balancer_disabled() -> None:
    assert manifests.load_balancer_service(spec(loadBalancer={"enabled": False}), OWNER) is None


# --- PDB, ServiceMonitor, ServiceAccount, API key ---------------------------------------------


@pytest.mark.parametrize("max_unavailable", [1, 2, "50%"])
def test_pdb(max_unavailable: int | str) -> None:
    pdb = manifests.pod_disruption_budget(
        spec(podDisruptionBudget={"maxUnavailable": max_unavailable}), OWNER
    )
    assert pdb is not None
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == max_unavailable
    assert pdb["spec"]["selector"]["matchLabels"] == names.selector_labels("mgr")


def test_pdb_disabled() -> None:
    assert (
        manifests.pod_disruption_budget(spec(podDisruptionBudget={"enabled": False}), OWNER) is None
    )


def test_service_monitor() -> None:
    sm = manifests.service_monitor(
        spec(monitoring={"interval": "15s", "labels": {"release": "prom"}}), OWNER
    )
    assert sm is not None
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"
    assert endpoint["scheme"] == "https"


def test_service_monitor_selects_only_the_headless_service() -> None:
    sm = manifests.service_monitor(spec(), OWNER)
    assert sm is not None
    headless = manifests.headless_service(OWNER)
    lb = manifests.load_balancer_service(spec(), OWNER)
    assert lb is not None
    selector = sm["spec"]["selector"]["matchLabels"].items()
    assert selector <= headless["metadata"]["labels"].items()
    assert not selector <= lb["metadata"]["labels"].items()


def test_service_account_has_no_token() -> None:
    sa = manifests.service_account(OWNER)
    assert sa["automountServiceAccountToken"] is False
    assert sa["metadata"]["name"] == "mgr-node"


def test_api_key_secret() -> None:
    secret = manifests.api_key_secret(OWNER, "k3y")
    assert secret["metadata"]["name"] == "mgr-api-key"
    assert secret["stringData"] == {"apiKey": "k3y"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


# --- the set of children ----------------------------------------------------------------------


def test_children_default() -> None:
    assert kinds(spec()) == [
        "ServiceAccount/mgr-node",
        "Service/mgr-nodes",
        "Service/mgr-lb",
        "Service/mgr-agents",
        "PodDisruptionBudget/mgr",
        "ServiceMonitor/mgr",
        "PrometheusRule/mgr",
        "StatefulSet/mgr",
    ]


def test_children_without_the_monitoring_api() -> None:
    assert "ServiceMonitor/mgr" not in kinds(spec(), sm=False)
    assert "PrometheusRule/mgr" not in kinds(spec(), sm=False)


def test_children_minimal() -> None:
    s = spec(
        loadBalancer={"enabled": False},
        podDisruptionBudget={"enabled": False},
        monitoring={"serviceMonitor": False, "prometheusRule": False},
    )
    assert kinds(s) == ["ServiceAccount/mgr-node", "Service/mgr-nodes", "StatefulSet/mgr"]
    assert {k for _, k, _ in manifests.unwanted_children(s, OWNER)} == {
        "Service",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
    }


def test_nothing_unwanted_by_default() -> None:
    assert manifests.unwanted_children(spec(), OWNER) == []


def test_every_child_is_owned_and_namespaced() -> None:
    for child in manifests.children(
        spec(),
        OWNER,
        replicas=1,
        default_repository="r",
        secrets_hash="h",
        service_monitor_api=True,
    ):
        assert child["metadata"]["namespace"] == "sec"
        assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "dsm-operator"


# --- how agents connect -----------------------------------------------------------------------


def test_agents_get_the_node_list_by_default() -> None:
    assert manifests.agent_settings(spec(), "lb.example") == dict.fromkeys(
        manifests.AGENT_SETTING_KEYS
    )


def test_agents_via_the_load_balancer() -> None:
    s = spec(agentConnection="loadBalancer", loadBalancer={"port": 8443})
    assert manifests.agent_settings(s, "lb.example") is None  # the heartbeat Service's missing
    assert manifests.agent_settings(s, "lb.example", "agents.example") == {
        "managerAddress": "lb.example",
        "managerPort": 8443,
        "heartbeatAddress": "agents.example",
        "heartbeatPort": 8443,
        "relayAddress": "lb.example",
        "relayPort": 8443,
    }


def test_the_heartbeat_channel_has_its_own_passthrough_service() -> None:
    """TCP 443 -> the heartbeat port, beside the console's 443 -> the API port; same type,
    annotations and source ranges (both are the same kind of public entry)."""
    s = spec(
        loadBalancer={
            "annotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"},
            "sourceRanges": ["203.0.113.0/24"],
        }
    )
    console = manifests.load_balancer_service(s, OWNER)
    agents = manifests.agent_load_balancer_service(s, OWNER)
    assert console is not None and agents is not None
    assert agents["metadata"]["name"] == "mgr-agents"
    assert agents["spec"]["type"] == console["spec"]["type"] == "LoadBalancer"
    assert [(p["port"], p["targetPort"], p["protocol"]) for p in agents["spec"]["ports"]] == [
        (443, "heartbeat", "TCP")
    ]
    assert [(p["port"], p["targetPort"]) for p in console["spec"]["ports"]] == [(443, "https")]
    assert agents["spec"]["loadBalancerSourceRanges"] == ["203.0.113.0/24"]
    assert agents["metadata"]["annotations"] == console["metadata"]["annotations"]
    assert agents["spec"]["selector"] == console["spec"]["selector"]
    off = spec(loadBalancer={"enabled": False})
    assert manifests.agent_load_balancer_service(off, OWNER) is None
    assert ("v1", "Service", "mgr-agents") in manifests.unwanted_children(off, OWNER)


def test_agents_via_a_load_balancer_without_an_address_wait() -> None:
    assert manifests.agent_settings(spec(agentConnection="loadBalancer"), None) is None

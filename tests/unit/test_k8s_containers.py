"""Unit tests (no marker: nothing to start) of how the mini kubelet turns a pod's securityContext
into podman options, and refuses what a kubelet refuses."""

from __future__ import annotations

import pytest

from tests.k8s.containers import ContainerConfigError, run_argv, security_args

RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def test_the_node_pods_security_context() -> None:
    assert security_args(RESTRICTED_POD, RESTRICTED_CONTAINER, "10001:10001") == [
        "--user=10001:10001",
        "--group-add=10001",
        "--read-only",
        "--read-only-tmpfs=false",  # Kubernetes adds no tmpfs: /tmp must be a volume
        "--security-opt=no-new-privileges",
        "--cap-drop=ALL",
    ]


def test_the_container_setting_wins_over_the_pods() -> None:
    args = security_args(
        {"runAsUser": 1000, "runAsGroup": 1000}, {"runAsUser": 2000}, "10001:10001"
    )
    assert args == ["--user=2000:1000"]


def test_without_run_as_user_the_images_user_is_checked() -> None:
    assert security_args({"runAsNonRoot": True}, {}, "10001:10001") == []
    with pytest.raises(ContainerConfigError, match="will run as root"):
        security_args({"runAsNonRoot": True}, {}, "")
    with pytest.raises(ContainerConfigError, match="will run as root"):
        security_args({"runAsNonRoot": True}, {"runAsUser": 0}, "10001")
    with pytest.raises(ContainerConfigError, match="non-numeric user"):
        security_args({"runAsNonRoot": True}, {}, "dsm")


def test_what_is_not_simulated_is_refused() -> None:
    with pytest.raises(ContainerConfigError, match="privileged"):
        security_args({}, {"privileged": True}, "")
    with pytest.raises(ContainerConfigError, match="Localhost"):
        security_args({"seccompProfile": {"type": "Localhost"}}, {}, "")


def test_values_of_the_environment_never_reach_the_command_line() -> None:
    argv = run_argv(
        name="ns-mgr-0",
        image="localhost/dsm-node-e2e:0.1.0",
        command=["dsm", "node", "run"],
        args=[],
        env={"DSM_DATABASE_URL": "postgresql://u:secret@127.0.0.1/db"},
        mounts=[],
        security=[],
    )
    assert "--env=DSM_DATABASE_URL" in argv
    assert not any("secret" in a for a in argv)
    assert argv[-1] == "localhost/dsm-node-e2e:0.1.0"
    assert '--entrypoint=["dsm", "node", "run"]' in argv


def test_the_operators_node_pods_run_with_a_read_only_root_and_an_empty_tmp() -> None:
    """The pod template the operator writes, translated as the kubelet runs it."""
    from dsm_operator.reconcile import manifests
    from dsm_operator.reconcile.specs import ManagerSpec, Owner

    spec = ManagerSpec.parse(
        {
            "version": "0.1.0",
            "nodes": 1,
            "database": {"secretRef": {"name": "db"}},
            "masterKey": {"localSecretRef": {"name": "key"}},
        }
    )
    template = manifests.pod_template(
        spec, Owner(name="mgr", namespace="ns", uid="u"), image="dsm-node:0.1.0", secrets_hash="h"
    )
    pod, container = template["spec"], template["spec"]["containers"][0]
    args = security_args(pod["securityContext"], container["securityContext"], "10001:10001")
    assert "--read-only" in args and "--read-only-tmpfs=false" in args
    assert "--user=10001:10001" in args
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert {"name": tmp["name"], "emptyDir": {"sizeLimit": "16Mi"}} in pod["volumes"]

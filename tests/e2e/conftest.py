"""e2e fixtures: the session's control plane (``k8s_workloads``) plus the mini kubelet, and per
test one DeepSecurityManager with a fresh database, its Secrets and its own operator process.

The plugins (``tests.support.postgres``, ``tests.support.nodes``, ``tests.cluster.plugin``) are
registered by the top-level tests/conftest.py; nothing is registered here.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import containers, harness
from tests.e2e.kubeapi import KubeApi
from tests.e2e.kubelet import MiniKubelet
from tests.support.jobtypes import CREATE_EFFECTS
from tests.support.nodes import set_settings

_databases = itertools.count()


@pytest.fixture(scope="session")
def e2e_api(k8s_workloads: Any) -> KubeApi:
    api = KubeApi(Path(k8s_workloads.kubeconfig))
    harness.install_crd(api)
    return api


@pytest.fixture(scope="session")
def kubelet(e2e_api: KubeApi, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MiniKubelet]:
    k = MiniKubelet(e2e_api, tmp_path_factory.mktemp("kubelet"))
    # The "next version" of the product carries a test-only schema change (tests/support).
    k.add_env_rule(
        {"DSM_SOFTWARE_VERSION": "0.2.0"}, {"DSM_EXTRA_MIGRATIONS_DIR": str(harness.V2_MIGRATIONS)}
    )
    k.start()
    try:
        yield k
    finally:
        k.stop()


@pytest.fixture(scope="session")
def e2e_images(kubelet: MiniKubelet) -> dict[str, str]:
    """version -> node image for the image-mode tests (built on the node image of ``make
    images``); from now on the kubelet runs pods of these images in podman."""
    version = containers.project_version()
    needed = [
        f"{containers.NODE_REPOSITORY}:{version}",
        f"{containers.OPERATOR_REPOSITORY}:{version}",
    ]
    reason = containers.unavailable_reason(needed)
    if reason is not None:
        verdict = "FAILED (CI=true)" if os.environ.get("CI") == "true" else "SKIPPED"
        message = f"E2E IMAGE TESTS {verdict}: {reason}"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    containers.remove_leftovers()
    images = containers.build_e2e_images()
    kubelet.container_images = (containers.E2E_REPOSITORY,)
    return images


@pytest.fixture
def manager(
    e2e_api: KubeApi,
    kubelet: MiniKubelet,
    k8s_workloads: Any,
    k8s_namespace: str,
    pg_server: Any,
    pg_template: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[harness.Manager]:
    """A DeepSecurityManager ``mgr`` (not yet applied) and its running operator.

    Parametrized indirectly: ``"process"`` (the default) runs the operator and the nodes as local
    processes; ``"image"`` runs the operator from its image and every node pod from the node
    image (tags 0.1.0 and 0.2.0, :func:`e2e_images`) in podman."""
    runtime = getattr(request, "param", "process")
    operator_image = None
    node_repository = harness.PROCESS_NODE_REPOSITORY
    if runtime == "image":
        request.getfixturevalue("e2e_images")
        operator_image = f"{containers.OPERATOR_REPOSITORY}:{containers.project_version()}"
        node_repository = containers.E2E_REPOSITORY
    db = f"e2e{os.getpid()}_{next(_databases)}"
    url = pg_server.create(db, template=pg_template)  # schema 2 at 0.1.0, no node yet
    harness.query(url, CREATE_EFFECTS)
    set_settings(
        url,
        heartbeat_interval_seconds=harness.HEARTBEAT_INTERVAL,
        offline_threshold_seconds=harness.OFFLINE_THRESHOLD,
    )
    m = harness.Manager(e2e_api, kubelet, k8s_namespace, url, runtime=runtime)
    m.create_secrets()
    operator = harness.OperatorProcess(
        Path(k8s_workloads.kubeconfig),
        k8s_namespace,
        tmp_path / "operator.log",
        image=operator_image,
        node_repository=node_repository,
    ).start()
    m.operator = operator
    try:
        yield m
    finally:
        operator = m.operator  # a test may have replaced it
        operator.stop()
        # No StatefulSet, no re-created pods: then stop what still runs, without grace.
        e2e_api.call(
            "DELETE",
            f"/apis/apps/v1/namespaces/{k8s_namespace}/statefulsets/{m.name}",
            {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
        )
        kubelet.forget_namespace(k8s_namespace)
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"=== operator log ({operator.log_path}) ===\n{operator.log_tail(150)}")
            print(f"=== node processes ===\n{kubelet.logs(k8s_namespace)}")
            print("=== kubelet events ===")
            for e in kubelet.events_of(k8s_namespace):
                print(f"{e.at:.3f} {e.pod} {e.uid[:8]} {e.kind} {e.detail}")
        pg_server.drop(db)

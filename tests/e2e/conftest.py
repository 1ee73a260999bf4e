"""e2e fixtures: the session's control plane (``k8s_workloads``) plus the mini kubelet, and per
test one DeepSecurityManager with a fresh database, its Secrets and its own operator process.

The plugins (``tests.support.postgres``, ``tests.k8s.plugin``) are registered by the top-level
tests/conftest.py; nothing is registered here. What the fixtures use is in tests/support/e2e.py
and tests/support/images.py.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.k8s import containers
from tests.k8s.kubeapi import KubeApi
from tests.k8s.kubelet import MiniKubelet
from tests.support import e2e, images
from tests.support.jobtypes import CREATE_EFFECTS
from tests.support.nodes import query, set_settings

_databases = itertools.count()


@pytest.fixture(scope="session")
def e2e_api(k8s_workloads: Any) -> KubeApi:
    api = KubeApi(Path(k8s_workloads.kubeconfig))
    e2e.install_crd(api)
    return api


@pytest.fixture(scope="session")
def kubelet(e2e_api: KubeApi, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MiniKubelet]:
    k = e2e.dsm_kubelet(e2e_api, tmp_path_factory.mktemp("kubelet"))
    k.start()
    try:
        yield k
    finally:
        k.stop()


@pytest.fixture(scope="session")
def e2e_images(kubelet: MiniKubelet) -> dict[str, str]:
    """version -> node image for the image-mode tests (built on the node image of ``make
    images``); from now on the kubelet runs pods of these images in podman."""
    images.require("E2E IMAGE TESTS")
    containers.remove_leftovers()
    built = images.build_e2e_images()
    kubelet.container_images = (images.E2E_REPOSITORY,)
    return built


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
) -> Iterator[e2e.Manager]:
    """A DeepSecurityManager ``mgr`` (not yet applied) and its running operator.

    Parametrized indirectly: ``"process"`` (the default) runs the operator and the nodes as local
    processes; ``"image"`` runs the operator from its image and every node pod from the node
    image (tags 0.1.0 and 0.2.0, :func:`e2e_images`) in podman."""
    runtime = getattr(request, "param", "process")
    operator_image = None
    node_repository = e2e.PROCESS_NODE_REPOSITORY
    if runtime == "image":
        request.getfixturevalue("e2e_images")
        operator_image = f"{images.OPERATOR_REPOSITORY}:{images.project_version()}"
        node_repository = images.E2E_REPOSITORY
    db = f"e2e{os.getpid()}_{next(_databases)}"
    url = pg_server.create(db, template=pg_template)  # schema 2 at 0.1.0, no node yet
    query(url, CREATE_EFFECTS)
    set_settings(
        url,
        heartbeat_interval_seconds=e2e.HEARTBEAT_INTERVAL,
        offline_threshold_seconds=e2e.OFFLINE_THRESHOLD,
    )
    m = e2e.Manager(e2e_api, kubelet, k8s_namespace, url, runtime=runtime)
    m.create_secrets()
    operator = e2e.OperatorProcess(
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

"""Fixtures of the operator's cluster-tier tests (``test_cluster_*.py``, marked ``cluster``):
the CRD installed, the environment of an in-process operator, and the API of one test's
namespace. The unit tests beside them (``test_operator_*.py``, no marker) need none of this.

The control-plane fixtures come from tests/k8s/plugin.py (registered by tests/conftest.py); what
the tests ask of the API is tests/support/operator.py.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.loopback import free_port
from tests.support.operator import Api
from tests.support.waiting import wait_until

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "deepsecuritymanagers.yaml"


@pytest.fixture(scope="session")
def dsm_crd(k8s_control_plane: Any) -> str:
    """The DeepSecurityManager CRD installed (server-side apply of crds/) and Established."""
    import yaml
    from kubernetes import client, dynamic

    body = yaml.safe_load(CRD_FILE.read_text())
    dyn = dynamic.DynamicClient(k8s_control_plane.api_client)
    crds = dyn.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
    dyn.server_side_apply(
        crds, body=body, name=body["metadata"]["name"], field_manager="tests", force_conflicts=True
    )
    ext = client.ApiextensionsV1Api(k8s_control_plane.api_client)
    name = str(body["metadata"]["name"])

    def established() -> bool:
        crd = ext.read_custom_resource_definition(name)
        return any(
            c.type == "Established" and c.status == "True" for c in crd.status.conditions or ()
        )

    wait_until(established, 30, "the DeepSecurityManager CRD Established")
    return name


@pytest.fixture
def operator_env(monkeypatch: pytest.MonkeyPatch, k8s_workloads: Any) -> int:
    """Environment of an in-process operator; returns its metrics port."""
    port = free_port()
    monkeypatch.setenv("KUBECONFIG", str(k8s_workloads.kubeconfig))
    monkeypatch.setenv("DSM_OPERATOR_RECONCILE_INTERVAL_SECONDS", "1")
    monkeypatch.setenv("DSM_OPERATOR_NODE_API_ENABLED", "false")
    monkeypatch.setenv("DSM_OPERATOR_NODE_API_NETWORKS", '["127.0.0.0/8"]')
    monkeypatch.setenv("DSM_OPERATOR_METRICS_PORT", str(port))
    monkeypatch.setenv("DSM_OPERATOR_METRICS_ADDRESS", "127.0.0.1")
    monkeypatch.setenv("DSM_OPERATOR_NODE_IMAGE_REPOSITORY", "registry.test/dsm-node")
    return port


@pytest.fixture
def collect_operator_leftovers() -> Iterator[None]:
    """Finalize what a stopped in-process operator left behind, here and silently.

    kopf's aiohttp sessions to the API server are not all closed when ``KopfRunner`` stops the
    operator's loop (a production operator exits its process instead). Left alone, their
    ResourceWarnings surface at some later garbage collection -- in whatever test runs then,
    where ``filterwarnings = error`` fails it. Collecting right after each test keeps them here.
    """
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture
def api(k8s_workloads: Any, k8s_namespace: str, dsm_crd: str) -> Api:
    return Api(k8s_workloads.api_client, k8s_namespace)

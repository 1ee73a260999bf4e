"""Shared helpers for the operator's tests.

Unit tests here are pure and fast (no marker). Cluster-tier tests (``test_cluster_*.py``, marked
``cluster``) use the control-plane fixtures from tests/cluster/plugin.py, registered below the
same way tests/cluster/conftest.py does it, so ``pytest tests/operator`` works on its own.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.import_plugin("tests.cluster.plugin")


# --- cluster-tier helpers (only used by test_cluster_*.py) ------------------------------------

CRD_FILE = REPO_ROOT / "crds" / "deepsecuritymanagers.yaml"


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
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        crd = ext.read_custom_resource_definition(body["metadata"]["name"])
        if any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or ()):
            return str(body["metadata"]["name"])
        time.sleep(0.2)
    raise TimeoutError("the DeepSecurityManager CRD was not Established in 30 s")

"""Every example in examples/ is accepted by a real API server with the project's CRD."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.cluster

REPO = Path(__file__).parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_accepted_by_the_api_server(
    example: Path, k8s_control_plane: Any, k8s_namespace: str
) -> None:
    plane = k8s_control_plane.control_plane
    crd = yaml.safe_load((REPO / "crds" / "deepsecuritymanagers.yaml").read_text())
    status, reply = plane.request(
        "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd
    )
    assert status in (201, 409), reply
    group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
    version = crd["spec"]["versions"][0]["name"]
    body = yaml.safe_load(example.read_text())
    path = f"/apis/{group}/{version}/namespaces/{k8s_namespace}/{plural}?dryRun=All"
    deadline = time.monotonic() + 30
    while True:  # a CRD takes a moment to be served (404 with a plain-text body meanwhile)
        try:
            status, reply = plane.request("POST", path, body)
        except ValueError:
            status, reply = 404, None
        if status != 404 or time.monotonic() > deadline:
            break
        status, _ = plane.request(
            "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd
        )  # re-create it if another test just deleted it
        time.sleep(0.2)
    assert status == 201, reply
    assert reply["spec"]["version"] == body["spec"]["version"]

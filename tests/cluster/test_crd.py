"""The API server really validates, defaults and serves subresources of a custom resource.

These are the behaviours a mocked client cannot show and our operator relies on: a structural schema
with server-side defaults, CEL rules (``x-kubernetes-validations``) whose refusals name the field,
the status subresource (status ignored on the main resource, spec ignored on status, generation
bumped only by spec) and the scale subresource (``kubectl scale`` and HPA path, validated like the
object itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes import watch as watching
from kubernetes.client import ApiException

from tests.k8s.plugin import Cluster

pytestmark = pytest.mark.cluster

watch: Any = watching  # its annotations differ between client releases

GROUP = "cluster-tier.dsm.test"
VERSION = "v1"
PLURAL = "widgets"
SEMVER = r"^[0-9]+\\.[0-9]+\\.[0-9]+$"  # a regex inside a CEL string literal

CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {
            "plural": PLURAL,
            "singular": "widget",
            "kind": "Widget",
            "listKind": "WidgetList",
        },
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {
                    "status": {},
                    "scale": {
                        "specReplicasPath": ".spec.replicas",
                        "statusReplicasPath": ".status.replicas",
                        "labelSelectorPath": ".status.selector",
                    },
                },
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["version"],
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "self.replicas >= self.minReplicas",
                                        "message": "replicas must not be below minReplicas",
                                        "fieldPath": ".replicas",
                                        "reason": "FieldValueInvalid",
                                    }
                                ],
                                "properties": {
                                    "replicas": {"type": "integer", "minimum": 0, "default": 3},
                                    "minReplicas": {"type": "integer", "minimum": 0, "default": 1},
                                    "version": {
                                        "type": "string",
                                        "x-kubernetes-validations": [
                                            {
                                                "rule": f"self.matches('{SEMVER}')",
                                                "message": "version must be MAJOR.MINOR.PATCH",
                                            }
                                        ],
                                    },
                                    "paused": {"type": "boolean", "default": False},
                                },
                            },
                            "status": {
                                "type": "object",
                                "properties": {
                                    "replicas": {"type": "integer"},
                                    "selector": {"type": "string"},
                                    "observedGeneration": {"type": "integer"},
                                },
                            },
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture(scope="module")
def widget_crd(k8s_control_plane: Cluster) -> Iterator[str]:
    """The Widget CRD, applied and Established; removed after the module."""
    ext: Any = client.ApiextensionsV1Api(k8s_control_plane.api_client)
    name: str = CRD["metadata"]["name"]
    ext.create_custom_resource_definition(CRD)
    w = watch.Watch()
    for event in w.stream(
        ext.list_custom_resource_definition,
        field_selector=f"metadata.name={name}",
        timeout_seconds=30,
    ):
        conditions = event["object"].status.conditions or []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            w.stop()
            break
    else:
        pytest.fail(f"CRD {name} not Established within 30 s")
    yield name
    ext.delete_custom_resource_definition(name)


def widget(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"version": "1.2.3", **spec},
    }


@pytest.fixture
def objects(k8s_control_plane: Cluster) -> Any:
    """CustomObjectsApi; typed Any because custom objects are plain dicts."""
    return client.CustomObjectsApi(k8s_control_plane.api_client)


def test_valid_object_is_stored_with_server_side_defaults(
    widget_crd: str, objects: Any, k8s_namespace: str
) -> None:
    objects.create_namespaced_custom_object(
        GROUP, VERSION, k8s_namespace, PLURAL, widget("good", replicas=2)
    )
    stored = objects.get_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, "good")
    assert stored["spec"] == {"version": "1.2.3", "replicas": 2, "minReplicas": 1, "paused": False}
    assert stored["metadata"]["generation"] == 1


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (
            {"replicas": 1, "minReplicas": 2},
            "spec.replicas",
            "replicas must not be below minReplicas",
        ),
        ({"version": "latest"}, "spec.version", "version must be MAJOR.MINOR.PATCH"),
        ({"replicas": -1}, "spec.replicas", "should be greater than or equal to 0"),
        ({"replicas": "three"}, "spec.replicas", "must be of type integer"),
    ],
    ids=["cel-object-rule", "cel-field-rule", "openapi-minimum", "openapi-type"],
)
def test_invalid_object_is_refused_naming_the_field(
    widget_crd: str,
    objects: Any,
    k8s_namespace: str,
    spec: dict[str, Any],
    field: str,
    message: str,
) -> None:
    with pytest.raises(ApiException) as refused:
        objects.create_namespaced_custom_object(
            GROUP, VERSION, k8s_namespace, PLURAL, widget("bad", **spec)
        )
    assert refused.value.status == 422
    body = str(refused.value.body)
    assert field in body, body
    assert message in body, body
    with pytest.raises(ApiException) as gone:
        objects.get_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, "bad")
    assert gone.value.status == 404


def test_status_subresource_separates_spec_and_status(
    widget_crd: str, objects: Any, k8s_namespace: str
) -> None:
    body = widget("w")
    body["status"] = {"replicas": 7}
    created = objects.create_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, body)
    assert "status" not in created, "status on the main resource must be ignored"

    patched = objects.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        k8s_namespace,
        PLURAL,
        "w",
        {"status": {"replicas": 2, "observedGeneration": 1}, "spec": {"replicas": 9}},
    )
    assert patched["status"] == {"replicas": 2, "observedGeneration": 1}
    assert patched["spec"]["replicas"] == 3, "spec through the status endpoint must be ignored"
    assert patched["metadata"]["generation"] == 1, "a status write must not bump generation"

    spec_change = objects.patch_namespaced_custom_object(
        GROUP, VERSION, k8s_namespace, PLURAL, "w", {"spec": {"replicas": 4}}
    )
    assert spec_change["metadata"]["generation"] == 2
    assert spec_change["status"]["replicas"] == 2, "a spec write must keep status"


def test_scale_subresource_reads_and_writes_replicas(
    widget_crd: str, objects: Any, k8s_namespace: str
) -> None:
    objects.create_namespaced_custom_object(
        GROUP, VERSION, k8s_namespace, PLURAL, widget("s", replicas=2, minReplicas=2)
    )
    objects.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        k8s_namespace,
        PLURAL,
        "s",
        {"status": {"replicas": 2, "selector": "app=widget-s"}},
    )
    scale = objects.get_namespaced_custom_object_scale(GROUP, VERSION, k8s_namespace, PLURAL, "s")
    assert scale["kind"] == "Scale"
    assert scale["spec"]["replicas"] == 2
    assert scale["status"] == {"replicas": 2, "selector": "app=widget-s"}

    objects.patch_namespaced_custom_object_scale(
        GROUP, VERSION, k8s_namespace, PLURAL, "s", {"spec": {"replicas": 5}}
    )
    stored = objects.get_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, "s")
    assert stored["spec"]["replicas"] == 5

    # A scale write is validated like the object: the CEL rule still guards replicas >= minReplicas.
    with pytest.raises(ApiException) as refused:
        objects.patch_namespaced_custom_object_scale(
            GROUP, VERSION, k8s_namespace, PLURAL, "s", {"spec": {"replicas": 1}}
        )
    assert refused.value.status == 422
    assert "replicas must not be below minReplicas" in str(refused.value.body)


def test_crd_schema_is_structural_kept_and_published(
    widget_crd: str, k8s_control_plane: Cluster
) -> None:
    plane = k8s_control_plane.control_plane
    status, crd = plane.request(
        "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{widget_crd}"
    )
    assert status == 200
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert "NonStructuralSchema" not in conditions
    stored = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert stored["x-kubernetes-validations"][0]["fieldPath"] == ".replicas"

    # Published in OpenAPI v3, which kubectl explain and server-side apply read.
    status, doc = plane.request("GET", f"/openapi/v3/apis/{GROUP}/{VERSION}")
    assert status == 200
    schemas = doc["components"]["schemas"]
    widget_schema = next(v for k, v in schemas.items() if k.endswith(".Widget"))
    assert {"replicas", "minReplicas", "version", "paused"} <= set(
        widget_schema["properties"]["spec"]["properties"]
    )

"""Operator start-up: kopf settings, the gateways, the metrics endpoint."""

from __future__ import annotations

import logging
from typing import Any

import kopf
import prometheus_client

from dsm_operator.gateways.kubeapi import KubeGateway
from dsm_operator.reconcile import names
from dsm_operator.settings import OperatorSettings

_METRICS_SERVED: set[tuple[str, int]] = set()


class _QuietTimer(logging.Filter):
    """Drops kopf's "Timer 'reconcile' succeeded." line, logged on every one-second tick."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timer 'reconcile' succeeded" not in record.getMessage()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster credentials, else $KUBECONFIG as it is *now*.

    kopf's default goes through the kubernetes client, which reads $KUBECONFIG once at import;
    an operator started in-process (tests, ``KopfRunner``) would miss a later setting.
    """
    info: kopf.ConnectionInfo | None = kopf.login_with_service_account(**kwargs)
    return info or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    operator_settings = OperatorSettings()
    # Our own marker and storage keys, never kopf's defaults (shared by every kopf operator;
    # changing them later would re-handle every object).
    settings.persistence.finalizer = names.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=names.ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # Restart silently frozen watch streams (the fix kopf 1.44 introduced is opt-in).
    settings.watching.inactivity_timeout = 300
    settings.watching.server_timeout = 270
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 4
    logging.getLogger("kopf.objects").addFilter(_QuietTimer())
    memo.settings = operator_settings
    memo.kube = KubeGateway()
    endpoint = (operator_settings.metrics_address, operator_settings.metrics_port)
    if operator_settings.metrics_port and endpoint not in _METRICS_SERVED:
        # Once per process: an operator restarted in-process (tests) keeps the first server.
        prometheus_client.start_http_server(endpoint[1], addr=endpoint[0])
        _METRICS_SERVED.add(endpoint)
        logger.info(
            "metrics on %s:%d/metrics",
            operator_settings.metrics_address,
            operator_settings.metrics_port,
        )


@kopf.on.cleanup()
def close(memo: kopf.Memo, **_: Any) -> None:
    kube = memo.get("kube")
    if kube is not None:
        kube.close()

"""Operator start-up: kopf settings, the gateways, the metrics endpoint."""

from __future__ import annotations

import logging
from typing import Any

import kopf
import prometheus_client

from dsm_operator.gateways.kubeapi import KubeGateway
from dsm_operator.reconcile import names
from dsm_operator.settings import OperatorSettings


class _QuietTimer(logging.Filter):
    """Drops kopf's "Timer 'reconcile' succeeded." line, logged on every one-second tick."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timer 'reconcile' succeeded" not in record.getMessage()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    operator_settings = OperatorSettings()
    # Our own marker and storage keys, never kopf's shared defaults (FIELD-NOTES §4).
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
    if operator_settings.metrics_port:
        prometheus_client.start_http_server(
            operator_settings.metrics_port, addr=operator_settings.metrics_address
        )
        logger.info(
            "metrics on %s:%d/metrics",
            operator_settings.metrics_address,
            operator_settings.metrics_port,
        )

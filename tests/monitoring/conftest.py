"""Fixtures of the monitoring tests (Prometheus and promtool built by hack/prometheus/build.sh)."""

from __future__ import annotations

import pytest

from tests.support import prometheus


@pytest.fixture(scope="session")
def prometheus_tools() -> prometheus.Tools:
    return prometheus.require_tools()

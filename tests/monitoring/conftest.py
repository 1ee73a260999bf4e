"""Fixtures of the monitoring tests (Prometheus and promtool built by hack/prometheus/build.sh)."""

from __future__ import annotations

import pytest

from tests.monitoring import tools


@pytest.fixture(scope="session")
def prometheus_tools() -> tools.Tools:
    return tools.require()

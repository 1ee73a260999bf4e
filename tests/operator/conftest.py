"""Shared helpers for the operator's tests.

Unit tests here are pure and fast (no marker). Cluster-tier tests (``test_cluster_*.py``, marked
``cluster``) use the control-plane fixtures from tests/cluster/plugin.py, registered below the
same way tests/cluster/conftest.py does it, so ``pytest tests/operator`` works on its own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.import_plugin("tests.cluster.plugin")

"""Loads the control-plane plugin for tests/cluster when the top-level conftest has not done so yet.

The fixtures live in ``plugin.py`` so that tests/e2e can share one control plane per session; the
top-level tests/conftest.py is expected to register it with ``pytest_plugins``. Until then (or when
running ``pytest tests/cluster`` from a checkout without that line), this registers the same module
under the same name, which pytest ignores when it is already registered.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if (
    _REPO_ROOT not in sys.path
):  # `tests.cluster...` must be importable without pyproject's pythonpath
    sys.path.insert(0, _REPO_ROOT)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.import_plugin("tests.cluster.plugin")

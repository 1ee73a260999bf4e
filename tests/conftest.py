"""Test tiers, by marker: unit tests (no marker) need nothing; ``integration`` tests get a real
PostgreSQL started by the suite; ``cluster`` tests get the real Kubernetes control plane; ``e2e``
tests get both plus real node processes."""

from collections.abc import Generator

import pytest

pytest_plugins = ["tests.support.postgres", "tests.support.nodes", "tests.cluster.plugin"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)

"""Test tiers, by marker: unit tests (no marker) need nothing; ``integration`` tests get a real
PostgreSQL started by the suite; ``cluster`` tests get the real Kubernetes control plane; ``e2e``
tests get both plus real node processes. CONTRIBUTING.md says how to run one test or one tier.

Tier folders (unit, integration, cluster, operator, e2e, monitoring) hold only tests and
conftests. What tests share lives in two support packages: ``tests/support`` (the test kit:
waiting, loopback addresses, certificates, child processes, PostgreSQL, node processes, the
operator and its resource) and ``tests/k8s`` (a generic Kubernetes simulation: the real control
plane as processes, a mini kubelet, a REST client, the audit log, a pod watch). Fixtures shared
by every tier come from the plugins below and from this file.
"""

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.support.nodes import Cluster

pytest_plugins = ["tests.support.postgres", "tests.k8s.plugin"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None]:
    """Keep each phase's report on the item (``item.rep_call``) so that fixtures can attach logs
    to a failed test in their teardown."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def dsm_cluster(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    """Node processes on this test's fresh database, started with ``dsm_cluster.start(name)``;
    all killed afterwards, their log tails printed when the test failed."""
    c = Cluster(database_url, tmp_path)
    yield c
    c.close()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(c.logs())

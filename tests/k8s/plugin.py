"""pytest plugin: the real control plane (``controlplane.py``) as fixtures, shared by every test
tier.

Fixtures:

- ``k8s_control_plane`` (session): etcd + kube-apiserver on 127.0.0.1; a :class:`Cluster` with the
  admin kubeconfig path and a ``kubernetes.client.ApiClient``. Enough for CRDs, validation,
  subresources, RBAC, watches and finalizers.
- ``k8s_workloads`` (session): the same :class:`Cluster`, plus kube-controller-manager,
  kube-scheduler and kwok with one Ready fake node, so Deployments and StatefulSets really get Pods
  that turn Ready (pod IPs in 127.1.0.0/16).
- ``k8s_namespace`` (per test): a fresh namespace, deleted afterwards.

Why a plugin module rather than a conftest: the cluster, operator, monitoring and e2e tiers use the
same session (one control plane per run, a few seconds to start) and the same failure reporting; a
plugin is registered once with ``pytest_plugins = ["tests.k8s.plugin"]`` in the top-level
tests/conftest.py.

Where the binaries are missing (no Go to build them, or ``make k8s`` not run) every test that asks
for the control plane is skipped with one loud reason -- or fails, when ``CI=true``, so that CI can
never pass without this tier. When a test that used the control plane fails, the tail of every
component's log is attached to its report; the full logs stay under pytest's temporary directory.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.k8s import audit, controlplane
from tests.support import buildcache

FIXTURES = frozenset({"k8s_control_plane", "k8s_workloads", "k8s_namespace"})
LOG_TAIL_LINES = 60
SHORT_SKIP_REASON = "cluster tier unavailable: see the CLUSTER TIER line at the end"
_PLANE = pytest.StashKey[controlplane.ControlPlane]()
_UNAVAILABLE = pytest.StashKey[str]()


@dataclass(frozen=True)
class Cluster:
    """What the fixtures hand to tests."""

    control_plane: controlplane.ControlPlane
    kubeconfig: Path
    """Admin kubeconfig (certificates embedded) for kubectl, helm, kopf and the Python client."""
    api_client: Any
    """A ``kubernetes.client.ApiClient`` on :attr:`kubeconfig`, shared by the session."""
    tool_home: Path
    """Scratch HOME for helm/kubectl, so tests never read or write the user's configuration."""

    @property
    def server(self) -> str:
        return self.control_plane.server

    @property
    def audit(self) -> audit.AuditLog:
        """The API server's audit log: who deleted which pod, who wrote which object."""
        return audit.AuditLog(self.control_plane.audit_log)

    def tool_env(self) -> dict[str, str]:
        """Environment for CLI tools: this cluster's kubeconfig, helm/kubectl state kept private."""
        env = dict(os.environ)
        env.update(
            KUBECONFIG=str(self.kubeconfig),
            HOME=str(self.tool_home),
            HELM_CACHE_HOME=str(self.tool_home / "helm-cache"),
            HELM_CONFIG_HOME=str(self.tool_home / "helm-config"),
            HELM_DATA_HOME=str(self.tool_home / "helm-data"),
        )
        return env

    def helm(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the pinned helm against this cluster; raises CalledProcessError with its output."""
        return _run([str(self.control_plane.binaries.helm), *args], self.tool_env(), timeout)

    def kubectl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run kubectl from PATH against this cluster (skips the test if there is none)."""
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            pytest.skip("kubectl is not installed on this machine")
        return _run([kubectl, f"--kubeconfig={self.kubeconfig}", *args], self.tool_env(), timeout)


def _run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


def unavailable_reason() -> str | None:
    """None when the control plane is built; otherwise one line saying why not and what to do."""
    binaries = controlplane.Binaries.locate()
    missing = binaries.missing()
    if not missing:
        return None
    go = controlplane.go_toolchain()
    how = (
        "no Go toolchain is installed to build it (Go >= 1.26 is the only prerequisite)"
        if go is None
        else f"build it with `make k8s` (hack/k8s/build.sh; Go found at {go})"
    )
    verdict = "FAILED (CI=true)" if _in_ci() else "SKIPPED"
    return (
        f"CLUSTER TIER {verdict}: Kubernetes {binaries.k8s_version} control plane is not built"
        f" (missing {', '.join(p.name for p in missing)} in {buildcache.cache_dir() / 'k8s'});"
        f" {how}"
    )


def _in_ci() -> bool:
    return os.environ.get("CI") == "true"


def _require_binaries() -> controlplane.Binaries:
    """The built programs, or skip (fail with CI=true) with the reason."""
    reason = unavailable_reason()
    if reason is None:
        return controlplane.Binaries.locate()
    if _in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def k8s_control_plane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """etcd + kube-apiserver on 127.0.0.1 for the whole session."""
    binaries = _require_binaries()
    workdir = tmp_path_factory.mktemp("k8s")
    plane = controlplane.ControlPlane(workdir, binaries)
    request.config.stash[_PLANE] = plane
    try:
        plane.start()
        api_client = plane.api_client()
    except BaseException:
        plane.stop()
        raise
    tool_home = workdir / "home"
    tool_home.mkdir()
    try:
        yield Cluster(plane, plane.kubeconfig, api_client, tool_home)
    finally:
        api_client.close()
        plane.stop()


@pytest.fixture(scope="session")
def k8s_workloads(k8s_control_plane: Cluster) -> Cluster:
    """The session's control plane plus controller manager, scheduler and a kwok fake node."""
    k8s_control_plane.control_plane.start_workloads()
    return k8s_control_plane


@pytest.fixture
def k8s_namespace(k8s_control_plane: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of its own for this test; deleted (not awaited) afterwards."""
    from kubernetes import client
    from kubernetes.client import ApiException

    plane = k8s_control_plane.control_plane
    dead = plane.dead_components()
    if dead:
        tails = "\n".join(f"--- {n}:\n{plane.components[n].log_tail()}" for n in dead)
        pytest.fail(f"control-plane components died: {', '.join(dead)}\n{tails}", pytrace=False)

    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{secrets.token_hex(3)}"
    core = client.CoreV1Api(k8s_control_plane.api_client)
    core.create_namespace(
        client.V1Namespace(
            metadata=client.V1ObjectMeta(name=name, labels={"dsm.test/cluster-tier": "true"})
        )
    )
    if plane.workloads_running:
        # Pods are refused until the service-account controller has made "default" in the namespace.
        _wait_for_service_account(core, name)
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:
                raise


def _wait_for_service_account(core: Any, namespace: str, timeout: float = 30.0) -> None:
    from kubernetes import watch as watching

    watch: Any = watching  # its annotations differ between client releases
    if core.list_namespaced_service_account(
        namespace, field_selector="metadata.name=default"
    ).items:
        return
    w = watch.Watch()
    for _event in w.stream(
        core.list_namespaced_service_account,
        namespace,
        field_selector="metadata.name=default",
        timeout_seconds=int(timeout),
    ):
        w.stop()
        return
    raise TimeoutError(f"no default service account in {namespace} after {timeout:.0f} s")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the tail of every component's log to a failing test that used the control plane."""
    report = yield
    if report.failed and FIXTURES & set(getattr(item, "fixturenames", ())):
        plane = item.config.stash.get(_PLANE, None)
        if plane is not None:
            for name, path in plane.log_files().items():
                tail = plane.components[name].log_tail(LOG_TAIL_LINES)
                report.sections.append((f"{name} (last {LOG_TAIL_LINES} lines of {path})", tail))
    return report


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without binaries, mark the tests that need them skipped up front (CI=true: the fixture
    fails them instead); the full reason is printed once, in the summary, not once per test."""
    users = [i for i in items if FIXTURES & set(getattr(i, "fixturenames", ()))]
    reason = unavailable_reason() if users else None
    if reason is None:
        return
    config.stash[_UNAVAILABLE] = reason
    if not _in_ci():
        mark = pytest.mark.skip(reason=SHORT_SKIP_REASON)
        for item in users:
            item.add_marker(mark)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """One loud line when the tier could not run; otherwise one line with start-up times and
    where the logs are."""
    reason = config.stash.get(_UNAVAILABLE, None)
    if reason is not None:
        terminalreporter.write_sep("!", reason, red=_in_ci(), yellow=not _in_ci(), bold=True)
    plane = config.stash.get(_PLANE, None)
    if plane is None or not plane.timings:
        return
    times = ", ".join(f"{k} {v:.1f}" for k, v in plane.timings.items())
    terminalreporter.write_line(
        f"k8s control plane {plane.binaries.k8s_version}: {times}; logs in {plane.log_dir}"
    )


__all__ = ["Cluster", "k8s_control_plane", "k8s_namespace", "k8s_workloads"]

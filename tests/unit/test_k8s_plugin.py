"""The cluster tier never passes silently: missing binaries skip it with a reason, or fail it in CI.

Unit tests of the control-plane plugin (tests/k8s/plugin.py): they start nothing, they point the
fixture's binary lookup at an empty cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.k8s import controlplane, plugin


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DSM_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_missing_binaries_skip_with_one_loud_reason(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        plugin._require_binaries()
    reason = str(skipped.value)
    assert reason.startswith("CLUSTER TIER SKIPPED:")
    assert "\n" not in reason
    assert str(empty_cache / "k8s") in reason
    assert plugin.unavailable_reason() == reason


def test_missing_binaries_fail_under_ci(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception) as failed:
        plugin._require_binaries()
    assert str(failed.value).startswith("CLUSTER TIER FAILED (CI=true):")


def test_without_go_the_reason_says_so(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("GO", "no-such-go")
    assert controlplane.go_toolchain() is None
    with pytest.raises(pytest.skip.Exception) as skipped:
        plugin._require_binaries()
    assert "no Go toolchain" in str(skipped.value)

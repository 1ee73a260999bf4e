"""The pinned requirements (requirements/, made by hack/lock.py) belong to pyproject.toml."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).parents[2]


def lock_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dsm_lock", REPO / "hack" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lock_was_made_from_this_pyproject() -> None:
    check = subprocess.run(
        [sys.executable, str(REPO / "hack" / "lock.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_a_dependency_change_without_make_lock_is_caught(tmp_path: Path) -> None:
    lock = lock_module()
    shutil.copytree(REPO / "requirements", tmp_path / "requirements")
    pyproject = tmp_path / "pyproject.toml"
    text = (REPO / "pyproject.toml").read_text()
    assert '"prometheus-client>=0.20",' in text
    pyproject.write_text(
        text.replace('"prometheus-client>=0.20",', '"prometheus-client>=99",\n    "left-pad>=1",')
    )
    found = lock.problems(pyproject, tmp_path / "requirements")
    assert "requirements/node.txt was made from another pyproject.toml" in found
    assert "requirements/node.txt does not pin left-pad" in found
    assert any(
        p.startswith("requirements/dev.txt pins prometheus-client==") and p.endswith(">=99")
        for p in found
    ), found


def test_images_and_tests_share_one_version_of_everything(tmp_path: Path) -> None:
    lock = lock_module()
    node, dev = (
        lock.pins(REPO / "requirements" / "node.txt"),
        lock.pins(REPO / "requirements" / "dev.txt"),
    )
    assert node and set(node) <= set(dev)
    assert {k: dev[k] for k in node} == node
    # and the check notices when they differ
    shutil.copytree(REPO / "requirements", tmp_path / "requirements")
    node_txt = tmp_path / "requirements" / "node.txt"
    node_txt.write_text(
        node_txt.read_text().replace(f"sqlalchemy=={node['sqlalchemy']}", "sqlalchemy==0.1")
    )
    assert f"sqlalchemy: node.txt pins 0.1, dev.txt {dev['sqlalchemy']}" in lock.problems(
        REPO / "pyproject.toml", tmp_path / "requirements"
    )

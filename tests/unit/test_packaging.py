"""The package declares exactly what its code imports: every third-party module the node or the
operator imports at run time comes from a declared distribution, and every declared distribution
is imported somewhere (nothing dead such as an unused pool library, nothing only the tests need)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    """'psycopg[binary]>=3.2' -> 'psycopg' (PEP 503 normalized)."""
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert m, requirement
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def _imported_distributions(package_dir: Path) -> set[str]:
    modules: set[str] = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = {
        m
        for m in modules
        if m not in sys.stdlib_module_names and m not in ("dsm_node", "dsm_operator")
    }
    owners = importlib.metadata.packages_distributions()
    found = set()
    for m in third_party:
        assert m in owners, f"{m} is imported by {package_dir.name} but installed by nothing"
        found |= {_name(d) for d in owners[m]}
    return found


def test_node_imports_exactly_the_declared_dependencies() -> None:
    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    node = _imported_distributions(ROOT / "node_image" / "dsm_node")
    operator = _imported_distributions(ROOT / "operator" / "dsm_operator")
    extra = {_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["operator"]}
    assert node <= declared, f"imported but not declared: {sorted(node - declared)}"
    assert operator <= declared | extra, (
        f"the operator imports undeclared: {sorted(operator - declared - extra)}"
    )
    assert declared <= node | operator, f"declared but never imported: {sorted(declared - node)}"
    assert extra <= operator, f"operator extra never imported: {sorted(extra - operator)}"


def test_test_only_dependencies_stay_out_of_the_runtime() -> None:
    node = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    runtime = node | {_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["operator"]}
    dev = {_name(r) for r in PYPROJECT["dependency-groups"]["dev"] if isinstance(r, str)}
    # the operator reads the alert rules shipped beside it; the node reads no YAML
    assert "pyyaml" in dev and "pyyaml" not in node
    assert "psycopg-pool" not in runtime and "pytest" not in runtime

"""The repository stands alone: no tracked file points at material outside it (the workspace's
shared notes and seed documents, or paths of the machine it was written on). A fact the project
needs is stated where it is needed -- docs/specification.md for the product itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Spelled in pieces so that this file does not match itself.
OUTSIDE = ("../" + "shared", "shared/" + "seed", "FIELD" + "-NOTES", "/wo" + "rk/")
SKIPPED_DIRS = {".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__"}


def tracked_files() -> list[Path]:
    """What git tracks here; every file but caches when this is not a git checkout."""
    listing = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=False
    )
    if listing.returncode == 0 and listing.stdout:
        return [REPO / name for name in listing.stdout.decode().split("\0") if name]
    return [
        p
        for p in REPO.rglob("*")
        if p.is_file() and not SKIPPED_DIRS & set(p.relative_to(REPO).parts)
    ]


def references_outside(path: Path, root: Path = REPO) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except (IsADirectoryError, FileNotFoundError):  # a submodule, or deleted but not staged
        return []
    return [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for number, line in enumerate(text.splitlines(), 1)
        if any(marker in line for marker in OUTSIDE)
    ]


def test_no_tracked_file_points_outside_the_repository() -> None:
    files = tracked_files()
    assert len(files) > 100  # the listing worked
    found = [hit for path in files for hit in references_outside(path)]
    assert found == [], "\n".join(found)


def test_the_check_finds_a_reference(tmp_path: Path) -> None:
    """The scan above can fail: a file with such a reference is reported with its line."""
    planted = tmp_path / "docs" / "notes.md"
    planted.parent.mkdir()
    planted.write_text("Facts:\n\nsee " + OUTSIDE[0] + "/notes.md\n")
    assert references_outside(planted, tmp_path) == [f"docs/notes.md:3: see {OUTSIDE[0]}/notes.md"]

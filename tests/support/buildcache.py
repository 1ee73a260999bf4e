"""Where ``make``'s build scripts leave the programs the tests run, and at which versions.

Offers :func:`cache_dir` (``$DSM_CACHE_DIR`` or ``~/.cache/dsm``: hack/k8s/build.sh,
hack/prometheus/build.sh and hack/images/build.sh keep their output there, keyed by version) and
:func:`read_versions` (a ``versions.env`` file of ``KEY=value`` lines, the pins those scripts
build). A test finds a program at the path the pinned version gives, never on PATH, so a run
always uses what ``make test`` built.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$DSM_CACHE_DIR`` or ``~/.cache/dsm``."""
    return Path(os.environ.get("DSM_CACHE_DIR") or Path.home() / ".cache" / "dsm")


def read_versions(path: Path) -> dict[str, str]:
    """Parse a ``versions.env`` file (``KEY=value`` lines, ``#`` comments, blank lines)."""
    versions: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            versions[key.strip()] = value.strip()
    return versions

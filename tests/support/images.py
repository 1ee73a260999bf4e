"""The project's images in tests: where ``make images`` put them, and the e2e node images built
on top of them.

Offers :data:`NODE_REPOSITORY`, :data:`OPERATOR_REPOSITORY` (what ``make images`` tags, at
:func:`project_version`), :func:`unavailable_reason` (why the image tests cannot run here),
:func:`require` (those images, or a skip -- a failure with ``CI=true`` -- naming the reason) and
:func:`build_e2e_images`: the node image plus one layer with the test-only job types
(``tests/support/jobtypes.py``); the "0.2.0" image also carries the test-only schema migration
(``tests/support/migrations_v2``), so an upgrade from the 0.1.0 tag to the 0.2.0 tag really
migrates the schema, as a new release's image would. The mini kubelet runs them in podman
(tests/k8s/containers.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import tomllib
from pathlib import Path

import pytest

from tests.k8s import containers

REPO = Path(__file__).resolve().parents[2]
E2E_REPOSITORY = "localhost/dsm-node-e2e"
OPERATOR_REPOSITORY = "localhost/dsm-operator"
NODE_REPOSITORY = "localhost/dsm-node"
SUPPORT = REPO / "tests" / "support"
IMAGE_FILES = ("__init__.py", "jobtypes.py", "migrations_v2")
"""What of tests/support an e2e node image carries: the job types and the test migration."""


def project_version() -> str:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    version: str = data["project"]["version"]
    return version


def unavailable_reason(images: list[str]) -> str | None:
    """Why these images cannot run here (None when they can)."""
    if not containers.available():
        return "podman and runc are not installed (make images installs them)"
    missing = [i for i in images if not containers.image_exists(i)]
    if missing:
        return f"images {missing} are not built (make images)"
    return None


def require(what: str) -> dict[str, str]:
    """``{"node": ..., "operator": ...}``: the images ``make images`` built at this version, or
    skip the test (fail it when ``CI=true``) with one line naming ``what`` and the reason."""
    version = project_version()
    built = {
        "node": f"{NODE_REPOSITORY}:{version}",
        "operator": f"{OPERATOR_REPOSITORY}:{version}",
    }
    reason = unavailable_reason(list(built.values()))
    if reason is None:
        return built
    in_ci = os.environ.get("CI") == "true"
    message = f"{what} {'FAILED (CI=true)' if in_ci else 'SKIPPED'}: {reason}"
    if in_ci:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def build_e2e_images(versions: tuple[str, ...] = ("0.1.0", "0.2.0")) -> dict[str, str]:
    """version -> image: the node image plus the test job types (and, for every version but the
    first, the test-only schema migration). Cached by podman's layer cache."""
    base = f"{NODE_REPOSITORY}:{project_version()}"
    images = {}
    with tempfile.TemporaryDirectory(prefix="dsm-e2e-image-") as tmp:
        context = Path(tmp)
        target = context / "tests" / "support"
        target.mkdir(parents=True)
        for name in IMAGE_FILES:
            source = SUPPORT / name
            if source.is_dir():
                shutil.copytree(source, target / name)
            else:
                shutil.copyfile(source, target / name)
        (context / "tests" / "__init__.py").write_text("")
        for i, version in enumerate(versions):
            lines = [
                f"FROM {base}",
                "COPY tests /opt/dsm-e2e/tests",
                "ENV PYTHONPATH=/opt/dsm-e2e DSM_JOB_MODULES=tests.support.jobtypes",
            ]
            if i > 0:
                lines.append(
                    "ENV DSM_EXTRA_MIGRATIONS_DIR=/opt/dsm-e2e/tests/support/migrations_v2"
                )
            lines.append(f'LABEL org.opencontainers.image.version="{version}"')
            containerfile = context / f"Containerfile.{version}"
            containerfile.write_text("\n".join(lines) + "\n")
            tag = f"{E2E_REPOSITORY}:{version}"
            containers.podman(
                "build", "--runtime", "runc", "--pull=never", "--network=none", "--quiet",
                "-f", str(containerfile), "-t", tag, str(context),
                timeout=600,
            )  # fmt: skip
            images[version] = tag
    return images

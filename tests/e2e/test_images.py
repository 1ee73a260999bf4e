"""The images that ``make images`` built (localhost/dsm-node and localhost/dsm-operator at the
project's version): what a cluster administrator expects of them, checked on the images
themselves -- non-root, OCI labels, no compiler, exactly the locked dependencies, a node that
serves with a read-only root file system, and a source change that always reaches a rebuilt
image. Running them in the operator's pods is the e2e tier's job (test_operator_e2e.py)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import ssl
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.k8s import containers
from tests.support.images import REPO, project_version, require
from tests.support.loopback import free_port, next_address
from tests.support.nodes import LOCAL_SECRET
from tests.support.processes import ChildProcess
from tests.support.waiting import wait_until

# e2e: needs the images `make test` builds first (`make test-fast` does not build them).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

USERS = {"node": "10001:10001", "operator": "10002:10002"}
LOCKS = {"node": "node.txt", "operator": "operator.txt"}


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    return require("IMAGE TESTS")


def run(image: str, script: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            containers.PODMAN, "run", "--rm", "--network=none", *containers.base_options(),
            "--read-only", "--read-only-tmpfs=false", *extra,
            "--entrypoint=sh", image, "-c", script,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


def linux_pins(lock: Path) -> dict[str, str]:
    """The pins of a lock file whose markers hold on Linux with CPython 3.11 (the images)."""
    env = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11"}
    pins = {}
    for line in lock.read_text().splitlines():
        if not line or line[0] in "# " or "==" not in line:
            continue
        req = Requirement(line.rstrip(" \\"))
        if req.marker is None or req.marker.evaluate(env):
            pins[req.name.lower().replace("_", "-").replace(".", "-")] = str(req.specifier)[2:]
    return pins


@pytest.mark.parametrize("kind", ["node", "operator"])
def test_non_root_labelled_and_no_compiler(images: dict[str, str], kind: str) -> None:
    info = json.loads(containers.podman("image", "inspect", images[kind]).stdout)[0]
    assert info["Config"]["User"] == USERS[kind]
    labels = info["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == project_version()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    # this commit, or this commit plus uncommitted changes (then marked -dirty)
    assert labels["org.opencontainers.image.revision"] in (head, head + "-dirty"), (
        f"{images[kind]} was built from {labels['org.opencontainers.image.revision']}, not this "
        f"commit {head}: stale (make images; make test always rebuilds first)"
    )
    assert labels["org.opencontainers.image.title"] == f"dsm-{kind}"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.base.name"]

    found = run(
        images[kind],
        "id -u; id -g; for c in gcc cc c++ g++ clang ld as make cpp; do command -v $c; done; "
        "find / -xdev -type f -perm /111 \\( -name 'cc1*' -o -name '*gcc' -o -name '*gcc-[0-9]*' "
        "-o -name 'clang*' -o -name 'tcc' \\) 2>/dev/null | head -3; "
        "touch /root-is-writable 2>/dev/null && echo WRITABLE; true",
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == USERS[kind].split(":"), found.stdout


@pytest.mark.parametrize("kind", ["node", "operator"])
def test_exactly_the_locked_dependencies(images: dict[str, str], kind: str) -> None:
    listing = run(
        images[kind],
        "python3 -c 'import importlib.metadata as m, json; "
        'print(json.dumps({d.metadata["Name"]: d.version for d in m.distributions()}))\'',
    )
    assert listing.returncode == 0, listing.stderr
    installed = {
        name.lower().replace("_", "-").replace(".", "-"): version
        for name, version in json.loads(listing.stdout).items()
    }
    locked = linux_pins(REPO / "requirements" / LOCKS[kind])
    assert installed.pop("dsm") == project_version()
    assert installed == locked  # nothing more (no pip, no setuptools), nothing less


@pytest.fixture
def node_container(images: dict[str, str]) -> Iterator[str]:
    name = f"dsm-image-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    yield name
    containers.remove(name)


def test_the_node_serves_with_a_read_only_root(
    images: dict[str, str], node_container: str, database_url: str, tmp_path: Path
) -> None:
    """As the operator's pod runs it: UID 10001, read-only root, no capabilities, the local
    secret from a mounted Secret, an empty /tmp (emptyDir) for its generated certificate."""
    address = next_address()
    port = free_port(address)
    secret_dir, tmp_dir = tmp_path / "local-secret", tmp_path / "tmp"
    secret_dir.mkdir()
    (secret_dir / "localSecret").write_text(LOCAL_SECRET)
    os.chown(secret_dir / "localSecret", 0, 10001)
    (secret_dir / "localSecret").chmod(0o440)
    tmp_dir.mkdir()
    tmp_dir.chmod(0o1777)
    env = {
        "DSM_DATABASE_URL": database_url,
        "DSM_NODE_NAME": "mgr-0",
        "DSM_BIND_ADDRESS": address,
        "DSM_API_PORT": str(port),
        "DSM_HEARTBEAT_PORT": "0",
        "DSM_LOCAL_SECRET_FILE": "/etc/dsm/local-secret/localSecret",
    }
    argv = containers.run_argv(
        name=node_container,
        image=images["node"],
        command=[],
        args=[],
        env=env,
        mounts=[(secret_dir, "/etc/dsm/local-secret", True), (tmp_dir, "/tmp", False)],
        security=containers.security_args(
            {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001},
            {
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            },
            containers.image_user(images["node"]),
        ),
    )
    log = tmp_path / "node.log"
    node = ChildProcess(argv, log, env={"PATH": os.environ["PATH"], **env}).start()
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                f"https://{address}:{port}{path}", context=insecure, timeout=5
            ) as r:
                return r.status, r.read().decode()
        except OSError:
            return 0, ""

    def ready() -> bool:
        assert node.running, f"node exited {node.returncode}:\n{log.read_text()}"
        return get("/readyz")[0] == 200

    try:
        wait_until(ready, 120, "the node in its image Ready", lambda: log.read_text()[-3000:])
        status, metrics = get("/metrics")
        assert status == 200 and "process_resident_memory_bytes" in metrics
        # the only thing written: its generated certificate, in the mounted /tmp
        assert any(p.name.startswith("dsm-tls-") for p in tmp_dir.iterdir())
    finally:
        containers.kill(node_container, "TERM")
        assert node.proc is not None
        node.proc.wait(60)
    assert node.returncode == 0, log.read_text()[-3000:]  # SIGTERM: a clean stop


def wheelhouse() -> Path:
    """The one hack/images/build.sh made (same key)."""
    digest = hashlib.sha256(
        (REPO / "requirements" / "operator.txt").read_bytes()
        + (REPO / "requirements" / "build.txt").read_bytes()
    ).hexdigest()[:12]
    cache = Path(os.environ.get("DSM_CACHE_DIR") or Path.home() / ".cache" / "dsm")
    return cache / "images" / "wheels" / f"{platform.machine()}-cp311-{digest}"


def test_a_source_change_reaches_the_rebuilt_image(images: dict[str, str], tmp_path: Path) -> None:
    """Rebuild the node image from a copy of the tree with one source line changed, on the same
    layer cache: the change must be in the image (a cached layer must not hide it)."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md", ".dockerignore"):
        shutil.copy(REPO / name, context / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("requirements", "node_image", "operator"):
        shutil.copytree(REPO / name, context / name, ignore=ignore)
    marker = uuid.uuid4().hex
    init = context / "node_image" / "dsm_node" / "__init__.py"
    init.write_text(init.read_text() + f'\nSOURCE_MARKER = "{marker}"\n')
    labels = json.loads(containers.podman("image", "inspect", images["node"]).stdout)[0]
    base = labels["Config"]["Labels"]["org.opencontainers.image.base.name"]
    assert wheelhouse().is_dir(), "make images keeps its wheelhouse in the cache"
    tag = f"localhost/dsm-node-source-check:{marker[:12]}"
    try:
        containers.podman(
            "build", "--runtime", "runc", "--pull=never", "--network=none", "--quiet",
            f"--build-context=wheels={wheelhouse()}", "--build-arg=PIP_NO_INDEX=1",
            f"--build-arg=BASE_IMAGE={base}", "-f", str(context / "node_image" / "Dockerfile"),
            "-t", tag, str(context),
            timeout=600,
        )  # fmt: skip
        seen = run(tag, "python3 -c 'import dsm_node; print(dsm_node.SOURCE_MARKER)'")
        assert seen.stdout.strip() == marker, seen.stderr
    finally:
        containers.podman("rmi", "--force", tag, check=False)

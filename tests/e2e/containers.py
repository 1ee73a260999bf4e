"""Containers for the e2e tier: the mini kubelet's image runtime (podman with runc) and the images
it runs.

What a pod's container becomes (:func:`run_argv`): ``podman run`` of the pod's image on the host
network (each pod binds only its own 127.x address, like the process path), with the pod's
environment (passed by name, so no value appears in a command line), its volumes bind-mounted at
their ``mountPath`` (``readOnly`` honoured), and its ``securityContext`` translated
(:func:`security_args`): user and group, ``fsGroup`` and supplemental groups, ``runAsNonRoot``
checked against the image's user as a kubelet does, ``readOnlyRootFilesystem`` (no tmpfs added:
Kubernetes adds none either), ``allowPrivilegeEscalation: false``, capabilities, seccomp.

Why podman with ``--runtime runc`` and the ``--ulimit`` options: on these machines crun cannot set
up cgroups, and podman's default limits exceed what an unprivileged setrlimit may raise.

The images (:func:`build_e2e_images`): the node image that ``make images`` built
(``localhost/dsm-node:<version>``) plus one layer with the test-only job types
(``tests/support/jobtypes.py``); the "0.2.0" image also carries the test-only schema migration
(``tests/support/migrations_v2``), so an upgrade from the 0.1.0 tag to the 0.2.0 tag really
migrates the schema, as a new release's image would.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PODMAN = "podman"
LABEL = "dsm-e2e-owner"
"""Every container started here carries ``dsm-e2e-owner=<pid of pytest>``: leftovers of a killed
run are removed by the next one (:func:`remove_leftovers`)."""
E2E_REPOSITORY = "localhost/dsm-node-e2e"
OPERATOR_REPOSITORY = "localhost/dsm-operator"
NODE_REPOSITORY = "localhost/dsm-node"


class ContainerConfigError(Exception):
    """The pod's container cannot be created as specified (CreateContainerConfigError)."""


def project_version() -> str:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    version: str = data["project"]["version"]
    return version


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PODMAN, *args], capture_output=True, text=True, check=check, timeout=timeout
    )


def unavailable_reason(images: list[str]) -> str | None:
    """Why containers cannot run here (None when they can)."""
    if shutil.which(PODMAN) is None or shutil.which("runc") is None:
        return "podman and runc are not installed (make images installs them)"
    missing = [i for i in images if podman("image", "exists", i, check=False).returncode != 0]
    if missing:
        return f"images {missing} are not built (make images)"
    return None


def base_options() -> list[str]:
    """Options every container started here needs on these machines."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return [
        "--runtime",
        "runc",
        f"--ulimit=nofile={hard}:{hard}",
        "--ulimit=nproc=32768:32768",
        "--label",
        f"{LABEL}={os.getpid()}",
        "--pull=never",
    ]


def image_user(image: str) -> str:
    """The image's USER ("" for root by default)."""
    return str(podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip())


def image_id(image: str) -> str:
    return str(podman("image", "inspect", "--format", "{{.Id}}", image).stdout.strip())


def security_args(
    pod_context: Mapping[str, Any], container_context: Mapping[str, Any], user_of_image: str
) -> list[str]:
    """podman options for a pod's and its container's ``securityContext`` (the container's
    settings win, as in Kubernetes). Raises :class:`ContainerConfigError` where a kubelet would
    refuse to start the container."""

    def setting(key: str) -> Any:
        return container_context.get(key, pod_context.get(key))

    args: list[str] = []
    image_uid, _, image_gid = user_of_image.partition(":")
    uid = setting("runAsUser")
    gid = setting("runAsGroup")
    if setting("runAsNonRoot"):  # checked as a kubelet does, against the image's user
        if uid is None and image_uid and not image_uid.isdigit():
            raise ContainerConfigError(
                f"image has non-numeric user ({image_uid}), cannot verify user is non-root"
            )
        if (int(uid) if uid is not None else int(image_uid or 0)) == 0:
            raise ContainerConfigError("container has runAsNonRoot and image will run as root")
    if uid is not None or gid is not None:
        user = str(uid) if uid is not None else (image_uid or "0")
        group = gid if gid is not None else (image_gid or None)
        args.append(f"--user={user}:{group}" if group is not None else f"--user={user}")
    groups = [*pod_context.get("supplementalGroups", [])]
    if pod_context.get("fsGroup") is not None:
        groups.append(pod_context["fsGroup"])
    args += [f"--group-add={g}" for g in groups]
    if setting("privileged"):
        raise ContainerConfigError("privileged containers are not simulated")
    if setting("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    if setting("allowPrivilegeEscalation") is False:
        args.append("--security-opt=no-new-privileges")
    caps = setting("capabilities") or {}
    args += [f"--cap-drop={c}" for c in caps.get("drop", [])]
    args += [f"--cap-add={c}" for c in caps.get("add", [])]
    seccomp = (setting("seccompProfile") or {}).get("type", "RuntimeDefault")
    if seccomp == "Unconfined":
        args.append("--security-opt=seccomp=unconfined")
    elif seccomp != "RuntimeDefault":
        raise ContainerConfigError(f"seccompProfile {seccomp} is not simulated")
    return args


def run_argv(
    *,
    name: str,
    image: str,
    command: list[str],
    args: list[str],
    env: Mapping[str, str],
    mounts: list[tuple[Path, str, bool]],
    security: list[str],
) -> list[str]:
    """``podman run`` for one container; ``env`` is passed by name (the caller puts the values in
    podman's own environment). ``command`` replaces the image's ENTRYPOINT, ``args`` its CMD."""
    argv = [PODMAN, "run", "--rm", f"--name={name}", "--network=host", *base_options()]
    argv += security
    for host, target, read_only in mounts:
        argv.append(f"--volume={host}:{target}:{'ro' if read_only else 'rw'}")
    for key in env:
        argv.append(f"--env={key}")
    if command:
        argv.append(f"--entrypoint={json.dumps(command)}")
    argv.append(image)
    return argv + args


def pid(name: str) -> int | None:
    """The host pid of the container's main process (None when it is not running)."""
    done = podman("inspect", "--format", "{{.State.Pid}}", name, check=False, timeout=30)
    try:
        value = int(done.stdout.strip())
    except ValueError:
        return None
    return value or None


def kill(name: str, signal_name: str) -> None:
    podman("kill", f"--signal={signal_name}", name, check=False, timeout=30)


def remove(name: str) -> None:
    podman("rm", "--force", "--time=0", name, check=False, timeout=60)


def remove_leftovers() -> None:
    """Remove containers of earlier test runs whose pytest is gone."""
    listing = podman(
        "ps", "--all", "--filter", f"label={LABEL}", "--format", "json", check=False
    ).stdout
    for c in json.loads(listing or "[]"):
        owner = (c.get("Labels") or {}).get(LABEL, "")
        if owner.isdigit() and int(owner) != os.getpid() and not Path(f"/proc/{owner}").exists():
            for n in c.get("Names") or []:
                remove(n)


def remove_mine() -> None:
    listing = podman(
        "ps",
        "--all",
        "--filter",
        f"label={LABEL}={os.getpid()}",
        "--format",
        "{{.Names}}",
        check=False,
    ).stdout
    for n in listing.split():
        remove(n)


def build_e2e_images(versions: tuple[str, ...] = ("0.1.0", "0.2.0")) -> dict[str, str]:
    """version -> image: the node image plus the test job types (and, for every version but the
    first, the test-only schema migration). Cached by podman's layer cache."""
    base = f"{NODE_REPOSITORY}:{project_version()}"
    images = {}
    with tempfile.TemporaryDirectory(prefix="dsm-e2e-image-") as tmp:
        context = Path(tmp)
        shutil.copytree(
            REPO / "tests" / "support",
            context / "tests" / "support",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
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
            podman(
                "build", "--runtime", "runc", "--pull=never", "--network=none", "--quiet",
                "-f", str(containerfile), "-t", tag, str(context),
                timeout=600,
            )  # fmt: skip
            images[version] = tag
    return images


def readable_copy(path: Path, directory: Path, uid: int, gid: int) -> Path:
    """A copy of ``path`` that user ``uid``/``gid`` may read (a root-only kubeconfig, say)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / path.name
    shutil.copyfile(path, target)
    with contextlib.suppress(PermissionError):
        os.chown(target, uid, gid)
        os.chown(directory, uid, gid)
    target.chmod(0o440)
    directory.chmod(0o750)
    return target

"""Containers for the mini kubelet: its image runtime (podman with runc).

What a pod's container becomes (:func:`run_argv`): ``podman run`` of the pod's image on the host
network (each pod binds only its own 127.x address, like the process path), with the pod's
environment (passed by name, so no value appears in a command line), its volumes bind-mounted at
their ``mountPath`` (``readOnly`` honoured), and its ``securityContext`` translated
(:func:`security_args`): user and group, ``fsGroup`` and supplemental groups, ``runAsNonRoot``
checked against the image's user as a kubelet does, ``readOnlyRootFilesystem`` (no tmpfs added:
Kubernetes adds none either), ``allowPrivilegeEscalation: false``, capabilities, seccomp.

Why podman with ``--runtime runc`` and the ``--ulimit`` options: on these machines crun cannot set
up cgroups, and podman's default limits exceed what an unprivileged setrlimit may raise.

Every container started here is labelled with the test process's pid (:data:`LABEL`), so
:func:`remove_mine` cleans up after a run and :func:`remove_leftovers` after a killed one. Which
images exist is the caller's business (tests/support/images.py builds the project's).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PODMAN = "podman"
LABEL = "dsm-e2e-owner"
"""Every container started here carries ``dsm-e2e-owner=<pid of pytest>``: leftovers of a killed
run are removed by the next one (:func:`remove_leftovers`)."""


class ContainerConfigError(Exception):
    """The pod's container cannot be created as specified (CreateContainerConfigError)."""


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``podman ARGS`` to completion, output captured as text."""
    return subprocess.run(
        [PODMAN, *args], capture_output=True, text=True, check=check, timeout=timeout
    )


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


def available() -> bool:
    """podman and runc are installed."""
    return shutil.which(PODMAN) is not None and shutil.which("runc") is not None


def image_exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


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

#!/usr/bin/env python3
"""Pin every Python dependency, with hashes, from pyproject.toml: ``make lock`` (= this script).

One resolution, four files under ``requirements/`` (all carry the same version of any package):

- ``dev.txt``       ``dsm[operator]`` plus the ``dev`` dependency group: what ``make test`` and
                    ``make lint`` install into ``.venv``
- ``operator.txt``  ``dsm[operator]``: the operator image
- ``node.txt``      ``dsm``: the node image
- ``build.txt``     the build backend (``[build-system] requires``), so that the project itself is
                    built with a pinned setuptools (``--no-build-isolation``) in the venv and images

Each file starts with a digest of the pyproject fields it was made from (dependencies, extras,
dependency groups, requires-python, build requirements). ``--check`` recomputes it and checks that
every requirement of pyproject is met by the pins; a test runs it, so a branch that changes the
dependencies without running ``make lock`` fails with a message saying so.

The resolver is uv (``uv pip compile --universal --generate-hashes``), pinned below and installed
on first use into ``$DSM_CACHE_DIR/tools`` with pip. ``--universal`` keeps the files valid for
every Python >= 3.11 and platform (markers instead of one machine's answer); the hashes cover
every wheel and sdist of each pinned version, so ``pip install --require-hashes`` works on the
host and in any image.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

UV_VERSION = "0.13.8"
REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
OUT = REPO / "requirements"
DIGEST_LINE = "# pyproject-digest: "
FILES = {
    "dev.txt": "dsm[operator] and the dev group: make test, make lint",
    "operator.txt": "dsm[operator]: the operator image (operator/Dockerfile)",
    "node.txt": "dsm: the node image (node_image/Dockerfile)",
    "build.txt": "the build backend of pyproject.toml ([build-system] requires)",
}


def inputs(pyproject: Path = PYPROJECT) -> dict[str, object]:
    """The parts of pyproject.toml the pins depend on (nothing else changes the lock)."""
    data = tomllib.loads(pyproject.read_text())
    project = data.get("project", {})
    return {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "operator": project.get("optional-dependencies", {}).get("operator", []),
        "dev": data.get("dependency-groups", {}).get("dev", []),
        "build": data.get("build-system", {}).get("requires", []),
    }


def digest(pyproject: Path = PYPROJECT) -> str:
    raw = json.dumps(inputs(pyproject), sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def _uv() -> Path:
    cache = Path(os.environ.get("DSM_CACHE_DIR") or Path.home() / ".cache" / "dsm")
    venv = cache / "tools" / f"uv-{UV_VERSION}"
    uv = venv / "bin" / "uv"
    if not uv.exists():
        print(f"==> installing uv {UV_VERSION} into {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"uv=={UV_VERSION}"],
            check=True,
        )
    return uv


def _compile(uv: Path, args: list[str], out: Path, stdin: str | None = None) -> None:
    cmd = [
        str(uv),
        "pip",
        "compile",
        *args,
        "--universal",
        "--python-version",
        "3.11",
        "--generate-hashes",
        "--native-tls",  # the machine's CA bundle (a TLS-inspecting proxy may sit in between)
        "--no-header",
        "--quiet",
        "-o",
        str(out),
    ]
    subprocess.run(cmd, check=True, cwd=REPO, input=stdin, text=True)


def generate() -> None:
    uv = _uv()
    OUT.mkdir(exist_ok=True)
    stamp = digest()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dev = work / "dev.txt"
        _compile(uv, ["pyproject.toml", "--extra", "operator", "--group", "dev"], dev)
        # The images' files are resolved *within* dev.txt's pins: one version of everything.
        _compile(
            uv, ["pyproject.toml", "--extra", "operator", "-c", str(dev)], work / "operator.txt"
        )
        _compile(uv, ["pyproject.toml", "-c", str(dev)], work / "node.txt")
        build_reqs = "\n".join(inputs()["build"]) + "\n"  # type: ignore[arg-type]
        _compile(uv, ["-"], work / "build.txt", stdin=build_reqs)
        for name, what in FILES.items():
            body = (work / name).read_text()
            header = (
                f"# Pinned with hashes by hack/lock.py (make lock); do not edit.\n"
                f"# For: {what}.\n"
                f"{DIGEST_LINE}{stamp}\n"
            )
            (OUT / name).write_text(header + body)
            print(f"==> requirements/{name}: {len(pins(OUT / name))} pins", file=sys.stderr)


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def pins(path: Path) -> dict[str, str]:
    """Normalized project name -> pinned version."""
    found = {}
    for line in path.read_text().splitlines():
        m = _PIN.match(line)
        if m:
            found[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return found


def problems(pyproject: Path = PYPROJECT, out: Path = OUT) -> list[str]:
    """Why the lock in ``out`` does not belong to ``pyproject`` (empty when it does)."""
    from packaging.requirements import Requirement  # only --check needs it (.venv has it)

    stamp = digest(pyproject)
    wanted = inputs(pyproject)
    found: list[str] = []
    needs = {
        "dev.txt": [*wanted["dependencies"], *wanted["operator"], *wanted["dev"]],  # type: ignore[misc]
        "operator.txt": [*wanted["dependencies"], *wanted["operator"]],  # type: ignore[misc]
        "node.txt": list(wanted["dependencies"]),  # type: ignore[call-overload]
        "build.txt": list(wanted["build"]),  # type: ignore[call-overload]
    }
    for name, reqs in needs.items():
        path = out / name
        if not path.exists():
            found.append(f"requirements/{name} is missing")
            continue
        if f"{DIGEST_LINE}{stamp}" not in path.read_text():
            found.append(f"requirements/{name} was made from another pyproject.toml")
        pinned = pins(path)
        for text in reqs:
            req = Requirement(text)
            key = re.sub(r"[-_.]+", "-", req.name).lower()
            if key not in pinned:
                found.append(f"requirements/{name} does not pin {req.name}")
            elif not req.specifier.contains(pinned[key], prereleases=True):
                found.append(f"requirements/{name} pins {req.name}=={pinned[key]}, not {req}")
    dev = pins(out / "dev.txt") if (out / "dev.txt").exists() else {}
    for name in ("node.txt", "operator.txt"):
        for key, version in pins(out / name).items() if (out / name).exists() else []:
            if dev.get(key, version) != version:
                found.append(f"{key}: {name} pins {version}, dev.txt {dev[key]}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="verify, do not resolve")
    if parser.parse_args().check:
        found = problems()
        for p in found:
            print(p, file=sys.stderr)
        if found:
            print("the lock is stale: run `make lock` and commit requirements/", file=sys.stderr)
        return 1 if found else 0
    generate()
    return 0


if __name__ == "__main__":
    sys.exit(main())

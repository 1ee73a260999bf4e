"""The ``dsm`` command as a user runs it: a subprocess, with its own state directory.

Offers :func:`dsm` (run ``dsm ARGS`` to completion), :class:`DsmUp` (``dsm up`` in the background,
its output collected line by line, its nodes cleaned up) and :func:`env_for` (the environment both
use: this checkout on ``PYTHONPATH``, no connection settings leaking in from the caller's)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.nodes import REPO
from tests.support.waiting import wait_until


def env_for(state: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "DSM_STATE_DIR": str(state),
        **extra,
    }
    for name in ("DSM_SERVER", "DSM_CA_FILE", "DSM_API_KEY", "DSM_DATABASE_URL"):
        if name not in extra:
            env.pop(name, None)
    return env


def dsm(
    state: Path, *args: str, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """Runs ``dsm ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "dsm_node", *args],
        env=env_for(state, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class DsmUp:
    """A ``dsm up`` running in the background; its output is collected line by line."""

    def __init__(self, state: Path, *args: str, **env: str) -> None:
        self.state = state
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsm_node", "up", "--no-watch", *args],
            env=env_for(state, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, cond: Callable[[str], Any], timeout: float, what: str) -> Any:
        def check() -> Any:
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader catch up
                value = cond(self.output)
                if value:
                    return value
                raise AssertionError(f"dsm up exited ({self.proc.returncode}):\n{self.output}")
            return cond(self.output)

        return wait_until(check, timeout, what, lambda: self.output[-3000:])

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()

    def pids(self) -> set[int]:
        """Every node PID ``dsm up`` reported."""
        import re

        return {int(m) for m in re.findall(r"\(PID (\d+)", self.output)}

    def cleanup(self) -> None:
        """Stops ``dsm up``; kills whatever node it started that is still alive."""
        try:
            self.stop(90)
        except subprocess.TimeoutExpired:
            self.kill()
        for pid in self.pids():
            if self.is_our_node(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def is_our_node(self, pid: int) -> bool:
        """A live node process of this ``dsm up`` (not a process that reused the PID)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return b"dsm_node" in cmdline and f"DSM_STATE_DIR={self.state}".encode() in environ

"""Programs a test starts and must never leave behind: one way to run a child process.

Offers :class:`ChildProcess` (a program with its output in a log file of its own, started,
stopped gracefully or killed, its log read back for failure reports) and :func:`die_with_parent`
(a ``preexec_fn`` that has the kernel kill the child when the thread that started it ends).

Why a log file per process rather than pipes: a pipe nobody reads fills up and stalls the
program, and a log file is still there to read when the test fails. Why ``die_with_parent``:
pytest-timeout's thread method and a killed pytest skip every teardown; a component that outlives
its run holds ports and burns CPU on a machine shared with other runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

# Loaded in the parent: the child between fork and exec must only make the one system call.
_LIBC = (
    ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None
)
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: SIGKILL this child when the thread that spawned it ends (Linux only;
    elsewhere nothing). Spawn from a thread that lives as long as the child should."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ChildProcess:
    """``argv`` run with stdout and stderr appended to ``log_path``.

    ``env`` replaces the environment when given (callers usually pass ``{**os.environ, ...}``);
    ``new_session`` puts the child in a session of its own (a terminal's Ctrl-C does not reach
    it); ``bound_to_parent`` applies :func:`die_with_parent`. When ``header`` is set, the command
    line is written to the log first.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        new_session: bool = False,
        bound_to_parent: bool = False,
        header: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.new_session = new_session
        self.bound_to_parent = bound_to_parent
        self.header = header
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ChildProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            if self.header:
                log.write(f"$ {' '.join(self.argv)}\n".encode())
                log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.new_session,
                preexec_fn=die_with_parent if self.bound_to_parent and _LIBC else None,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None, "not started"
        self.proc.send_signal(sig)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM (after SIGCONT, in case the test stopped it) and wait for the exit code;
        ``subprocess.TimeoutExpired`` if it has not exited within ``timeout``."""
        assert self.proc is not None, "not started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
        return self.proc.wait(timeout)

    def stop(self, grace: float = 30) -> int | None:
        """:meth:`terminate`, then SIGKILL when ``grace`` seconds were not enough; None when
        it was never started."""
        if self.proc is None:
            return None
        try:
            return self.terminate(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL and reap (nothing when it has already exited)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

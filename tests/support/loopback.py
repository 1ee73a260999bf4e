"""Loopback addresses and ports for things the tests start: the only network the tests may use.

Offers :func:`free_port` (a TCP port nothing listens on right now, on one address),
:func:`next_address` (a loopback address of this test run's own, a new one per call) and
:func:`bindable` (whether an address/port pair can be bound now).

Every simulated host gets an address of its own in 127.0.0.0/8, so two nodes can both use the
product's fixed ports and a test can cut one host off without touching the others. The addresses
of :func:`next_address` are derived from the process id, so two test runs on one machine (other
worktrees, CI jobs) rarely meet; :func:`free_port` is a snapshot, and a component that loses its
port to another process between the check and its bind must be retried by its starter.
"""

from __future__ import annotations

import itertools
import os
import socket

_hosts = itertools.count(2)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def next_address() -> str:
    """A fresh loopback address per call: 127.<pid-derived>.<n / 250>.<n % 250 + 1>."""
    n = next(_hosts)
    return f"127.{(os.getpid() // 250) % 250 + 1}.{n // 250}.{n % 250 + 1}"


def bindable(host: str, port: int) -> bool:
    """True when ``host:port`` can be bound now (nothing else holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True

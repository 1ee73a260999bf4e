"""The manager node runtime: one process per manager node, sharing one PostgreSQL with its peers.

Layers, from the bottom: ``db`` owns every SQL statement and the schema; ``jobs`` is the distributed
job pool (state transitions in ``jobs.states`` are pure); ``cluster`` is membership (heartbeats,
offline detection, takeover); ``api`` serves HTTPS; ``node`` wires them into one process; ``cli`` is
the ``dsm`` command.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dsm")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

"""The manager node runtime: one process per manager node, sharing one PostgreSQL with its peers.

Layers, from the bottom (a module imports only from its own layer and the layers below; ``make
lint`` checks it with import-linter, contracts in pyproject.toml):

- ``db``: every SQL statement (``db/queries.sql``, loaded by name), the schema and its migrations,
  engines.
- the node's own stores and tools: ``auth`` (users, sessions, API keys, the audit log), ``keys``
  (the master key), ``settings_store``, ``config``, ``crypto``, ``caches``, ``metrics``, ...
- ``cluster``: membership. Its rules are pure (``lease``: the node's phases as a state machine;
  ``status``, ``timing``, ``clock``); its I/O keeps them (``membership``: the gateway;
  ``joining``, ``leasing``, ``sweeping``, ``live``).
- ``services``: what a joined node hands its parts, typed and never None.
- ``jobs``: the distributed job pool (``states`` are its pure rules, ``pool`` its gateway,
  ``worker`` the claim loop, ``registry`` the job types).
- ``agents``: the agent side (issue 11): the protocol, the agent CA, the heartbeat channel on
  its own thread and port (``channel``), group commit, the agents' gateway (``store``), their
  periodic jobs, and the agent itself (``dsm agent run``, the simulator).
- ``api``: HTTPS, on a thread of its own; the only place that speaks JSON (``api.views``).
  Beside it, ``console``: the administrator's HTML pages on the same port, through the API's
  guard and gateways (the two import each other; ``console.views``, ``charts`` and ``security``
  do no I/O).
- ``node``: the composition root that builds one node; ``server`` runs it as a process;
  ``local_cluster`` is ``dsm up``; ``cli`` is the ``dsm`` command (``cli_agents``: its agent
  commands).

Pure modules (``cluster.lease``, ``cluster.status``, ``cluster.timing``, ``cluster.clock``,
``jobs.states``) import no I/O library: a second contract says so.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dsm")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

"""What the parts of a node hand each other: typed services that exist, non-optional, once the
node has joined the cluster.

``node.Node`` is the composition root: it builds every service after joining and hands job
handlers a ``JobServices`` (``ctx.services``) and the API a ``Shared`` (through ``NodeState``);
the API adds its own database gateways on its own thread (``api.common.Services``). Nothing here
is ``None`` half way: before the node has joined there are no services at all, and the API
answers 503.

To add a service (an agent registry, a console): give it a Protocol or a class here (or in its own
package), a field in ``Shared`` and/or ``JobServices``, and build it in ``Node._run``. Every member
of ``Shared`` is used from the API's thread as well as the node's: it must not hold anything bound
to an event loop (engines are per thread: each side passes its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from dsm_node.caches import Caches
from dsm_node.cluster.lease import Phase
from dsm_node.keys import MasterKeys
from dsm_node.settings_store import ClusterSettings


class SettingsView(Protocol):
    """The cluster settings this node works with (re-read on a schedule; ``cluster.live``)."""

    def current(self) -> ClusterSettings: ...


@dataclass(frozen=True)
class Shared:
    """What the node shares with the API once it has joined."""

    node_name: str
    version: str  # the software version this node runs (the console shows it)
    settings: SettingsView
    keys: MasterKeys
    caches: Caches


@dataclass(frozen=True)
class JobServices:
    """What a job handler may use besides its payload (``JobContext.services``)."""

    node_name: str
    engine: AsyncEngine  # the job pool's engine, on the node's event loop
    settings: SettingsView
    keys: MasterKeys
    caches: Caches


class NodeState(Protocol):
    """The node as probes and the API see it, in every phase (before it has joined too)."""

    @property
    def name(self) -> str: ...

    @property
    def phase(self) -> Phase: ...

    def not_ready_reasons(self) -> list[str]: ...

    def degraded_reasons(self) -> list[str]: ...

    def shared(self) -> Shared | None:
        """The node's services once it has joined; None before."""
        ...

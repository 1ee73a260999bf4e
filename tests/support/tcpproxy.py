"""A TCP proxy between a node and PostgreSQL that a test can break in the ways networks break:

- ``cut()``: the link goes silent without a reset (a partition, a black hole): bytes are held in
  the buffers, the connections stay open, and new connections hang; ``restore()`` ends it;
- ``drop()``: every open connection is reset at once (a middlebox restarted); new ones work;
- ``refuse()``: every open connection is reset and new ones are refused (reset at once) until
  ``restore()``: the database is unreachable and the node finds out at once.

With several targets it is a TCP load balancer (like HAProxy in TCP mode, TLS passing through):
each new connection goes to the next target in turn, or to the one ``prefer()`` names; the
console's tests use it as the one host name in front of several nodes.

Forwarding is non-blocking with a bounded buffer per direction, so one stalled endpoint (a node
stopped with SIGSTOP stops reading) never stalls the proxy's other connections or its shutdown.
"""

from __future__ import annotations

import contextlib
import itertools
import selectors
import socket
import struct
import threading

from tests.support.loopback import free_port

# Stop reading from one side while this much is waiting to be written to the other.
BUFFER_LIMIT = 1 << 20


class Proxy:
    def __init__(
        self,
        target_port: int = 0,
        target_host: str = "127.0.0.1",
        listen_host: str = "127.0.0.1",
        targets: list[tuple[str, int]] | None = None,
    ) -> None:
        self.targets = targets or [(target_host, target_port)]
        self.target = self.targets[0]
        self._next = itertools.count()
        self._preferred: int | None = None
        self.host = listen_host
        self.port = free_port(listen_host)
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._drop = threading.Event()
        self._refuse = threading.Event()
        self._dropped = threading.Event()
        self._listener = socket.create_server((listen_host, self.port))
        self._listener.setblocking(False)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def cut(self) -> None:
        self._cut.set()

    def prefer(self, index: int | None) -> None:
        """New connections go to ``targets[index]`` (None: each to the next target in turn)."""
        self._preferred = index

    def _choose(self) -> tuple[str, int]:
        if self._preferred is not None:
            return self.targets[self._preferred]
        return self.targets[next(self._next) % len(self.targets)]

    def restore(self) -> None:
        self._refuse.clear()
        self._cut.clear()

    def refuse(self) -> None:
        self._refuse.set()
        self.drop()

    def drop(self) -> None:
        """Resets every open connection (waits until done)."""
        self._dropped.clear()
        self._drop.set()
        self._dropped.wait(5)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._listener.close()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        peer: dict[socket.socket, socket.socket] = {}
        out: dict[socket.socket, bytearray] = {}

        def close_pair(s: socket.socket, reset: bool = False) -> None:
            for x in (s, peer.get(s)):
                if x is None or x not in peer:
                    continue
                with contextlib.suppress(KeyError, ValueError):
                    sel.unregister(x)
                if reset:  # RST instead of FIN
                    with contextlib.suppress(OSError):
                        x.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                x.close()
                peer.pop(x, None)
                out.pop(x, None)

        def interest(s: socket.socket) -> None:
            """Reads unless the other side's buffer is full (or the link is cut); writes while
            something waits to be written."""
            if s not in peer:
                return
            events = 0
            if not self._cut.is_set() and len(out[peer[s]]) < BUFFER_LIMIT:
                events |= selectors.EVENT_READ
            if out[s] and not self._cut.is_set():
                events |= selectors.EVENT_WRITE
            try:
                if events:
                    sel.modify(s, events)
                else:
                    sel.unregister(s)
            except KeyError:
                if events:
                    sel.register(s, events)

        was_cut = False
        while not self._stop.is_set():
            if self._drop.is_set():
                for s in list(peer):
                    close_pair(s, reset=True)
                self._drop.clear()
                self._dropped.set()
            cut = self._cut.is_set()
            if cut != was_cut:
                was_cut = cut
                with contextlib.suppress(KeyError, ValueError):
                    sel.unregister(self._listener)
                if not cut:  # while cut, connects wait in the backlog, like a partition
                    sel.register(self._listener, selectors.EVENT_READ)
                for s in list(peer):
                    interest(s)
            for key, events in sel.select(timeout=0.05):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                s = ready
                if s is self._listener:
                    try:
                        client, _ = self._listener.accept()
                    except OSError:
                        continue
                    if self._refuse.is_set():
                        with contextlib.suppress(OSError):
                            client.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                        client.close()
                        continue
                    try:
                        upstream = socket.create_connection(self._choose(), timeout=5)
                    except OSError:
                        client.close()
                        continue
                    for x in (client, upstream):
                        x.setblocking(False)
                        out[x] = bytearray()
                    peer[client], peer[upstream] = upstream, client
                    sel.register(client, selectors.EVENT_READ)
                    sel.register(upstream, selectors.EVENT_READ)
                    continue
                if s not in peer:
                    continue
                other = peer[s]
                if events & selectors.EVENT_READ:
                    try:
                        data = s.recv(65536)
                    except BlockingIOError:
                        data = None
                    except OSError:
                        data = b""
                    if data == b"":
                        close_pair(s)
                        continue
                    if data:
                        out[other] += data
                        interest(other)
                        interest(s)
                if events & selectors.EVENT_WRITE and s in peer and out[s]:
                    try:
                        sent = s.send(out[s])
                    except BlockingIOError:
                        sent = 0
                    except OSError:
                        close_pair(s)
                        continue
                    del out[s][:sent]
                    interest(s)
                    interest(other)
        for s in list(peer):
            close_pair(s)
        sel.close()

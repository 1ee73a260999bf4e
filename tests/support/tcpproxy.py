"""A TCP proxy between a node and PostgreSQL that a test can cut: while cut, bytes are held (the
connections stay open, as in a network partition), and new connections hang."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

from dsm_node.embedded_pg import free_port


class Proxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def cut(self) -> None:
        self._cut.set()

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        self._listener.setblocking(False)
        sel.register(self._listener, selectors.EVENT_READ, None)
        peers: dict[socket.socket, socket.socket] = {}
        while not self._stop.is_set():
            for key, _ in sel.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    if self._cut.is_set():
                        continue  # leave it in the backlog: connects hang like a partition
                    try:
                        client, _ = self._listener.accept()
                        upstream = socket.create_connection(self.target)
                    except OSError:
                        continue
                    peers[client], peers[upstream] = upstream, client
                    sel.register(client, selectors.EVENT_READ, None)
                    sel.register(upstream, selectors.EVENT_READ, None)
                    continue
                if self._cut.is_set():
                    continue  # hold the bytes in the kernel buffers
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                other = peers.get(sock)
                if not data or other is None:
                    for s in (sock, other):
                        if s is not None:
                            sel.unregister(s)
                            s.close()
                            peers.pop(s, None)
                    continue
                with contextlib.suppress(OSError):
                    other.sendall(data)
            if self._cut.is_set():
                self._stop.wait(0.05)
        sel.close()
        for s in peers:
            s.close()

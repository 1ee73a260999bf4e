"""A service on a thread of its own with its own event loop (the HTTPS API, the agents' channel):
what the node's thread sees of it is ``start``, which returns once the service is serving or
raises what stopped it (a port in use, for one), and ``stop``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading


class LoopThread:
    """Subclasses write ``_serve``: set up, call ``self._serving()`` once ready, wait for
    ``self._stop``, clean up."""

    def __init__(self, name: str, log: logging.Logger) -> None:
        self._log = log
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()  # bound to the thread's loop on first use
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    async def start(self) -> None:
        self._thread.start()
        await asyncio.wrap_future(self._started)

    async def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        await asyncio.to_thread(self._thread.join, 30)

    def _serving(self) -> None:
        self._started.set_result(None)

    async def _serve(self) -> None:
        raise NotImplementedError

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._serve()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # the future carries it to the node's thread
            if not self._started.done():
                self._started.set_exception(e)
            else:
                self._log.error("%s stopped: %s", self._thread.name, e)

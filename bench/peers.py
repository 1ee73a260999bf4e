"""Consumers of the peer queues, run as a child process of the benchmark (like our nodes are).

    python -m bench.peers pgqueuer DSN --consumers 8 --batch 100
    python -m bench.peers procrastinate DSN --concurrency 8

pgqueuer is set up the way its own benchmark (``tools/benchmark.py``) sets it up: one ``PgQueuer``
per consumer, each on its own asyncpg connection, all in one process under uvloop, handlers that
do nothing. procrastinate runs one worker (``run_worker_async``) with the given concurrency on the
``bench`` queue, as its CLI would. Both run until SIGTERM; the process prints ``ready`` on stdout
once its consumers are listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import Any

PGQ_ENTRYPOINT = "noop"
PROCRASTINATE_QUEUE = "bench"


def procrastinate_app(dsn: str, pool_size: int = 10) -> Any:
    """The procrastinate app with its no-op task (also used by the benchmark to defer jobs)."""
    import procrastinate

    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=dsn, min_size=1, max_size=pool_size)
    )

    @app.task(name="noop", queue=PROCRASTINATE_QUEUE)
    async def noop() -> None:
        """Does nothing."""

    return app


async def run_pgqueuer(dsn: str, consumers: int, batch: int) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Job, PgQueuer

    pgqs: list[PgQueuer] = []
    for _ in range(consumers):
        pgq = PgQueuer(AsyncpgDriver(await asyncpg.connect(dsn=dsn)))

        @pgq.entrypoint(PGQ_ENTRYPOINT)
        async def noop(job: Job) -> None:
            pass

        pgqs.append(pgq)

    def stop_all() -> None:
        for p in pgqs:
            p.shutdown.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all)
    tasks = [asyncio.create_task(p.run(batch_size=batch)) for p in pgqs]
    await asyncio.sleep(1.0)  # LISTEN is set up within milliseconds; one second is ample
    print("ready", flush=True)
    await asyncio.gather(*tasks)


async def run_procrastinate(dsn: str, concurrency: int) -> None:
    app = procrastinate_app(dsn)
    async with app.open_async():
        worker = asyncio.create_task(
            app.run_worker_async(
                queues=[PROCRASTINATE_QUEUE],
                concurrency=concurrency,
                wait=True,
                install_signal_handlers=False,
            )
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.cancel)
        await asyncio.sleep(1.0)
        print("ready", flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await worker


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers")
    p.add_argument("system", choices=["pgqueuer", "procrastinate"])
    p.add_argument("dsn")
    p.add_argument("--consumers", type=int, default=5)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args(argv)
    if args.system == "pgqueuer":
        import uvloop

        uvloop.run(run_pgqueuer(args.dsn, args.consumers, args.batch))
    else:
        asyncio.run(run_procrastinate(args.dsn, args.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())

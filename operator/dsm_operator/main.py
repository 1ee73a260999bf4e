"""``dsm-operator``: registers the kopf handlers and runs the operator.

Importing this module registers every handler (``kopf run -m dsm_operator.main`` works too,
which is what ``kopf.testing.KopfRunner`` uses). ``main`` runs standalone -- no peering: the
chart ships exactly one replica with the ``Recreate`` strategy (kopf's peering is not leader
election: replicas with equal priorities all freeze).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence

import kopf

from dsm_operator.handlers import lifecycle, managers
from dsm_operator.settings import OperatorSettings

HANDLER_MODULES = (lifecycle, managers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsm-operator", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)"
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    settings = OperatorSettings()
    kopf.configure(verbose=args.verbose)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    clusterwide = args.all_namespaces or not args.namespace
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=clusterwide,
            namespaces=[] if clusterwide else args.namespace,
            liveness_endpoint=settings.liveness_endpoint or None,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

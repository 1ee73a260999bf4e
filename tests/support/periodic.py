"""A periodic task for tests: record_effect every 2 seconds (DSM_JOB_MODULES=...jobtypes,...periodic)."""

from dsm_node.jobs.registry import REGISTRY, Periodic
from tests.support import jobtypes  # noqa: F401  (registers record_effect)

REGISTRY.every(Periodic("test_tick", "record_effect", every=2))

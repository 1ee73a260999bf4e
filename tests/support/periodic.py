"""A periodic task for tests: record_effect every 2 seconds.

Load with DSM_JOB_MODULES=tests.support.jobtypes,tests.support.periodic."""

from dsm_node.jobs.registry import REGISTRY, Periodic
from tests.support import jobtypes  # noqa: F401  (registers record_effect)

REGISTRY.every(Periodic("test_tick", "record_effect", every=2))

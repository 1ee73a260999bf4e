# One entry point for people and CI. Every target installs what it needs by itself.
VENV        ?= .venv
PYTHON      ?= python3
export DSM_CACHE_DIR ?= $(HOME)/.cache/dsm

.PHONY: help deps postgres haproxy chromium bench-agents k8s images prometheus lock test test-fast lint up bench chaos clean

# make chaos: how many faults, and the seed that fixes their schedule
CHAOS_FAULTS ?= 60
CHAOS_SEED   ?= 20261201

help:
	@echo "make up      run a local 3-node cluster on an embedded PostgreSQL (Ctrl-C stops it)"
	@echo "make test    install everything needed and run the whole test suite"
	@echo "make lint    ruff, mypy and the import layers (lint-imports)"
	@echo "make bench   job-pool throughput against pgqueuer and procrastinate"
	@echo "make bench-agents  agent heartbeats: group commit vs one transaction each, reconnect storm"
	@echo "make chaos   seeded fault injection, long form (CHAOS_FAULTS=60 CHAOS_SEED=...): prints a report"
	@echo "make images  build the node and operator images (podman or Docker; no registry needed)"
	@echo "make prometheus  build Prometheus and promtool for the monitoring tests"
	@echo "make lock    re-pin the Python dependencies (requirements/) after editing pyproject.toml"

$(VENV)/.installed: pyproject.toml requirements/dev.txt requirements/build.txt
	@hack/bootstrap-python.sh "$(VENV)" "$(PYTHON)"

deps: $(VENV)/.installed postgres haproxy

postgres:
	@hack/install-postgres.sh

# The agent tests put a real HAProxy (TCP passthrough) in front of real nodes.
haproxy:
	@hack/install-haproxy.sh

# Debian's Chromium for the console's browser tests (tests/console), driven by Playwright.
chromium:
	@hack/install-chromium.sh

k8s:
	@hack/k8s/build.sh

# Both images, tagged localhost/dsm-{node,operator}:<version> (hack/images/build.sh).
images: $(VENV)/.installed
	@PYTHON=$(VENV)/bin/python hack/images/build.sh

# Prometheus, promtool and the monitoring.coreos.com CRDs for the monitoring tests.
prometheus:
	@hack/prometheus/build.sh

lock:
	$(PYTHON) hack/lock.py

# The e2e tier runs the images with podman, so the suite builds them with podman.
test: deps chromium k8s prometheus
	@DSM_CONTAINER_ENGINE=podman PYTHON=$(VENV)/bin/python hack/images/build.sh
	$(VENV)/bin/pytest

test-fast: deps chromium
	$(VENV)/bin/pytest -m "not cluster and not e2e"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

up: deps
	$(VENV)/bin/dsm up

chaos: deps
	rm -rf chaos-logs
	DSM_CHAOS_FAULTS=$(CHAOS_FAULTS) DSM_CHAOS_SEED=$(CHAOS_SEED) DSM_CHAOS_REPORT=chaos-report.txt \
		DSM_CHAOS_LOGS=chaos-logs \
		$(VENV)/bin/pytest tests/integration/test_chaos.py -k every_kind -s -p no:cacheprovider
	@echo "report: chaos-report.txt, node logs: chaos-logs/"

bench: deps
	@hack/bootstrap-python.sh "$(VENV)" "$(PYTHON)" bench
	$(VENV)/bin/python -m bench.throughput

# Agent heartbeats: 1 and 3 nodes, group commit vs one transaction per heartbeat, a reconnect
# storm (docs/benchmarks.md, "Agent heartbeats").
bench-agents: deps
	$(VENV)/bin/python -m bench.agents

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

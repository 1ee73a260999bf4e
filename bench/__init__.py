"""Job-pool benchmarks against pgqueuer and procrastinate: ``python -m bench.throughput``."""

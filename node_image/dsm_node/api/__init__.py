"""The node's HTTPS interface: health, readiness, metrics, and the jobs and nodes API."""

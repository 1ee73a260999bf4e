"""Cluster membership: registration, heartbeats, offline detection and takeover."""

"""Cluster tier: tests against a real Kubernetes control plane (see plugin.py and hack/k8s/)."""
